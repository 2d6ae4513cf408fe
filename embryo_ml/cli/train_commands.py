"""The model-building commands: `synth`, `train`, `cv`, `evaluate`, `augment-preview`, `demo`.

Each `add_*` fills in one command's options (defaults read from the library function it calls)
and each `run_*` calls that function and prints the outcome. Torch, mlflow and albumentations
are imported inside, only by the command that needs them.
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime
from pathlib import Path

from embryo_ml.cli.common import (
    add_library_options,
    add_overrides,
    default_of,
    positive,
    show_progress,
    warn,
)
from embryo_ml.errors import EmbryoMLError

SYNTH_IMAGES = 1000  # `synth --n`: a data set big enough to train on
PREVIEW_FILE = Path("augment_preview.png")  # `augment-preview --out`
DEMO_FOLDER = Path("demo_out")  # `demo --out`


def _timestamped(prefix: str = "") -> Path:
    """runs/<prefix><timestamp>: the default folder of a training or cross-validation run."""
    return Path("runs") / (prefix + datetime.now().strftime("%Y%m%d-%H%M%S"))


def add_synth(parser: argparse.ArgumentParser) -> None:
    from embryo_ml.data.synthetic import generate_dataset

    parser.add_argument("out", type=Path,
                        help="folder to write: images/<label>/*.png and manifest.csv")
    parser.add_argument("--n", type=positive, default=SYNTH_IMAGES, help="number of images")
    add_library_options(
        parser, generate_dataset,
        ("--size", "size", int, "image side in pixels (64-256)"),
        ("--seed", "seed", int, "random seed: the same arguments write byte-identical files"),
        ("--focal-planes", "focal_planes", positive, "images per embryo"))
    parser.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from embryo_ml.data.synthetic import generate_dataset

    manifest = generate_dataset(args.out, n=args.n, size=args.size, seed=args.seed,
                                focal_planes=args.focal_planes, progress=show_progress(args))
    print(f"wrote {args.n} images and {manifest}")
    return 0


def _resumed_data(run_dir: Path) -> str:
    """The data an interrupted run trained on, as its run.json records it."""
    import json

    from embryo_ml.train.run_folder import RUN_RECORD_FILE

    try:
        record = json.loads((run_dir / RUN_RECORD_FILE).read_text(encoding="utf-8"))
    except ValueError as error:  # not JSON, not UTF-8
        raise EmbryoMLError(f"--resume {run_dir}: {RUN_RECORD_FILE} is damaged ({error}); pass "
                            "the training data with --data") from None
    data = record.get("data") if isinstance(record, dict) else None
    if not isinstance(data, str) or not data:
        raise EmbryoMLError(f"--resume {run_dir}: {RUN_RECORD_FILE} names no training data; "
                            "pass it with --data")
    return data


def add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML recipe (e.g. configs/demo.yaml)")
    parser.add_argument("--data", type=Path, help="manifest CSV or folder-per-class tree")
    parser.add_argument("--out", type=Path, help="run folder (default runs/<timestamp>)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue an interrupted run from its last.pt (same MLflow run)")
    parser.add_argument("--register", metavar="NAME",
                        help="after training, export the bundle, log it as an MLflow model and "
                        "register it under NAME with alias 'candidate'")
    add_overrides(parser)
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from embryo_ml.config import load_config

    data = args.data
    if args.resume:
        # The run's own resolved config and data; --set may still change e.g. train.epochs.
        from embryo_ml.train.run_folder import CONFIG_FILE, LAST_FILE, RUN_RECORD_FILE

        run_dir = args.resume
        if not (run_dir / LAST_FILE).is_file() or not (run_dir / RUN_RECORD_FILE).is_file():
            raise EmbryoMLError(f"--resume {run_dir}: not an interrupted training run "
                                f"(no {LAST_FILE} / {RUN_RECORD_FILE})")
        cfg = load_config(run_dir / CONFIG_FILE, args.set)
        data = data or _resumed_data(run_dir)
    else:
        cfg = load_config(args.config, args.set)  # fails here, before any import of torch
        if args.out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise EmbryoMLError("under torchrun, pass --out RUN_DIR (every process must write "
                                "to the same run folder)")
        run_dir = args.out or _timestamped()
    from embryo_ml.train.fit import fit, print_verdict

    result = fit(cfg, data, run_dir, progress=show_progress(args), resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # DDP: rank 0 reports
    metrics = result.metrics
    print(f"validation ROC AUC {metrics['val_auc']:.4f} "
          f"(best epoch {metrics['best_epoch']}, {metrics['n_val']} images)")
    within = {k: v for k, v in metrics.items()
              if k.startswith("val_within_") and isinstance(v, float)}
    if within:  # what matters for choosing among one patient's embryos (docs/evaluation.md)
        print("  " + ", ".join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}"
                               for k, v in within.items()))
    for warning in metrics.get("shortcut_warnings") or []:
        print(f"  WARNING: {warning.removeprefix('WARNING: ')}")
    for warning in (metrics.get("pretraining") or {}).get("warnings", []):
        print(f"  WARNING: {warning}")
    print_verdict(metrics)
    print(f"run folder: {result.run_dir}")
    print(f"MLflow run id: {result.run_id}")
    if args.register:
        _register_trained(result.run_dir, result.run_id, result.tracking_uri, args.register)
    return 0


def _register_trained(run_dir: Path, run_id: str, tracking_uri: str, name: str) -> None:
    """`train --register`: what gets registered is always the scorable model, so the run's
    best checkpoint is exported (RUN/bundle, parity-checked) and logged as the pyfunc model.
    A run that failed its validation check is refused first; its folder stays as it is."""
    from embryo_ml.export.gate import check_registrable, export_warning, run_validation

    validation = run_validation(run_dir)
    check_registrable(validation, run_dir)
    from embryo_ml.export.onnx_export import export_bundle
    from embryo_ml.serving.pyfunc import log_bundle_model

    bundle = export_bundle(run_dir, run_dir / "bundle")
    warn(export_warning(validation, run_dir))
    logged = log_bundle_model(bundle.path, run_id=run_id, registered_name=name,
                              tracking_uri=tracking_uri)
    print(f"bundle: {bundle.path}")
    print(f"registered model {name!r} version {logged.version}, alias {logged.alias!r} "
          f"(models:/{name}@{logged.alias})")


def add_cv(parser: argparse.ArgumentParser) -> None:
    from embryo_ml.data.splits import make_splits

    parser.add_argument("--config", type=Path, help="YAML recipe (e.g. configs/demo.yaml)")
    parser.add_argument("--data", type=Path,
                        help="manifest CSV or folder-per-class tree (default: data.manifest)")
    parser.add_argument("--folds", type=int, default=default_of(make_splits, "folds"),
                        help="number of patient-grouped folds")
    parser.add_argument("--splits", type=Path, help="splits.csv from `data split` (its folds)")
    parser.add_argument("--out", type=Path, help="folder (default runs/cv-<timestamp>)")
    add_overrides(parser)
    parser.set_defaults(func=run_cv)


def run_cv(args: argparse.Namespace) -> int:
    from embryo_ml.config import load_config

    cfg = load_config(args.config, args.set)
    data = args.data or cfg.data.manifest
    if data is None:
        raise EmbryoMLError("no data: pass --data or set data.manifest")
    from embryo_ml.train.cv import cross_validate, format_summary
    from embryo_ml.train.run_folder import OOF_PREDICTIONS_FILE

    out = args.out or _timestamped("cv-")
    result = cross_validate(cfg, data, args.folds, out, args.splits, progress=show_progress(args))
    print(format_summary(result.summary, result.evaluation))
    print(f"out-of-fold predictions: {out / OOF_PREDICTIONS_FILE}")
    print(f"MLflow parent run id: {result.parent_run_id}")
    return 0


def add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scores", type=Path,
                        help="scores file from `score` (.csv/.jsonl/.parquet)")
    parser.add_argument("--labels", type=Path, required=True,
                        help="manifest CSV with the labels (and subgroup columns, patient_id, "
                        "grade)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for metrics.json, subgroup_metrics.csv and the PNG plots")
    parser.add_argument("--config", type=Path,
                        help="YAML recipe: eval.*, data.positive_class, labels.*")
    parser.add_argument("--images", type=Path, default=None,
                        help="the folder (or manifest CSV) that was scored: score paths are "
                        "relative to it (default: the scores file's folder)")
    parser.add_argument("--train-labels", type=Path, default=None, metavar="MANIFEST",
                        help="the training manifest: fit the shortcut baselines on it (default: "
                        "on the evaluated rows themselves)")
    add_overrides(parser)
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from embryo_ml.config import load_config

    cfg = load_config(args.config, args.set)
    from embryo_ml.evaluation.scores import evaluate_scores, format_counts

    result = evaluate_scores(args.scores, args.labels, args.out, cfg, images=args.images,
                             train_labels=args.train_labels)
    print(format_counts(result.counts))
    for note in result.notes:
        print(f"note: {note}")
    print(result.evaluation.format())
    print(f"wrote {len(result.files)} files to {result.out_dir} (metrics.json, "
          "subgroup_metrics.csv, plots)")
    return 0


def add_augment_preview(parser: argparse.ArgumentParser) -> None:
    from embryo_ml.report.preview import augment_preview

    parser.add_argument("config", type=Path, help="YAML recipe whose augmentations are drawn")
    parser.add_argument("--data", type=Path, required=True,
                        help="manifest CSV or folder-per-class tree to take the images from")
    parser.add_argument("--out", type=Path, default=PREVIEW_FILE, help="the PNG grid to write")
    add_library_options(
        parser, augment_preview,
        ("--count", "n_images", positive, "number of images: one row each"),
        ("--draws", "n_aug", positive, "training augmentations drawn per image, beside the "
         "original"))
    add_overrides(parser)
    parser.set_defaults(func=run_augment_preview)


def run_augment_preview(args: argparse.Namespace) -> int:
    from embryo_ml.config import load_config

    cfg = load_config(args.config, args.set)
    from embryo_ml.report.preview import augment_preview

    out = augment_preview(cfg, args.data, args.out, args.count, args.draws)
    print(f"wrote {out}: each row one image, the original first, then {args.draws} "
          "training augmentations")
    return 0


def add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEMO_FOLDER,
                        help="folder for the data, the run, the bundle and the scores")
    parser.add_argument("--config", type=Path, default=None, help="default: configs/demo.yaml")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from embryo_ml.demo import run_demo as demo

    demo(args.out, config=args.config, progress=show_progress(args))
    return 0
