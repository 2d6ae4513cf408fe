#!/usr/bin/env python
"""Does the training recipe learn on real embryo images? Grouped cross-validation at equal epochs.

Data: `../shared/data/stage-grade` (450 real EmbryoScope-like images, 9 folders: stage 8-cell /
morula / blastocyst x grade A/B/C). Label: `good` = grade A or B, `poor` = grade C (300 vs 150).
The stage is the `day` column (8-cell = 3, morula = 4, blastocyst = 5): as on clinic data, the
model must rank embryos of one stage, not tell stages apart. The set holds exact and near
duplicates under different names: every duplicate group (found by `embryo_ml.data.check`) is one
`patient_id`, so copies never sit on both sides of a split.

Each fold's held-out images are scored by each recipe's model, trained on the other folds:
- `old`: `configs/default.yaml` from scratch as it behaved before the recipe fix
  (`train.adapt_to_weights=false`: frozen random backbone for one epoch, backbone lr 1e-4;
  `train.ema_warmup=false`: a fixed EMA decay of 0.998; `train.select_within_se=false`: the
  best epoch by maximum; zoom, shift and photometric augmentation). The selection metric is
  today's (pair-weighted) and warm-up epochs are never chosen.
- `rules+photometric`: today's rules with the old photometric augmentation.
- `default`: `configs/default.yaml` from scratch today (rules, EMA warm-up, one-SE choice,
  geometric augmentation only).
- `refit`: the same plus `train.refit=true` (retrained on all training-fold images).
- `fixed-size`: the default with every epoch at full size (`train.progressive_resize=1`, the
  default before progressive resizing); `resize-0.5`: the first epoch at half the side.
- `day-only`: no model, the training folds' share of good embryos on the image's day (the
  baseline a model must beat when the day predicts the label, as with `--clinic-skew`).
- `plain`: a plain timm + torchvision loop written here (AdamW 1e-3, cosine, flips + any-angle
  rotation, cross-entropy, all training-fold images, last epoch), the loop a tutorial writes.
All use resnet18, no pretrained weights, the same size and number of epochs.

A toolkit recipe's held-out scores are those `embryo-ml score` gives for a manifest with the
day: the run's temperature and, where the run fit one, its day prior
(`embryo_ml.evaluation.prior`: only where the day predicts the label, as with `--clinic-skew`).
Then the same model's scores from the image alone are reported too, as `<recipe> (image alone)`.

Reported per recipe: held-out ROC AUC, within-stage AUC pooled over same-stage pairs, and the
blastocyst-only ("day 5") AUC, as mean over folds with a 95% interval from a patient bootstrap
of the pooled out-of-fold predictions.

    python benchmarks/recipe_real.py                      # 5 folds, 10 epochs, 128 px (~1 h)
    python benchmarks/recipe_real.py --folds 3 --recipes default plain --json recipe.json
    python benchmarks/recipe_real.py --clinic-skew --drop-grades B --recipes default plain \
        --try seed1:seed=1 --plain-seeds 1          # grade A vs C, two seeds of each
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from bench_common import plain_training

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBRYO_ML_SHARED_DATA", REPO.parent / "shared" / "data"))
DATA = SHARED / "stage-grade" / "data"
STAGE_DAY = {"8C": 3, "Mo": 4, "BL": 5}
# --clinic-skew: the share of good embryos per day after dropping good 8-cell and morula images,
# so that, as in a clinic, the day alone predicts the label (day-only AUC about 0.7)
SKEWED_GOOD_SHARE = {3: 0.2, 4: 0.4}
# default.yaml's augmentation before it became geometric only
PHOTOMETRIC = ["augment.brightness=0.15", "augment.contrast=0.15", "augment.gamma=0.15",
               "augment.blur_p=0.15", "augment.noise_p=0.15", "augment.scale=0.1",
               "augment.shift=0.05"]
RECIPES = {
    "old": ["train.adapt_to_weights=false", "train.ema_warmup=false",
            "train.select_within_se=false", *PHOTOMETRIC],
    "rules+photometric": PHOTOMETRIC,  # the recipe rules, with the old augmentation
    "default": [],
    "refit": ["train.refit=true"],
    "fixed-size": ["train.progressive_resize=1"],  # every epoch at full size (before 2026-12-01)
    "resize-0.5": ["train.progressive_resize=0.5"],  # a lower first side than default's 0.625
    "unregularised": ["loss.label_smoothing=0", "model.drop_rate=0"],
}


def stage_grade_manifest(root: Path, out: Path) -> Path:
    """The manifest described in the module text; returns its path."""
    from embryo_ml.data.check import check_data

    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        stage, _, grade = folder.name.split(" ")
        for image in sorted(folder.iterdir()):
            rows.append({"path": str(image), "label": "poor" if grade == "C" else "good",
                         "day": STAGE_DAY[stage], "grade_letter": grade})
    table = pd.DataFrame(rows)
    report = check_data(table)
    group = {p: p for p in table["path"]}
    for members in [*report.exact_duplicates, *report.near_duplicates]:
        for path in members:
            group[path] = members[0]
    codes = {g: f"G{i:04d}" for i, g in enumerate(sorted(set(group.values())))}
    table["patient_id"] = [codes[group[p]] for p in table["path"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    return out


def clinic_skew(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """`table` less a seeded random set of good day-3/day-4 duplicate groups, leaving the good
    share of each day at `SKEWED_GOOD_SHARE` (blastocysts are all kept)."""
    rng = np.random.default_rng(seed)
    dropped: list[str] = []
    for day, share in SKEWED_GOOD_SHARE.items():
        rows = table[table["day"] == day]
        poor = int((rows["label"] == "poor").sum())
        keep = round(share * poor / (1 - share))
        groups = rows.loc[rows["label"] == "good", "patient_id"].unique()
        dropped += list(rng.permutation(groups)[keep:])
    return table[~table["patient_id"].isin(dropped)].reset_index(drop=True)


def folds_of(table: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.zeros(len(table), dtype=int)
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    strata = table["label"] + table["day"].astype(str)
    for k, (_, held) in enumerate(splitter.split(table, strata, table["patient_id"])):
        fold[held] = k
    return fold


def run_toolkit(train: pd.DataFrame, test: pd.DataFrame, overrides: list[str], work: Path,
                args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, float]:
    """Train with `configs/default.yaml` + overrides on `train`; p(good) on `test` as
    `embryo-ml score` computes it from a manifest with the day (the run's temperature and day
    prior, when it has one), and from the image alone."""
    import json

    import torch

    from embryo_ml.config import load_config
    from embryo_ml.data.images import read_image
    from embryo_ml.data.preprocess import decode_side
    from embryo_ml.data.transforms import build_eval_transform
    from embryo_ml.evaluation.prior import apply_prior, prior_value, two_class_margin
    from embryo_ml.export.onnx_export import load_run_model
    from embryo_ml.train.fit import fit

    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "train.csv"
    train.to_csv(manifest, index=False)
    cfg = load_config(REPO / "configs" / "default.yaml", [
        "model.pretrained=false", f"model.name={args.model}", f"data.image_size={args.size}",
        f"train.epochs={args.epochs}", f"data.cache_dir={work.parent / 'cache'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.log_checkpoint=false",
        f"seed={args.seed}", *overrides])
    started = time.perf_counter()
    fit(cfg, manifest, work / "run", progress=False)
    seconds = time.perf_counter() - started
    model, checkpoint = load_run_model(work / "run")
    transform = build_eval_transform(checkpoint["image_size"], checkpoint["mean"],
                                     checkpoint["std"])
    batch = np.stack([transform(image=read_image(p, min_side=decode_side(args.size)))["image"]
                      .transpose(2, 0, 1) for p in test["path"]])
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()
    good = checkpoint["classes"].index("good")
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    image_alone = _softmax(logits / metrics["temperature"])
    scored = image_alone
    if metrics.get("prior"):
        scored = apply_prior(image_alone, two_class_margin(logits, good),
                             [prior_value(v) for v in test["day"]], metrics["prior"], good)[0]
    return scored[:, good], image_alone[:, good], seconds


def run_plain(train: pd.DataFrame, test: pd.DataFrame, args: argparse.Namespace,
              seed: int | None = None) -> tuple[np.ndarray, float]:
    """The plain loop of the module text, its random stream from `seed` (else --seed)."""
    import timm
    import torch
    from PIL import Image
    from torchvision import transforms as T

    torch.manual_seed(args.seed if seed is None else seed)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train_tf = T.Compose([T.Resize((args.size, args.size)), T.RandomHorizontalFlip(),
                          T.RandomVerticalFlip(), T.RandomRotation(180), T.ToTensor(),
                          T.Normalize(mean, std)])
    test_tf = T.Compose([T.Resize((args.size, args.size)), T.ToTensor(), T.Normalize(mean, std)])

    class Images(torch.utils.data.Dataset):
        def __init__(self, frame: pd.DataFrame, tf: Any) -> None:
            self.paths, self.tf = frame["path"].tolist(), tf
            self.y = (frame["label"] == "good").astype(int).tolist()

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int) -> tuple[Any, int]:
            return self.tf(Image.open(self.paths[i]).convert("RGB")), self.y[i]

    loader = torch.utils.data.DataLoader(Images(train, train_tf), batch_size=32, shuffle=True,
                                         drop_last=True)  # a batch of 1 breaks BatchNorm
    model = timm.create_model(args.model, num_classes=2)
    started = time.perf_counter()
    plain_training(model, loader, args.epochs)
    seconds = time.perf_counter() - started
    model.eval()
    test_loader = torch.utils.data.DataLoader(Images(test, test_tf), batch_size=64)
    with torch.inference_mode():
        logits = np.concatenate([model(images).numpy() for images, _ in test_loader])
    return _softmax(logits)[:, 1], seconds


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def scores(frame: pd.DataFrame) -> dict[str, float]:
    """AUC, pooled within-stage AUC and blastocyst AUC of one set of predictions."""
    from embryo_ml.evaluation.metrics import roc_auc
    from embryo_ml.evaluation.subgroups import pooled_group_auc

    y, p = frame["label"].eq("good").to_numpy(), frame["p"].to_numpy(float)
    day5 = frame["day"].eq(5).to_numpy()
    return {"auc": float(roc_auc(y, p)[0]),
            "within_stage_auc": pooled_group_auc(y, p, frame["day"].to_numpy(object))[0],
            "day5_auc": float(roc_auc(y[day5], p[day5])[0])}


def interval(frame: pd.DataFrame, n_boot: int, seed: int) -> dict[str, list[float]]:
    """95% intervals of `scores` over patient (duplicate-group) bootstrap resamples."""
    rng = np.random.default_rng(seed)
    groups = frame["patient_id"].to_numpy()
    unique = np.unique(groups)
    index = {g: np.flatnonzero(groups == g) for g in unique}
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        rows = np.concatenate([index[g] for g in rng.choice(unique, len(unique))])
        for key, value in scores(frame.iloc[rows]).items():
            draws.setdefault(key, []).append(value)
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
            for k, v in draws.items()}


def add_fold_options(parser: argparse.ArgumentParser, work: Path, folds: int) -> None:
    """The options of a grouped cross-validation on stage-grade (this script's and
    `pretrain_real.py`'s)."""
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=work)
    parser.add_argument("--folds", type=int, default=folds)
    parser.add_argument("--only-folds", type=int, nargs="*", help="run these fold indices only")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--clinic-skew", action="store_true",
                        help="drop good 8-cell and morula images so that the day predicts the "
                             f"label, as in a clinic (good share per day {SKEWED_GOOD_SHARE})")
    parser.add_argument("--drop-grades", nargs="*", default=[], choices=["A", "B", "C"],
                        help="leave out these grades (B: grade A vs C, a clearer difference "
                             "than A/B vs C, so the models have more to learn within a day)")


