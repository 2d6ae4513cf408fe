#!/usr/bin/env python
"""Does self-supervised pretraining on a clinic's own images beat training from scratch?

Data: the real images of `../shared/data`. Labelled: `stage-grade` (450 images; good = grade A
or B, stage as the `day` column; duplicate groups as patients), as in `recipe_real.py`.
Unlabelled extras: STORK (98 blastocyst focal planes) and the time-lapse sample (100 frames),
images of other clinics that a pretraining set may hold.

For each fold of a patient-grouped cross-validation:
1. `pretrain` (the library call behind `embryo-ml pretrain`) on every image except the held-out
   fold's, which are removed by the leakage rule itself (`--exclude-splits`: the fold's rows as
   the `test` split, so their contents and duplicate groups are excluded);
2. `configs/default.yaml` fine-tunes with `model.pretrained_file` (the fine-tuning rules), and
   the same recipe trains from scratch, at equal epochs, model and size;
3. both score the held-out fold.

Reported: held-out ROC AUC, within-stage AUC and blastocyst ("day 5") AUC, mean over folds with
a 95% patient-bootstrap interval of the pooled out-of-fold predictions, plus the pretraining
time and the linear probe of each fold. Results are cached per fold (resumable).

    python benchmarks/pretrain_real.py                       # 3 folds (~1.5 h on 2 cores)
    python benchmarks/pretrain_real.py --folds 3 --only-folds 0 --pretrain-epochs 10
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pandas as pd
from recipe_real import (
    REPO,
    SHARED,
    Predictions,
    add_fold_options,
    folded_table,
    run_toolkit,
    scores,
    summarise,
    write_results,
)

STORK = SHARED / "stork" / "images"
TIMELAPSE = SHARED / "timelapse" / "sample_data"


def stork_manifest(out: Path) -> Path | None:
    """STORK's focal planes with their embryo id and plane (from `<embryo>_<plane>_<grade>`),
    so that neighbouring planes of one embryo make positive pairs; no labels."""
    import re

    rows = []
    for path in sorted(STORK.rglob("*.jpg")):
        match = re.search(r"(\d{6,})_(-?\d+)_", path.name)
        if match:
            rows.append({"path": str(path), "embryo_id": f"stork-{match[1]}",
                         "focal_plane": int(match[2])})
    if not rows:
        return None
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def pretrain_fold(table: pd.DataFrame, fold: int, work: Path, args: argparse.Namespace
                  ) -> tuple[Path, dict]:
    """Pretrain on everything but `fold` (excluded by the leakage rule); the weights file and
    what the run reported."""
    from embryo_ml.config import load_config
    from embryo_ml.train.pretrain import pretrain
    from embryo_ml.train.pretrain_data import Exclusion

    work.mkdir(parents=True, exist_ok=True)
    weights = work / "pretrained.safetensors"
    info = work / "pretrain.json"
    if weights.is_file() and info.is_file():
        return weights, json.loads(info.read_text())
    splits = work / "held_out.csv"
    table.assign(split=["test" if f == fold else "train" for f in table["fold"]]).to_csv(
        splits, index=False)
    manifest = work / "all_labelled.csv"
    table.drop(columns="fold").to_csv(manifest, index=False)
    cfg = load_config(REPO / "configs" / "default.yaml", [
        "model.pretrained=false", f"model.name={args.model}", f"data.image_size={args.size}",
        f"data.cache_dir={work.parent / 'cache'}", f"seed={args.seed}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        *([f"pretrain.epochs={args.pretrain_epochs}"] if args.pretrain_epochs else []),
        *args.pretrain_set])
    sources: list[Path] = [manifest]
    stork = stork_manifest(work / "stork.csv") if STORK.is_dir() else None
    sources += [stork] if stork else []
    sources += [TIMELAPSE] if TIMELAPSE.is_dir() else []
    started = time.perf_counter()
    result = pretrain(cfg, sources, weights, Exclusion.from_splits(splits), progress=False,
                      resume=(weights.with_name(weights.name + ".resume.pt")).is_file())
    record = result.record
    reported = {"seconds": time.perf_counter() - started, "images": record.images,
                "excluded": record.excluded_images, "epochs": record.epochs,
                "final_loss": record.final_loss, "probe": record.probe,
                "warnings": result.warnings}
    info.write_text(json.dumps(reported, indent=2))
    return weights, reported


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_fold_options(parser, Path("/tmp/embryo-ml-pretrain-real"), folds=3)
    parser.add_argument("--pretrain-epochs", type=int, help="default: pretrain.epochs")
    parser.add_argument("--pretrain-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more pretrain.* overrides")
    args = parser.parse_args(argv)
    import embryo_ml.export.onnx_export  # noqa: F401 - every module this run needs, loaded
    import embryo_ml.train.fit  # noqa: F401 - now: edits to the tree during a long run
    import embryo_ml.train.pretrain  # noqa: F401 - do not mix into later folds
    table = folded_table(args)
    if table is None:
        return 2
    print(f"{len(table)} labelled images, {table['patient_id'].nunique()} duplicate groups, "
          f"{args.folds} folds, {args.model} {args.size} px, {args.epochs} fine-tuning epochs",
          flush=True)
    predictions = Predictions(args.work)
    pretrained: dict[int, dict] = {}
    for fold in args.only_folds if args.only_folds is not None else range(args.folds):
        train, test = table[table["fold"] != fold], table[table["fold"] == fold]
        weights, pretrained[fold] = pretrain_fold(table, fold, args.work / f"pretrain-{fold}",
                                                  args)
        probe = pretrained[fold]["probe"] or {}
        print(f"fold {fold} pretrain: {pretrained[fold]['images']} images "
              f"({pretrained[fold]['excluded']} held out), {pretrained[fold]['seconds']:.0f} s, "
              f"probe AUC {probe.get('auc', math.nan):.3f} (untrained "
              f"{probe.get('random_init_auc', math.nan):.3f})", flush=True)
        for recipe, overrides in (("scratch", []),
                                  ("pretrained", [f"model.pretrained_file={weights}"])):
            if predictions.has(recipe, fold):
                continue
            p, _, seconds = run_toolkit(train, test, overrides,
                                        args.work / f"{recipe}-fold{fold}", args)
            rows = predictions.add(test, p, recipe, seconds)
            print(f"fold {fold} {recipe:<10} auc {scores(rows)['auc']:.3f}  day-5 auc "
                  f"{scores(rows)['day5_auc']:.3f} ({seconds:.0f} s)", flush=True)
    return write_results(args, summarise(predictions.done, args.n_boot, args.seed),
                         pretraining=pretrained)


if __name__ == "__main__":
    raise SystemExit(main())
