"""The golden run: a fixed training-run folder and the scores that the code before the house
refactor (#16, commit 86a2241) gave for it; `tests/test_golden_scores.py` asks today's code for
the same rows.

No model file is kept in git: the run's files here are data (`metrics.json`, `quality.json`,
`val_predictions.csv`, `train_images.csv`, with image paths relative to the data folder, from a
real 3-epoch run of the tiny model) plus `best_pt.json`, that run's `best.pt` without its
weights. `prepare_run` writes `best.pt` from it with seeded weights (the tiny model's own
initialisation under `torch.manual_seed(SEED)`: the same on every machine), in the layout of
checkpoints from before `format_version` existed.

The scores were made by the pre-refactor code, from a checkout of 86a2241:
`PYTHONPATH=/path/to/checkout-of-86a2241 python tests/data/golden/make_golden.py`. Rebuild them
only when a change is *meant* to alter scores, and say so in the commit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
SEED, N_IMAGES, SIZE = 11, 120, 64
RUN_FILES = ("metrics.json", "quality.json", "val_predictions.csv", "train_images.csv")
PATH_TABLES = ("val_predictions.csv", "train_images.csv")  # image paths relative to the data


def write_best_pt(run_dir: Path) -> Path:
    """`run_dir/best.pt`: the recorded checkpoint's fields with seeded initial weights."""
    import timm
    import torch

    checkpoint = json.loads((HERE / "run" / "best_pt.json").read_text(encoding="utf-8"))
    torch.manual_seed(SEED)
    model = timm.create_model(checkpoint["model_name"], pretrained=False,
                              num_classes=len(checkpoint["classes"]))
    path = run_dir / "best.pt"
    torch.save({"state_dict": model.state_dict(), **checkpoint}, path)
    return path


def prepare_run(root: Path) -> tuple[Path, Path]:
    """The seeded synthetic images under `root/data` and the golden run folder `root/run`
    (paths made absolute, `best.pt` written); returns (manifest, run folder)."""
    from embryo_ml.data.synthetic import generate_dataset

    manifest = generate_dataset(root / "data", n=N_IMAGES, size=SIZE, seed=SEED)
    run = root / "run"
    run.mkdir()
    for name in RUN_FILES:
        shutil.copy2(HERE / "run" / name, run / name)
    for name in PATH_TABLES:
        table = pd.read_csv(run / name)
        table["path"] = [str(root / "data" / p) for p in table["path"]]
        table.to_csv(run / name, index=False)
    write_best_pt(run)
    return manifest, run


def relative_scores(out: Path, manifest: Path) -> pd.DataFrame:
    """A JSON Lines scores file with its image paths relative to the data folder."""
    scores = pd.read_json(out, lines=True, dtype=False)
    prefix = str(manifest.parent.resolve()) + "/"
    scores["path"] = scores["path"].str.replace(prefix, "", regex=False)
    return scores


def main() -> None:
    import tempfile

    from embryo_ml.export.onnx_export import export_bundle
    from embryo_ml.score.scorer import score_images

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, run = prepare_run(root)
        export_bundle(run, root / "bundle")
        for precision in ("fp32", "int8"):
            out = root / f"scores.{precision}.jsonl"  # full float precision
            score_images(manifest, root / "bundle", out, precision=precision, progress=False)
            relative_scores(out, manifest).to_json(
                HERE / f"scores.{precision}.jsonl", orient="records", lines=True,
                double_precision=15)


if __name__ == "__main__":
    main()
