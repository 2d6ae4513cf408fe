"""The `pretrain` command: self-supervised pretraining on unlabelled images
(`embryo_ml.train.pretrain`), writing weights that `train` loads with `model.pretrained_file`."""

from __future__ import annotations

import argparse
from pathlib import Path

from embryo_ml.cli.common import add_overrides, show_progress, warn

PRETRAINED_FILE = Path("pretrained.safetensors")  # `pretrain --out`


def add_pretrain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path,
                        help="folders (every image under them) or manifest CSVs; labels are "
                        "ignored, except by the linear probe at the end")
    parser.add_argument("--config", type=Path, help="YAML recipe: model.* and data.* as for "
                        "train (the same backbone and size), pretrain.* for this command")
    parser.add_argument("--out", type=Path, default=PRETRAINED_FILE,
                        help="weights file to write (.safetensors); for train: --set "
                        "model.pretrained_file=OUT")
    parser.add_argument("--exclude-splits", type=Path, metavar="SPLITS_CSV",
                        help="leave out every image, patient and embryo of these splits of a "
                        "`data split` file (or of every row of any manifest): the patients a "
                        "fine-tuned model will be evaluated on")
    parser.add_argument("--exclude-split", nargs="+", default=["test"], metavar="NAME",
                        help="which splits of --exclude-splits to leave out")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from OUT.resume.pt (same MLflow run)")
    add_overrides(parser)
    parser.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from embryo_ml.config import load_config

    cfg = load_config(args.config, args.set)  # fails here, before any import of torch
    from embryo_ml.train.pretrain import pretrain
    from embryo_ml.train.pretrain_data import Exclusion

    exclusion = (Exclusion.from_splits(args.exclude_splits, args.exclude_split)
                 if args.exclude_splits else None)
    result = pretrain(cfg, args.images, args.out, exclusion, resume=args.resume,
                      progress=show_progress(args))
    record = result.record
    print(f"pretrained {record.model_name} at {record.image_size} px on {record.images} images"
          + (f" ({record.excluded_images} excluded)" if record.excluded_images else "")
          + f": final loss {record.final_loss:.4f}, output spread {record.output_spread:.3f}")
    if record.probe:
        print(f"linear probe ({int(record.probe['images'])} labelled images, "
              f"{int(record.probe['folds'])} grouped folds): ROC AUC {record.probe['auc']:.3f} "
              f"(untrained network: {record.probe['random_init_auc']:.3f})")
    for text in result.warnings:
        warn(text)
    print(f"weights: {result.weights}  (train with --set model.pretrained_file={result.weights})")
    if result.run_id:
        print(f"MLflow run id: {result.run_id}")
    return 0
