#!/usr/bin/env python
"""Scoring images/s: `embryo-ml score` vs an eager-PyTorch scorer and ONNX Runtime model-only.

One model (a 1-epoch `fit` on a small synthetic set, exported with `export_bundle`) and one set of
N images (synthetic embryos upscaled to --source-size, default 500 px JPEG like clinic exports)
are scored three ways, interleaved (eager, ours, ORT, eager, ours, ORT, ...):

- eager: the run's best.pt loaded with `load_checkpoint` + `build_model`, a Dataset that opens
  each file with PIL (convert RGB), torchvision Resize((S, S)) + ToTensor + Normalize (the
  checkpoint's mean/std), DataLoader(batch_size=B, num_workers=--eager-workers),
  `torch.inference_mode()`, float32, softmax. Timed from loading the checkpoint to the last
  probability.
- ours: `embryo_ml.score.scorer.score_images(folder, bundle, out, batch_size=B,
  progress=False)`, the whole call: bundle check, ONNX session, decoding, quality flags,
  inference, the scores CSV and the embryos table.
- ORT model-only: `OnnxScorer(read_bundle(bundle)).logits(batch)` on the same N images decoded
  and preprocessed beforehand into float32 batches of B (one warm-up batch untimed): the
  ceiling for ours, whose goal is to hide decoding behind this compute.

- ours_no_trust: ours with a copy of the bundle without its trust layer (no feature-space
  out-of-distribution reference, no conformal sets: the scorer before them, which fetched only
  the logits and judged out-of-distribution by their energy).

Goals (CPU): ours >= 3x eager, ours >= 0.8x ORT model-only, and ours >= 0.9x ours_no_trust (the
trust layer costs at most 10%). Each ratio is the median over
repetitions of the ratio within one repetition.

With 2 or more CPUs (and no --threads), ours and ORT model-only are also run with the model on
one core (intra-op threads = 1; ours decodes on the others): `ours_1core` and
`ort_model_only_1core`. This shows whether decoding hides behind inference when a core is left
for it; in the default layout the model takes every core, so on a small machine the pixel work
can only share them.

The script also measures, single-threaded on a sample of the images, what one image costs
outside the model (decode with the package's reader, quality flags, resize + normalise), and with
--sweep it repeats ORT model-only over intra-op threads and batch sizes and ours over
(decode workers, ORT threads), to show where the time goes.

    python benchmarks/score_throughput.py                        # resnet10t @ 64 px, ~2 min
    python benchmarks/score_throughput.py --model resnet18 --size 224 --sweep --json s.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import cpu_seconds, make_images, median, print_table, workspace, write_json

GOAL_EAGER = 3.0
GOAL_ORT = 0.8
GOAL_TRUST = 0.9  # the trust layer (OOD reference, conformal sets) costs at most 10%


def train_bundle(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """A 1-epoch run on 64 small synthetic images and its exported bundle: (run_dir, bundle)."""
    from embryo_ml.config import load_config
    from embryo_ml.export.onnx_export import export_bundle
    from embryo_ml.train.fit import fit

    manifest = make_images(work / "train-data", 64, 64, "png", args.seed + 1)
    cfg = load_config(None, [
        f"seed={args.seed}", f"model.name={args.model}", "model.pretrained=false",
        f"data.image_size={args.size}", "train.epochs=1", "train.batch_size=16",
        "train.augment=false", "tracking.experiment=benchmark-score-throughput",
        "tracking.log_checkpoint=false",
    ])
    run_dir, bundle = work / "run", work / "bundle"
    for old in (run_dir, bundle):  # a reused --work folder may hold another model's
        shutil.rmtree(old, ignore_errors=True)
    fit(cfg, manifest, run_dir, progress=False)
    export_bundle(run_dir, bundle)
    return run_dir, bundle


def run_eager(paths: list[str], run_dir: Path, batch_size: int, workers: int,
              threads: int | None = None) -> dict[str, Any]:
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from embryo_ml.config import ModelConfig
    from embryo_ml.train.models import build_model
    from embryo_ml.train.run_folder import BEST_FILE, load_checkpoint

    class FileDataset(Dataset):
        def __init__(self, files: list[str], transform: Any) -> None:
            self.files, self.transform = files, transform

        def __len__(self) -> int:
            return len(self.files)

        def __getitem__(self, index: int) -> Any:
            with Image.open(self.files[index]) as image:
                return self.transform(image.convert("RGB"))

    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    started, cpu = time.perf_counter(), cpu_seconds()
    checkpoint = load_checkpoint(run_dir / BEST_FILE)
    model = build_model(ModelConfig(name=checkpoint["model_name"]),
                        num_classes=len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    size = int(checkpoint["image_size"])
    transform = T.Compose([T.Resize((size, size)), T.ToTensor(),
                           T.Normalize(checkpoint["mean"], checkpoint["std"])])
    loader = DataLoader(FileDataset(paths, transform), batch_size=batch_size,
                        num_workers=workers)
    probs = []
    with torch.inference_mode():
        for images in loader:
            probs.append(torch.softmax(model(images), dim=1).numpy())
    del loader  # workers exit and are waited for: their CPU time is counted
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    torch.set_num_threads(default_threads)
    n = sum(len(p) for p in probs)
    return {"ips": n / seconds, "seconds": seconds, "n": n, "cpu_ms_per_image": cpu / n * 1e3}


def run_ours(folder: Path, bundle: Path, out: Path, batch_size: int, workers: int | None = None,
             threads: int | None = None, precision: str = "auto") -> dict[str, Any]:
    from embryo_ml.score.scorer import score_images

    started, cpu = time.perf_counter(), cpu_seconds()
    summary = score_images(folder, bundle, out, batch_size=batch_size, workers=workers,
                           threads=threads, progress=False, precision=precision)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    if summary.n_failed:
        raise SystemExit(f"ours: {summary.n_failed} image(s) failed: {summary.failures[:3]}")
    return {"ips": summary.n_scored / seconds, "seconds": seconds, "n": summary.n_scored,
            "summary_ips": summary.images_per_second,
            "cpu_ms_per_image": cpu / summary.n_scored * 1e3}


def predecode(paths: list[str], bundle: Path, batch_size: int) -> list[np.ndarray]:
    """Every image read and preprocessed as the scorer does, in float32 batches."""
    from embryo_ml.data.preprocess import preprocess, read_for_model
    from embryo_ml.export.bundle import read_bundle

    b = read_bundle(bundle)
    pixels = [preprocess(read_for_model(p, b.input_size), b.input_size, b.mean, b.std)
              for p in paths]
    return [np.ascontiguousarray(np.stack(pixels[i:i + batch_size]))
            for i in range(0, len(pixels), batch_size)]


def run_ort(batches: list[np.ndarray], bundle: Path, threads: int | None = None,
            precision: str = "auto") -> dict[str, Any]:
    from embryo_ml.export.bundle import read_bundle
    from embryo_ml.score.scorer import OnnxScorer

    scorer = OnnxScorer(read_bundle(bundle), threads=threads, precision=precision)
    scorer.logits(batches[0])  # warm-up: memory arenas, kernel selection
    started, cpu = time.perf_counter(), cpu_seconds()
    for batch in batches:
        scorer.logits(batch)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    n = sum(len(b) for b in batches)
    return {"ips": n / seconds, "seconds": seconds, "n": n, "cpu_ms_per_image": cpu / n * 1e3}


def per_image_costs(paths: list[str], bundle: Path, sample: int) -> dict[str, float]:
    """Milliseconds per image, one thread: decode (at the scorer's reduced size), quality flags,
    resize + normalise."""
    from embryo_ml.export.bundle import read_bundle
    from embryo_ml.score.scorer import OnnxScorer, ScoreItem

    scorer = OnnxScorer(read_bundle(bundle), threads=1)
    chosen = paths[:sample]
    timings: dict[str, list[float]] = {"decode_ms": [], "quality_ms": [], "preprocess_ms": []}
    for path in chosen:
        t0 = time.perf_counter()
        image = scorer.read(ScoreItem(path, path))
        t1 = time.perf_counter()
        scorer.image_flags(image)
        t2 = time.perf_counter()
        scorer.prepare(image)
        t3 = time.perf_counter()
        timings["decode_ms"].append((t1 - t0) * 1e3)
        timings["quality_ms"].append((t2 - t1) * 1e3)
        timings["preprocess_ms"].append((t3 - t2) * 1e3)
    costs = {k: median(v) for k, v in timings.items()}
    costs["outside_model_ms"] = sum(costs.values())
    costs["sample"] = len(chosen)
    return costs


def sweep(batches: list[np.ndarray], paths: list[str], folder: Path, bundle: Path, work: Path,
          args: argparse.Namespace) -> dict[str, Any]:
    """ORT model-only over threads and batch sizes; ours over (workers, threads)."""
    flat = np.concatenate(batches)
    ort_rows = []
    for threads in (1, os.cpu_count() or 1):
        for batch_size in sorted({8, args.batch_size, 64}):
            rebatched = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
            result = run_ort(rebatched, bundle, threads)
            ort_rows.append({"threads": threads, "batch_size": batch_size, "ips": result["ips"],
                             "cpu_ms_per_image": result["cpu_ms_per_image"]})
    cpus = os.cpu_count() or 1
    ours_rows = []
    for workers, threads in sorted({(1, cpus), (2, cpus), (4, cpus), (1, 1), (2, 1),
                                    (cpus, max(1, cpus - 1))}):
        result = run_ours(folder, bundle, work / f"sweep-{workers}-{threads}.csv",
                          args.batch_size, workers, threads)
        ours_rows.append({"workers": workers, "threads": threads, "ips": result["ips"],
                          "cpu_ms_per_image": result["cpu_ms_per_image"]})
    return {"ort_model_only": ort_rows, "ours": ours_rows}


def bundle_without_trust(bundle: Path, out: Path) -> Path:
    """A copy of `bundle` without `ood` and `conformal`: scoring as before the trust layer."""
    from embryo_ml.export.bundle import read_bundle, write_bundle_json

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out)
    stripped = read_bundle(out)
    if stripped.ood is not None:
        (out / stripped.ood["file"]).unlink()
    write_bundle_json(replace(stripped, ood=None, conformal=None), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default="resnet10t", help="timm model (default resnet10t)")
    parser.add_argument("--size", type=int, default=64, help="model input size in px")
    parser.add_argument("--images", type=int, default=1000, help="images to score")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--source-size", type=int, default=500,
                        help="side of the stored images in px (default 500, like clinic JPEGs)")
    parser.add_argument("--source-format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--eager-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="ORT intra-op threads (ours, model-only) and torch threads (eager); "
                             "default: each library's own default (all cores)")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--profile-sample", type=int, default=100,
                        help="images timed one by one for the per-image cost breakdown")
    parser.add_argument("--sweep", action="store_true",
                        help="also ORT threads x batch size and ours workers x threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for images, model and outputs (default: a temporary "
                             "folder); images are reused when it is given again")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    with workspace(args, "score-throughput-") as (work, manifest):
        folder = manifest.parent / "images"
        from embryo_ml.data.manifest import iter_image_files

        paths = [str(p) for p in iter_image_files(folder)]
        run_dir, bundle = train_bundle(work / "model", args)
        print(f"{args.model} @ {args.size} px, batch {args.batch_size}, {len(paths)} images "
              f"({args.source_size} px {args.source_format}), {os.cpu_count()} CPUs, "
              f"{args.reps} interleaved reps", flush=True)
        costs = per_image_costs(paths, bundle, args.profile_sample)
        batches = predecode(paths, bundle, args.batch_size)
        from embryo_ml.export.bundle import read_bundle

        int8 = read_bundle(bundle).int8 is not None
        plain_bundle = bundle_without_trust(bundle, work / "bundle-no-trust")
        names = ("eager", "ours", "ours_no_trust", "ort_model_only")
        if int8:  # the fp32 model too, for comparison; the goals are on the default (int8)
            names += ("ours_fp32", "ort_model_only_fp32")
        one_core = args.threads is None and (os.cpu_count() or 1) >= 2
        if one_core:  # the model on one core, decoding on the rest
            names += ("ours_1core", "ort_model_only_1core")
        print("  the bundle " + ("has an int8 model: ours and ORT model-only run it" if int8
                                 else "has no int8 model"), flush=True)
        runs: list[dict[str, Any]] = []
        for rep in range(args.reps):
            for name in names:
                precision = "fp32" if name.endswith("_fp32") else "auto"
                threads = 1 if name.endswith("_1core") else args.threads
                if name == "eager":
                    result = run_eager(paths, run_dir, args.batch_size, args.eager_workers,
                                       args.threads)
                elif name.startswith("ours"):
                    result = run_ours(folder, plain_bundle if name == "ours_no_trust" else
                                      bundle, work / "scores.csv", args.batch_size,
                                      threads=threads, precision=precision)
                else:
                    result = run_ort(batches, bundle, threads, precision)
                runs.append({"name": name, "rep": rep, **result})
                print(f"  rep {rep} {name}: {result['ips']:.1f} img/s", flush=True)
        swept = sweep(batches, paths, folder, bundle, work, args) if args.sweep else None

    by = {(r["name"], r["rep"]): r["ips"] for r in runs}
    reps = range(args.reps)
    summary = {name: median([by[(name, r)] for r in reps]) for name in names}
    cpu_ms = {name: median([r["cpu_ms_per_image"] for r in runs if r["name"] == name])
              for name in names}
    ratio_eager = median([by[("ours", r)] / by[("eager", r)] for r in reps])
    ratio_ort = median([by[("ours", r)] / by[("ort_model_only", r)] for r in reps])
    ratio_trust = median([by[("ours", r)] / by[("ours_no_trust", r)] for r in reps])
    print()
    print_table(["scorer", "img/s", "CPU ms/img"], [[k, v, cpu_ms[k]] for k, v in summary.items()])
    print(f"\nours / eager          {ratio_eager:.2f}  (goal >= {GOAL_EAGER}: "
          f"{'met' if ratio_eager >= GOAL_EAGER else 'not met'})")
    print(f"ours / ORT model-only {ratio_ort:.2f}  (goal >= {GOAL_ORT}: "
          f"{'met' if ratio_ort >= GOAL_ORT else 'not met'})")
    print(f"ours / ours_no_trust  {ratio_trust:.2f}  (goal >= {GOAL_TRUST}: "
          f"{'met' if ratio_trust >= GOAL_TRUST else 'not met'})")
    extra: dict[str, float] = {}
    if int8:
        extra = {"ratio_ours_fp32_eager": median(
                     [by[("ours_fp32", r)] / by[("eager", r)] for r in reps]),
                 "ratio_ours_fp32_ort_fp32": median(
                     [by[("ours_fp32", r)] / by[("ort_model_only_fp32", r)] for r in reps]),
                 "ratio_int8_fp32_model_only": median(
                     [by[("ort_model_only", r)] / by[("ort_model_only_fp32", r)] for r in reps])}
        print(f"fp32 model: ours / eager {extra['ratio_ours_fp32_eager']:.2f}, ours / ORT "
              f"model-only {extra['ratio_ours_fp32_ort_fp32']:.2f}; int8 / fp32 model-only "
              f"{extra['ratio_int8_fp32_model_only']:.2f}")
    if one_core:
        extra["ratio_ours_ort_model_only_1core"] = median(
            [by[("ours_1core", r)] / by[("ort_model_only_1core", r)] for r in reps])
        print(f"model on 1 core (decoding on the other {(os.cpu_count() or 1) - 1}): ours / ORT "
              f"model-only {extra['ratio_ours_ort_model_only_1core']:.2f}")
    print("per image outside the model (1 thread): " + ", ".join(
        f"{k[:-3]} {v:.2f} ms" for k, v in costs.items() if k.endswith("_ms")))
    if swept:
        print("\nORT model-only by threads x batch size:")
        print_table(["threads", "batch", "img/s", "CPU ms/img"],
                    [[r["threads"], r["batch_size"], r["ips"], r["cpu_ms_per_image"]]
                     for r in swept["ort_model_only"]])
        print("\nours by decode workers x ORT threads:")
        print_table(["workers", "threads", "img/s", "CPU ms/img"],
                    [[r["workers"], r["threads"], r["ips"], r["cpu_ms_per_image"]]
                     for r in swept["ours"]])
    write_json(args.json, {
        "benchmark": "score_throughput",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "work")},
        "summary": {**{f"{k}_ips": v for k, v in summary.items()},
                    **{f"{k}_cpu_ms_per_image": v for k, v in cpu_ms.items()},
                    "ratio_ours_eager": ratio_eager, "ratio_ours_ort_model_only": ratio_ort,
                    "ratio_ours_no_trust": ratio_trust,
                    **extra, "int8": int8},
        "goals": {"ours_eager": GOAL_EAGER, "ours_ort_model_only": GOAL_ORT,
                  "ours_no_trust": GOAL_TRUST, "met_trust": ratio_trust >= GOAL_TRUST,
                  "met_eager": ratio_eager >= GOAL_EAGER, "met_ort": ratio_ort >= GOAL_ORT,
                  "met_ort_1core": (extra["ratio_ours_ort_model_only_1core"] >= GOAL_ORT
                                    if one_core else None)},
        "per_image_ms": costs, "sweep": swept, "runs": runs,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
