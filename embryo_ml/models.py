"""`build_model(cfg)`: a timm backbone with a classification head, weights from hub or file.

Hospital networks are often offline: `pretrained_file` loads local `.safetensors` or `.pth`
weights (with `weights_only=True`, never arbitrary pickle), dropping a classifier head whose shape
does not match our number of classes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from embryo_ml.config import ModelConfig
from embryo_ml.errors import ConfigError

log = logging.getLogger(__name__)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"model.pretrained_file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle refusals and corrupt files alike
        raise ConfigError(f"cannot load weights from {path}: {error}") from None
    for key in ("state_dict", "model", "model_state"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def load_pretrained_file(model: nn.Module, path: str | Path) -> None:
    """Load local weights into `model`; keys of mismatched shape (the old head) are skipped."""
    state = _read_state_dict(Path(path))
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    missing = sorted(set(own) - set(usable))
    if not usable:
        raise ConfigError(f"{path}: no weights match model '{type(model).__name__}'")
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s; skipped %d, left %d at init: %s",
             len(usable), path, len(skipped), len(missing), missing[:6])


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Create the timm model `cfg.name` with `num_classes` outputs (logits)."""
    if cfg.name not in timm.list_models() and not timm.is_model(cfg.name):
        raise ConfigError(f"model.name: unknown timm model '{cfg.name}'")
    use_hub = cfg.pretrained and cfg.pretrained_file is None
    model = timm.create_model(
        cfg.name, pretrained=use_hub, num_classes=num_classes, drop_rate=cfg.drop_rate
    )
    if cfg.pretrained_file:
        load_pretrained_file(model, cfg.pretrained_file)
    return model


def model_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from the model's pretrained config: fine-tuning must feed the statistics the
    backbone was trained with."""
    config = timm.data.resolve_data_config({}, model=model)
    return tuple(float(x) for x in config["mean"]), tuple(float(x) for x in config["std"])
