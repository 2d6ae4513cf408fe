"""Rebuild the golden run (pre-refactor reference for `tests/test_golden_scores.py`).

Run from the repository root: `python tests/data/golden/make_golden.py`. It trains the tiny model
three epochs on seeded synthetic images, keeps the run files export reads (image paths made relative
to the data folder) and the scores of that run's exported bundle, fp32 and int8. Rebuild only
when a change is *meant* to alter training or scores, and say so in the commit.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
SEED, N_IMAGES, SIZE = 11, 120, 64
RUN_FILES = ("best.pt", "metrics.json", "quality.json", "val_predictions.csv", "train_images.csv")


def main() -> None:
    from embryo_ml.config import load_config
    from embryo_ml.data.synthetic import generate_dataset
    from embryo_ml.export.onnx_export import export_bundle
    from embryo_ml.score.scorer import score_images

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = generate_dataset(root / "data", n=N_IMAGES, size=SIZE, seed=SEED)
        cfg = load_config(None, [
            "model.name=test_resnet", f"data.image_size={SIZE}", "train.epochs=3",
            "train.batch_size=16", "train.lr=0.003",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            "eval.gate_min_per_class=1000"])
        from embryo_ml.train.fit import fit

        fit(cfg, manifest, root / "run", progress=False)
        export_bundle(root / "run", root / "bundle")
        run_out = HERE / "run"
        run_out.mkdir(exist_ok=True)
        for name in RUN_FILES:
            shutil.copy2(root / "run" / name, run_out / name)
        prefix = str((root / "data").resolve()) + "/"
        for name in ("val_predictions.csv", "train_images.csv"):
            table = pd.read_csv(run_out / name)
            table["path"] = table["path"].str.replace(prefix, "", regex=False)
            table.to_csv(run_out / name, index=False)
        for precision in ("fp32", "int8"):
            out = root / f"scores.{precision}.jsonl"  # full float precision
            score_images(manifest, root / "bundle", out, precision=precision, progress=False)
            scores = pd.read_json(out, lines=True, dtype=False)
            scores["path"] = scores["path"].str.replace(prefix, "", regex=False)
            scores.to_json(HERE / f"scores.{precision}.jsonl", orient="records", lines=True,
                           double_precision=15)


if __name__ == "__main__":
    main()