def folded_table(args: argparse.Namespace) -> pd.DataFrame | None:
    """The stage-grade manifest with a `fold` column; None (said on stderr) without the data."""
    if not args.data.is_dir():
        print(f"error: {args.data} not found (the real samples live in ../shared/data)",
              file=sys.stderr)
        return None
    table = pd.read_csv(stage_grade_manifest(args.data, args.work / "manifest.csv"))
    table = table[~table["grade_letter"].isin(args.drop_grades)].reset_index(drop=True)
    if args.clinic_skew:
        table = clinic_skew(table, args.seed)
    table["fold"] = folds_of(table, args.folds, args.seed)
    return table


class Predictions:
    """The held-out predictions so far, in WORK/predictions.csv: a rerun skips finished
    (recipe, fold) pairs."""

    def __init__(self, work: Path) -> None:
        self.path = work / "predictions.csv"
        self.done = pd.read_csv(self.path) if self.path.is_file() else pd.DataFrame()

    def has(self, recipe: str, fold: int) -> bool:
        done = self.done
        return bool(len(done) and ((done["recipe"] == recipe) & (done["fold"] == fold)).any())

    def add(self, test: pd.DataFrame, p: np.ndarray, recipe: str, seconds: float
            ) -> pd.DataFrame:
        """Keep (and write) `recipe`'s predictions `p` for the `test` rows; returns them."""
        rows = test.assign(p=p, recipe=recipe, seconds=seconds)
        self.done = pd.concat([self.done, rows], ignore_index=True)
        self.done.to_csv(self.path, index=False)
        return rows


