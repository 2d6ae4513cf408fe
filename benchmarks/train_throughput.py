#!/usr/bin/env python
"""Training images/s: `embryo-ml train` (the package's `fit`) vs a plain timm + torchvision loop.

Both train the same timm model (from scratch, 2 classes) at the same resolution, batch size,
learning rate and number of epochs on the same grouped train/validation split of the same
images, and validate once per epoch. Throughput is

    images trained per epoch x epochs / sum of epoch seconds (training + that epoch's validation)

reported over all epochs ("all") and without the first epoch ("warm"), in which `fit` fills its
decoded-image cache and oneDNN builds its kernels. Both sides drop the last incomplete batch, so
they train on the same number of images.

Baseline (written here, the way a plain tutorial loop reads): a Dataset that opens each file with
PIL and converts it to RGB, torchvision Resize((S, S)) + RandomHorizontalFlip + ToTensor +
Normalize (the model's timm mean/std), DataLoader(batch_size=B, shuffle=True, num_workers=W),
timm.create_model(name, num_classes=2), AdamW, cross-entropy, float32, contiguous (NCHW) tensors.

Ours: `embryo_ml.train.fit.fit` with a config from `load_config(None, overrides)`: the same
model, image size, batch size, epochs, learning rate and weight decay, no warm-up and no early
stop, MLflow in a sqlite file in the work folder. Augmentation is cut to flips for a fair
comparison (augment.flip=true gives horizontal AND vertical flips; rotation, zoom, shift and the
photometric terms off), so ours does slightly more augmentation work than the baseline.

Variants of ours are named by four tokens in any order, e.g. `w1-bf16-cl-cache`:
  w0/w1/w2...        data.num_workers
  fp32/bf16          train.amp off/bf16 (bf16 autocast on CPU uses AMX where the CPU has it)
  nchw/cl            train.channels_last false/true
  cache/nocache      data.cache_dir set (a fresh folder per run) or unset
The package's CPU defaults today are `w0-fp32-nchw` (+ cache when data.cache_dir is set).

Runs are interleaved (baseline, variant 1, variant 2, ..., baseline, variant 1, ...) and each
variant's speed-up is the median over repetitions of (variant / baseline of the same repetition).

Images: synthetic embryos (embryo_ml.data.synthetic), upscaled to --source-size and stored as
--source-format (default 500 px JPEG, like the STORK sample and most incubator exports), so the
baseline pays the decoding cost a clinic's files cost.

    python benchmarks/train_throughput.py                       # resnet18 @ 128 px, ~3 min
    python benchmarks/train_throughput.py --model resnet10t --size 64 --images 480 --reps 3
    python benchmarks/train_throughput.py --grid --json train.json   # all 24 variants
"""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from bench_common import median, print_table, workspace, write_json

GOAL = 1.5
# The package's CPU defaults (+ cache), the recommended CPU setting, and the same without cache.
DEFAULT_VARIANTS = ["w0-fp32-nchw-cache", "w0-bf16-cl-cache", "w0-bf16-cl-nocache"]
FLIPS_ONLY = ["augment.rotate_p=0", "augment.flip=true", "augment.rot90=false",
              "augment.scale=0", "augment.shift=0", "augment.brightness=0",
              "augment.contrast=0", "augment.gamma=0", "augment.blur_p=0", "augment.noise_p=0"]


@dataclass(frozen=True)
class Variant:
    workers: int
    amp: str  # "off" or "bf16"
    channels_last: bool
    cache: bool

    @property
    def name(self) -> str:
        return (f"w{self.workers}-{'bf16' if self.amp == 'bf16' else 'fp32'}-"
                f"{'cl' if self.channels_last else 'nchw'}-{'cache' if self.cache else 'nocache'}")


