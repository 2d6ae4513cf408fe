"""Which optional install ("extra") a command needs, and the one line that says so.

The base install is the scoring stack (`score`, `report`, `explain`, `data manifest`, `data
check`: numpy, onnxruntime, OpenCV, Pillow, pandas, pyarrow): what a clinic PC needs. Everything
else is an extra, named in `pyproject.toml`:

- `train`: torch, torchvision, timm, albumentations, safetensors, onnx, onnxscript, scikit-learn,
  scipy, matplotlib (training, cross-validation, splits, evaluation, export, augment preview).
- `mlflow`: experiment tracking and the model registry (training logs to MLflow).
- `serve`: the MLflow pyfunc model (`export --log-model`, `mlflow models serve`).
- `all`: everything above; `make demo` and `make test` install `[all,dev]`.

A command that reaches a missing package ends with `error: ... pip install 'embryo-ml[EXTRA]'`
(exit 2) instead of a traceback.
"""

from __future__ import annotations

# top-level import name -> the extra that installs it
EXTRA_OF_MODULE: dict[str, str] = {
    "torch": "train", "torchvision": "train", "timm": "train", "albumentations": "train",
    "safetensors": "train", "onnx": "train", "onnxscript": "train", "sklearn": "train",
    "scipy": "train", "matplotlib": "train", "huggingface_hub": "train",
    "mlflow": "mlflow",
}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The extra that provides the module `error` could not import, or None when it is not one
    of ours (then the error is a real bug and keeps its traceback)."""
    name = (error.name or "").split(".")[0]
    return EXTRA_OF_MODULE.get(name)


def missing_extra_message(error: ModuleNotFoundError, command: str | None) -> str | None:
    """One line for a command that needs an extra that is not installed, else None."""
    extra = missing_extra(error)
    if extra is None:
        return None
    what = f"embryo-ml {command}" if command else "this command"
    return (f"{what} needs the '{extra}' extra ({error.name} is not installed): "
            f"pip install 'embryo-ml[{extra}]'")