def write_results(args: argparse.Namespace, results: dict[str, dict[str, Any]],
                  **extra: Any) -> int:
    """The JSON (`--json`) of the settings, `extra` and `results`; the exit status."""
    if args.json:
        import json

        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         **extra, "results": results}, indent=2))
    return 0 if all(math.isfinite(r["auc"]) for r in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_fold_options(parser, Path("/tmp/embryo-ml-recipe-real"), folds=5)
    parser.add_argument("--recipes", nargs="+", default=["old", "default", "plain"],
                        choices=[*RECIPES, "plain", "day-only"])
    parser.add_argument("--try", dest="trials", nargs="+", default=[], metavar="NAME:KEY=V,...",
                        help="also run a recipe of your own: default.yaml plus these overrides")
    parser.add_argument("--plain-seeds", nargs="+", type=int, default=[], metavar="SEED",
                        help="also run the plain loop from these training seeds, as `plain-sSEED` "
                             "(to set a seed spread of the baseline beside `--try NAME:seed=N`)")
    args = parser.parse_args(argv)
    recipes = dict(RECIPES)
    plain_seeds = {"plain": None, **{f"plain-s{seed}": seed for seed in args.plain_seeds}}
    args.recipes += [name for name in plain_seeds if name != "plain"]
    for trial in args.trials:
        name, _, overrides = trial.partition(":")
        recipes[name] = [o for o in overrides.split(",") if o]
        args.recipes.append(name)
    table = folded_table(args)
    if table is None:
        return 2
    print(f"{len(table)} images, {table['patient_id'].nunique()} duplicate groups, "
          f"{args.folds} folds, {args.model} {args.size} px, {args.epochs} epochs", flush=True)
    predictions = Predictions(args.work)
    for fold in args.only_folds if args.only_folds is not None else range(args.folds):
        train, test = table[table["fold"] != fold], table[table["fold"] == fold]
        for recipe in args.recipes:
            if predictions.has(recipe, fold):
                continue  # resumable: this fold of this recipe is already in predictions.csv
            if recipe in plain_seeds:  # the plain loop, from --seed or a --plain-seeds seed
                p, seconds = run_plain(train, test, args, plain_seeds[recipe])
            elif recipe == "day-only":  # the good share of the test image's day in training
                p, seconds = test["day"].map(train.groupby("day")["label"].apply(
                    lambda labels: (labels == "good").mean())).to_numpy(float), 0.0
            else:
                p, alone, seconds = run_toolkit(train, test, recipes[recipe],
                                                args.work / f"{recipe}-fold{fold}", args)
                if not np.allclose(p, alone):  # a day prior applied: keep the image alone too
                    predictions.add(test, alone, f"{recipe} (image alone)", seconds)
            rows = predictions.add(test, p, recipe, seconds)
            print(f"fold {fold} {recipe:<8} auc {scores(rows)['auc']:.3f}  "
                  f"({seconds:.0f} s)", flush=True)
    return write_results(args, summarise(predictions.done, args.n_boot, args.seed))


def summarise(done: pd.DataFrame, n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per recipe: mean of the per-fold scores, bootstrap intervals of the pooled out-of-fold
    predictions, per-fold figures and training seconds; printed as a table."""
    results: dict[str, dict[str, Any]] = {}
    print(f"\n{'recipe':<11} {'folds':>5}  {'held-out AUC':<22} {'within-stage AUC':<22} "
          f"{'blastocyst AUC':<22} train s/fold")
    for recipe, frame in done.groupby("recipe", sort=False):
        per_fold = pd.DataFrame([scores(f) for _, f in frame.groupby("fold")])
        ci = interval(frame, n_boot, seed)
        results[recipe] = {"folds": int(frame["fold"].nunique()),
                           **{k: float(per_fold[k].mean()) for k in per_fold},
                           **{f"{k}_ci": v for k, v in ci.items()},
                           "per_fold": per_fold.to_dict(orient="list"),
                           "seconds_per_fold": float(frame.groupby("fold")["seconds"].first()
                                                     .mean())}
        cells = [f"{results[recipe][k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]"
                 for k in ("auc", "within_stage_auc", "day5_auc")]
        print(f"{recipe:<11} {results[recipe]['folds']:>5}  " + " ".join(f"{c:<22}" for c in cells)
              + f" {results[recipe]['seconds_per_fold']:.0f}")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
