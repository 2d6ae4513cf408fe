"""`embryo-ml demo`: the whole pipeline on built-in synthetic embryos, in minutes on a CPU.

synth (training set + a folder of new images) -> train (tracked in a local MLflow store) ->
export (ONNX bundle, parity-checked) -> score the new folder -> print where everything is.
"""

from __future__ import annotations

import os
from pathlib import Path

from embryo_ml.errors import ConfigError

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_TRAIN_IMAGES = 900
DEMO_NEW_IMAGES = 60


def run_demo(
    out: str | os.PathLike[str], config: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, object]:
    from embryo_ml.config import load_config
    from embryo_ml.data.synthetic import generate_dataset

    out = Path(out).resolve()
    config_path = Path(config) if config else REPO_CONFIG
    if not config_path.is_file():
        raise ConfigError(f"demo config not found: {config_path} (pass --config)")
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    cfg = load_config(config_path, [f"tracking.tracking_uri={tracking_uri}",
                                    f"data.cache_dir={out / 'cache'}"])
    out.mkdir(parents=True, exist_ok=True)

    size = max(64, min(256, cfg.data.image_size * 2))
    print(f"[1/4] synthetic data: {DEMO_TRAIN_IMAGES} training images, "
          f"{DEMO_NEW_IMAGES} new images ({size}px)", flush=True)
    manifest = generate_dataset(out / "data", n=DEMO_TRAIN_IMAGES, size=size, seed=cfg.seed,
                                progress=progress)
    generate_dataset(out / "new_images", n=DEMO_NEW_IMAGES, size=size, seed=cfg.seed + 1000)

    from embryo_ml.train.fit import fit

    print(f"[2/4] training {cfg.model.name} for up to {cfg.train.epochs} epochs", flush=True)
    result = fit(cfg, manifest, out / "run", progress=progress)

    from embryo_ml.export.onnx_export import export_bundle

    print("[3/4] exporting the scoring bundle (ONNX, checked against PyTorch)", flush=True)
    bundle = export_bundle(out / "run", out / "bundle")

    from embryo_ml.score.scorer import score_images

    print("[4/4] scoring the folder of new images", flush=True)
    summary = score_images(out / "new_images", out / "bundle", out / "scores.csv",
                           progress=progress)
    auc = result.metrics["val_auc"]
    store = tracking_uri.removeprefix("sqlite:///")
    print()
    print(f"validation ROC AUC: {auc:.3f} on {result.metrics['n_val']} images of held-out "
          f"synthetic patients")
    print(f"scores:        {summary.out} ({summary.n_scored}/{summary.n_images} images scored)")
    print(f"bundle:        {bundle.path}")
    print(f"MLflow run id: {result.run_id}")
    print(f"MLflow store:  {tracking_uri}")
    if tracking_uri.startswith("sqlite:///"):
        print(f"open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{store}")
    return {"val_auc": auc, "scores": summary.out, "bundle": bundle.path,
            "run_id": result.run_id, "tracking_uri": tracking_uri}
