#!/usr/bin/env python
"""Does the out-of-distribution flag see foreign images, and stay quiet on the model's own kind?

Two models, each exported with the default trust settings and made to score images like its own
(held out from training) and images of other sources; reported per scored set: the share flagged
`out_of_distribution`, whether the run printed `warning: dataset shift:`, and the share flagged
`uncertain`.

- `synthetic`: a small model (`--synthetic-model`, default resnet10t, at --size px, 3 epochs) on
  600 synthetic embryos; scores 300 new synthetic embryos and the real sets.
- `stage-grade`: resnet18 from scratch with `configs/default.yaml` (--epochs, --size) on 80% of
  `../shared/data/stage-grade` (patients = duplicate groups, as in `recipe_real.py`); scores the
  other 20% (its own held-out images), STORK, the time-lapse frames and synthetic embryos.

All real sets here are EmbryoScope-type well images (dark well rim, grey field): STORK and the
time-lapse frames are a different clinic and protocol from the stage-grade images, but not a
different kind of image. Models and scores are kept under --work and reused when run again.

    python benchmarks/ood_real.py                  # ~15 min on 2 CPUs
    python benchmarks/ood_real.py --json ood.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from bench_common import print_table, write_json
from recipe_real import folds_of, stage_grade_manifest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBRYO_ML_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL = {"stage-grade": SHARED / "stage-grade" / "data", "stork": SHARED / "stork" / "images",
        "timelapse": SHARED / "timelapse" / "sample_data"}


def train_and_export(manifest: Path, work: Path, overrides: list[str], config: Path | None
                     ) -> Path:
    from embryo_ml.config import load_config
    from embryo_ml.export.onnx_export import export_bundle
    from embryo_ml.train.fit import fit

    bundle = work / "bundle"
    if (bundle / "bundle.json").is_file():
        return bundle
    cfg = load_config(config, [f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
                               "tracking.log_checkpoint=false", *overrides])
    fit(cfg, manifest, work / "run", progress=False)
    export_bundle(work / "run", bundle, allow_failed_validation=True)
    return bundle


def score_set(source: Path, bundle: Path, out: Path) -> dict[str, object]:
    """Score with the CLI as a user would; the flagged shares and the shift line."""
    from embryo_ml.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["-q", "score", str(source), "--bundle", str(bundle), "--out", str(out)])
    if code != 0:
        raise SystemExit(f"scoring {source} failed: {err.getvalue()}")
    table = pd.read_csv(out, keep_default_na=False)
    ok = table[table["status"] == "ok"]
    flags = ok["flags"].str.split(";")
    shift = json.loads(out.with_name(f"{out.stem}.scoring.json").read_text())["shift"]
    return {"images": len(ok),
            "out_of_distribution": float(flags.apply(lambda f: "out_of_distribution" in f).mean()),
            "uncertain": float(flags.apply(lambda f: "uncertain" in f).mean()),
            "shift_warning": bool(shift.get("shifted")),
            "expected": shift.get("expected_share")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/embryo-ml-ood-real"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--synthetic-model", default="resnet10t")
    parser.add_argument("--models", nargs="+", default=["synthetic", "stage-grade"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    missing = [name for name, path in REAL.items() if not path.is_dir()]
    if missing:
        print(f"real samples missing: {', '.join(missing)} (expected under {SHARED})")
        return 1
    from embryo_ml.data.synthetic import generate_dataset

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    synth_train = work / "synth-train" / "manifest.csv"
    if not synth_train.is_file():
        generate_dataset(synth_train.parent, n=600, size=args.size, seed=31)
    synth_held = work / "synth-held" / "manifest.csv"
    if not synth_held.is_file():
        generate_dataset(synth_held.parent, n=300, size=args.size, seed=32)

    results: list[dict[str, object]] = []
    if "synthetic" in args.models:
        bundle = train_and_export(synth_train, work / "synthetic", [
            f"model.name={args.synthetic_model}", f"data.image_size={args.size}",
            "train.epochs=3"], None)
        sets = {"synthetic (held out)": synth_held, **REAL}
        for name, source in sets.items():
            results.append({"model": "synthetic", "scored": name,
                            **score_set(source, bundle, work / f"synthetic-{name[:9]}.csv")})
    if "stage-grade" in args.models:
        table = pd.read_csv(stage_grade_manifest(REAL["stage-grade"], work / "stage.csv"))
        fold = folds_of(table, 5, 0)
        train, held = table[fold != 0], table[fold == 0]
        train.to_csv(work / "stage-train.csv", index=False)
        held.to_csv(work / "stage-held.csv", index=False)
        bundle = train_and_export(work / "stage-train.csv", work / "stage-grade", [
            "model.pretrained=false", "model.name=resnet18", f"data.image_size={args.size}",
            f"train.epochs={args.epochs}", f"data.cache_dir={work / 'cache'}"],
            REPO / "configs" / "default.yaml")
        sets = {"stage-grade (held out)": work / "stage-held.csv", "stork": REAL["stork"],
                "timelapse": REAL["timelapse"], "synthetic": synth_held}
        for name, source in sets.items():
            results.append({"model": "stage-grade", "scored": name,
                            **score_set(source, bundle, work / f"stage-{name[:9]}.csv")})
    print_table(["model", "scored", "images", "OOD flagged", "shift warning", "uncertain"],
                [[r["model"], r["scored"], r["images"], f"{r['out_of_distribution']:.1%}",
                  "yes" if r["shift_warning"] else "no", f"{r['uncertain']:.1%}"]
                 for r in results])
    if args.json:
        write_json(args.json, {"benchmark": "ood_real", "results": results,
                               "size": args.size, "epochs": args.epochs})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    np.seterr(all="ignore")
    sys.exit(main())