def parse_variant(text: str) -> Variant:
    workers, amp, channels_last, cache = 0, "off", False, True
    for token in text.lower().split("-"):
        if token.startswith("w") and token[1:].isdigit():
            workers = int(token[1:])
        elif token in ("fp32", "bf16"):
            amp = "off" if token == "fp32" else "bf16"
        elif token in ("nchw", "cl"):
            channels_last = token == "cl"
        elif token in ("cache", "nocache"):
            cache = token == "cache"
        else:
            raise argparse.ArgumentTypeError(
                f"variant {text!r}: unknown token {token!r} (expected wN, fp32/bf16, nchw/cl, "
                "cache/nocache)")
    return Variant(workers, amp, channels_last, cache)


def grid() -> list[Variant]:
    return [Variant(w, a, c, k) for k, w, a, c in
            itertools.product((True, False), (0, 1, 2), ("off", "bf16"), (False, True))]


def images_per_epoch(n_train: int, batch_size: int) -> int:
    """Images trained per epoch with drop_last (as `fit` does when there is more than a batch)."""
    return (n_train // batch_size) * batch_size if n_train > batch_size else n_train


def throughput(seconds: list[float], per_epoch: int) -> tuple[float, float]:
    """(images/s over all epochs, images/s over epochs after the first; nan with one epoch)."""
    total = per_epoch * len(seconds) / sum(seconds)
    warm = (per_epoch * (len(seconds) - 1) / sum(seconds[1:]) if len(seconds) > 1
            else float("nan"))
    return total, warm


# --------------------------------------------------------------------------------- baseline


def run_baseline(split: dict[str, Any], args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """The plain timm + torchvision loop; returns its timings and final validation AUC."""
    import timm
    import torch
    from PIL import Image
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    class FileDataset(Dataset):
        def __init__(self, paths: list[str], labels: list[int], transform: Any) -> None:
            self.paths, self.labels, self.transform = paths, labels, transform

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, index: int) -> tuple[Any, int]:
            with Image.open(self.paths[index]) as image:
                rgb = image.convert("RGB")
            return self.transform(rgb), self.labels[index]

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, num_classes=2)
    config = timm.data.resolve_data_config({}, model=model)
    normalize = T.Normalize(config["mean"], config["std"])
    size = (args.size, args.size)
    train_tf = T.Compose([T.Resize(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(size), T.ToTensor(), normalize])
    drop_last = len(split["train_paths"]) > args.batch_size
    train_loader = DataLoader(FileDataset(split["train_paths"], split["train_y"], train_tf),
                              batch_size=args.batch_size, shuffle=True, num_workers=workers,
                              drop_last=drop_last)
    val_loader = DataLoader(FileDataset(split["val_paths"], split["val_y"], val_tf),
                            batch_size=args.batch_size, num_workers=workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    epoch_seconds, train_seconds, auc = [], [], float("nan")
    for _ in range(args.epochs):
        started = time.perf_counter()
        model.train()
        for images, targets in train_loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_seconds.append(time.perf_counter() - started)
        model.eval()
        probs, ys = [], []
        with torch.inference_mode():
            for images, targets in val_loader:
                probs.append(torch.softmax(model(images), 1)[:, split["positive"]].numpy())
                ys.append(targets.numpy())
        epoch_seconds.append(time.perf_counter() - started)
        y = np.concatenate(ys) == split["positive"]
        auc = float(roc_auc_score(y, np.concatenate(probs))) if 0 < y.sum() < len(y) else auc
    per_epoch = images_per_epoch(len(split["train_paths"]), args.batch_size)
    ips_all, ips_warm = throughput(epoch_seconds, per_epoch)
    train_all, train_warm = throughput(train_seconds, per_epoch)
    return {"ips_all": ips_all, "ips_warm": ips_warm, "train_only_ips_all": train_all,
            "train_only_ips_warm": train_warm, "epoch_seconds": epoch_seconds,
            "val_auc_last_epoch": auc}


# --------------------------------------------------------------------------------------- ours


def ours_config(args: argparse.Namespace, variant: Variant, cache_dir: Path | None) -> Any:
    from embryo_ml.config import load_config

    overrides = [
        f"seed={args.seed}", f"model.name={args.model}", "model.pretrained=false",
        f"data.image_size={args.size}", f"data.val_fraction={args.val_fraction}",
        f"data.num_workers={variant.workers}",
        f"data.cache_dir={cache_dir if cache_dir is not None else 'null'}",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}", f"train.weight_decay={args.weight_decay}",
        "train.warmup_epochs=0", "train.patience=0", f"train.amp='{variant.amp}'",
        f"train.threads={args.threads}",
        f"train.channels_last={str(variant.channels_last).lower()}",
        "tracking.experiment=benchmark-train-throughput", "tracking.log_checkpoint=false",
        *FLIPS_ONLY,
    ]
    return load_config(None, overrides)


def run_ours(manifest: Path, args: argparse.Namespace, variant: Variant, work: Path,
             tag: str) -> dict[str, Any]:
    """One `fit` run; throughput from its history.csv (epoch_seconds includes validation)."""
    from embryo_ml.train.fit import fit
    from embryo_ml.train.run_folder import HISTORY_FILE

    run_dir = work / "runs" / tag
    cache_dir = work / "cache" / tag if variant.cache else None
    cfg = ours_config(args, variant, cache_dir)
    started = time.perf_counter()
    result = fit(cfg, manifest, run_dir, progress=False)
    wall = time.perf_counter() - started
    history = pd.read_csv(run_dir / HISTORY_FILE)
    seconds = [float(s) for s in history["epoch_seconds"]]
    per_epoch = images_per_epoch(int(result.metrics["n_train"]), args.batch_size)
    ips_all, ips_warm = throughput(seconds, per_epoch)
    last_auc = float(history["val_auc"].iloc[-1]) if "val_auc" in history else float("nan")
    record = {"ips_all": ips_all, "ips_warm": ips_warm, "epoch_seconds": seconds,
              "fit_wall_seconds": wall, "val_auc_last_epoch": last_auc,
              "val_auc_best": float(result.metrics.get("val_auc", float("nan"))),
              "n_train": int(result.metrics["n_train"]), "n_val": int(result.metrics["n_val"])}
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are large; the numbers are kept
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return record


# --------------------------------------------------------------------------------------- main


def load_split(manifest: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same grouped split `fit` makes (same function, seed and fraction)."""
    from embryo_ml.data.manifest import load_labelled
    from embryo_ml.data.splits import grouped_split

    table = load_labelled(manifest)
    train_idx, val_idx, _ = grouped_split(table, args.val_fraction, args.seed)
    classes = sorted(table["label"].astype(str).unique())
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = table["path"].tolist(), [index[str(v)] for v in table["label"]]
    return {"train_paths": [paths[i] for i in train_idx], "train_y": [labels[i] for i in train_idx],
            "val_paths": [paths[i] for i in val_idx], "val_y": [labels[i] for i in val_idx],
            "classes": classes, "positive": index.get("good", 0)}


def summarise(runs: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]]:
    baseline = {r["rep"]: r for r in runs if r["name"] == "baseline"}
    summary = {}
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        entry = {key: median([r[key] for r in mine]) for key in ("ips_all", "ips_warm")}
        if name != "baseline":
            for key in ("ips_all", "ips_warm"):
                entry[f"ratio_{key[4:]}"] = median(
                    [r[key] / baseline[r["rep"]][key] for r in mine if r["rep"] in baseline])
            entry["val_auc_best"] = median([r["val_auc_best"] for r in mine])
            entry["fit_wall_seconds"] = median([r["fit_wall_seconds"] for r in mine])
        else:
            entry["train_only_ips_all"] = median([r["train_only_ips_all"] for r in mine])
            entry["train_only_ips_warm"] = median([r["train_only_ips_warm"] for r in mine])
        entry["val_auc_last_epoch"] = median([r["val_auc_last_epoch"] for r in mine])
        summary[name] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default="resnet18", help="timm model name (default resnet18)")
    parser.add_argument("--size", type=int, default=128, help="model input size in px")
    parser.add_argument("--images", type=int, default=240,
                        help="synthetic images (train + validation; default 240)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--source-size", type=int, default=500,
                        help="side of the stored images in px (default 500, like clinic JPEGs)")
    parser.add_argument("--source-format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--baseline-workers", type=int, default=2,
                        help="DataLoader workers of the plain loop (default 2 = the cores here)")
    parser.add_argument("--variants", nargs="+", type=parse_variant, default=None,
                        help=f"ours variants (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--grid", action="store_true",
                        help="all 24 variants: workers 0/1/2 x fp32/bf16 x nchw/cl x cache on/off")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for both sides (train.threads); 0 = torch default")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for images, runs and MLflow (default: a temporary folder); "
                             "images are reused when it is given again")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    variants = grid() if args.grid else args.variants or [parse_variant(v)
                                                          for v in DEFAULT_VARIANTS]

    with workspace(args, "train-throughput-") as (work, manifest):
        split = load_split(manifest, args)
        print(f"{args.model} @ {args.size} px, batch {args.batch_size}, {args.epochs} epochs, "
              f"{len(split['train_paths'])} train / {len(split['val_paths'])} val images "
              f"({args.source_size} px {args.source_format}), {args.reps} interleaved reps",
              flush=True)
        import torch

        threads = args.threads or torch.get_num_threads()  # fit sets it for the whole process
        runs: list[dict[str, Any]] = []
        for rep in range(args.reps):
            torch.set_num_threads(threads)
            record = run_baseline(split, args, args.baseline_workers)
            runs.append({"name": "baseline", "rep": rep, **record})
            print(f"  rep {rep} baseline: {record['ips_all']:.1f} img/s "
                  f"(warm {record['ips_warm']:.1f})", flush=True)
            for variant in variants:
                torch.set_num_threads(threads)
                record = run_ours(manifest, args, variant, work, f"{variant.name}-r{rep}")
                runs.append({"name": variant.name, "rep": rep, **record})
                print(f"  rep {rep} {variant.name}: {record['ips_all']:.1f} img/s "
                      f"(warm {record['ips_warm']:.1f})", flush=True)

    names = ["baseline", *[v.name for v in variants]]
    summary = summarise(runs, names)
    rows = []
    for name in names:
        s = summary[name]
        rows.append([name, s["ips_all"], s["ips_warm"], s.get("ratio_all", 1.0),
                     s.get("ratio_warm", 1.0), s.get("val_auc_best", s["val_auc_last_epoch"])])
    print()
    print_table(["run", "img/s all", "img/s warm", "x all", "x warm", "val AUC"], rows)
    met = [n for n in names[1:] if summary[n]["ratio_all"] >= GOAL]
    met_warm = [n for n in names[1:] if summary[n]["ratio_warm"] >= GOAL]
    print(f"\ngoal >= {GOAL}x (all epochs): {', '.join(met) or 'none'}; "
          f"without the first epoch: {', '.join(met_warm) or 'none'}")
    fp32_bf16 = _precision_pairs(summary)
    for pair in fp32_bf16:
        print(f"val AUC fp32 {pair['fp32']} = {pair['auc_fp32']:.3f}, "
              f"bf16 {pair['bf16']} = {pair['auc_bf16']:.3f}")
    write_json(args.json, {
        "benchmark": "train_throughput",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("variants", "json", "work")}
        | {"variants": [v.name for v in variants],
           "n_train": len(split["train_paths"]), "n_val": len(split["val_paths"])},
        "goal": {"ratio": GOAL, "met_all_epochs": met, "met_warm": met_warm},
        "summary": summary, "auc_fp32_vs_bf16": fp32_bf16, "runs": runs,
    })
    return 0


def _precision_pairs(summary: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Variants that differ only in fp32/bf16, with their best validation AUC."""
    pairs = []
    for name in summary:
        if "-fp32-" in name and name.replace("-fp32-", "-bf16-") in summary:
            other = name.replace("-fp32-", "-bf16-")
            a, b = summary[name]["val_auc_best"], summary[other]["val_auc_best"]
            if math.isfinite(a) and math.isfinite(b):
                pairs.append({"fp32": name, "bf16": other, "auc_fp32": a, "auc_bf16": b})
    return pairs


if __name__ == "__main__":
    sys.exit(main())
