"""Versions of the packages that decide a model's numbers: logged with every training run (MLflow
tags `version.<package>`) and written into every bundle, so a result can be reproduced."""

from __future__ import annotations

import contextlib
from importlib import metadata

PACKAGES = ("embryo-ml", "torch", "torchvision", "timm", "albumentations", "numpy",
            "opencv-python-headless", "pillow", "onnx", "onnxruntime", "mlflow")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed version of each package that is installed (absent ones are left out)."""
    versions = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions
