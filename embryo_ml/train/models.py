"""`build_model(cfg)`: a timm backbone with a classification head, weights from hub or file.

Hospital networks are often offline: `pretrained_file` loads local `.safetensors` or `.pth`
weights (with `weights_only=True`, never arbitrary pickle), dropping a classifier head whose shape
does not match our number of classes. `pretrained: true` uses timm's hub weights from the local
Hugging Face or torch-hub cache without any network call when they are there; otherwise it checks
in seconds that the download host answers and turns every failure into one `ConfigError` naming
both remedies, instead of a minute of retries and a huggingface_hub traceback.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import timm
import torch
from timm.models import PretrainedCfg, get_pretrained_cfg
from torch import nn

from embryo_ml.config import ModelConfig
from embryo_ml.errors import ConfigError

log = logging.getLogger(__name__)

WeightsSource = Literal["hub", "file", "none"]
PROBE_TIMEOUT_S = 3.0
_REMEDY = ("use local weights with --set model.pretrained_file=/path/weights.safetensors "
           "or train from scratch with --set model.pretrained=false")
_SAFE_ALTERNATIVES = {"pytorch_model.bin": "model.safetensors",
                      "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"model.pretrained_file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:  # corrupt, truncated, not one
            raise ConfigError(f"cannot load weights from {path}: not a readable safetensors "
                              f"file ({_first_line(error)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle refusals and corrupt files alike
        reason = _first_line(error)
        if "weights only load failed" in reason.lower():  # torch's advice is to unpickle it
            reason = ("not a plain file of tensors (it needs pickle, which is never loaded from "
                      "outside: convert it to .safetensors where it came from)")
        raise ConfigError(f"cannot load weights from {path}: {reason}") from None
    for key in ("state_dict", "model", "model_state"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (torch's weights-only refusal runs to a page)."""
    return next(iter(str(error).strip().splitlines()), "") or error.__class__.__name__


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


def _hub_weights_cfg(name: str) -> PretrainedCfg:
    """timm's registry entry for `name`: it says where the weights live (hf_hub_id or url)."""
    try:
        pretrained_cfg = get_pretrained_cfg(name)
    except RuntimeError as error:  # a tag timm does not know, e.g. resnet18.nope
        raise ConfigError(f"model.name '{name}': {error} Or {_REMEDY}") from None
    if pretrained_cfg is None or not (pretrained_cfg.hf_hub_id or pretrained_cfg.url):
        raise ConfigError(f"model.pretrained: timm has no pretrained weights for '{name}'; pick "
                          f"a model from timm.list_models(pretrained=True), or {_REMEDY}")
    return pretrained_cfg


def cached_weights(pretrained_cfg: PretrainedCfg) -> str | None:
    """The weights file already in the Hugging Face cache (the files timm would fetch, safetensors
    first) or timm's torch-hub cache; found by looking at the disk only, never the network."""
    if pretrained_cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = pretrained_cfg.hf_hub_id.partition("@")
        filename = pretrained_cfg.hf_hub_filename or "pytorch_model.bin"
        safe = _SAFE_ALTERNATIVES.get(filename)
        if safe is None and filename.endswith(".bin"):
            safe = filename.removesuffix(".bin") + ".safetensors"
        for candidate in filter(None, (safe, filename)):
            path = try_to_load_from_cache(repo_id, candidate, revision=revision or None)
            if isinstance(path, str):  # not None and not the cached "does not exist" marker
                return path
    if pretrained_cfg.url:
        filename = Path(urlsplit(pretrained_cfg.url).path).name
        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if checkpoint.is_file():
            return str(checkpoint)
    return None


def _offline_mode() -> bool:
    """huggingface_hub's own switches; they mean "do not even try the network"."""
    return any(os.environ.get(key, "").upper() in {"1", "ON", "YES", "TRUE"}
               for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Does a TCP connection to `url`'s host (or to the HTTPS proxy in between) open within
    `timeout`? It runs in a thread so that a hanging DNS lookup cannot outlast the timeout."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(answered)


def _why_no_download(pretrained_cfg: PretrainedCfg) -> str | None:
    """Why a download cannot work (offline mode, host unreachable), or None: ask before trying,
    because huggingface_hub retries for about a minute before it gives up."""
    if _offline_mode():
        return "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
    if pretrained_cfg.hf_hub_id:  # timm prefers the hub over the url when both exist
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    else:
        endpoint = pretrained_cfg.url
    if not endpoint_reachable(endpoint):
        return f"{urlsplit(endpoint).hostname} cannot be reached (no network?)"
    return None


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _create(cfg: ModelConfig, num_classes: int, pretrained: bool = False,
            overlay: dict[str, Any] | None = None) -> nn.Module:
    return timm.create_model(cfg.name, pretrained=pretrained, num_classes=num_classes,
                             drop_rate=cfg.drop_rate, pretrained_cfg_overlay=overlay)


def _create_with_hub_weights(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Hub weights from the local cache if there, else downloaded once the host answers."""
    pretrained_cfg = _hub_weights_cfg(cfg.name)
    local = cached_weights(pretrained_cfg)
    if local is not None:
        log.info("pretrained weights for %s from the local cache: %s", cfg.name, local)
        overlay = {"file": local, "custom_load": bool(pretrained_cfg.custom_load)}
        try:
            return _create(cfg, num_classes, pretrained=True, overlay=overlay)
        except Exception as error:  # a truncated or corrupt cache file
            raise ConfigError(f"model.pretrained: cannot load the cached weights {local} for "
                              f"'{cfg.name}' ({_short(error)}); {_REMEDY}") from None
    why = _why_no_download(pretrained_cfg)
    if why:
        raise ConfigError(f"model.pretrained: the weights for '{cfg.name}' are not in the local "
                          f"cache and {why}; {_REMEDY}")
    try:
        return _create(cfg, num_classes, pretrained=True)
    except Exception as error:  # huggingface_hub / urllib errors of every kind
        raise ConfigError(f"model.pretrained: downloading the weights for '{cfg.name}' failed "
                          f"({_short(error)}); {_REMEDY}") from None


def build_model_with_source(cfg: ModelConfig, num_classes: int) -> tuple[nn.Module, WeightsSource]:
    """The timm model `cfg.name` with `num_classes` outputs (logits), and where its weights came
    from: "file" (model.pretrained_file, which wins), "hub" (timm's pretrained weights) or "none"
    (random init). Training needs to know whether it fine-tunes or learns from scratch."""
    if cfg.name not in timm.list_models() and not timm.is_model(cfg.name):
        raise ConfigError(f"model.name: unknown timm model '{cfg.name}'")
    if cfg.pretrained_file:
        model = _create(cfg, num_classes)
        load_pretrained_file(model, cfg.pretrained_file)
        return model, "file"
    if cfg.pretrained:
        return _create_with_hub_weights(cfg, num_classes), "hub"
    return _create(cfg, num_classes), "none"


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """`build_model_with_source` without the source, for callers that only need the model."""
    return build_model_with_source(cfg, num_classes)[0]


def model_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from the model's pretrained config: fine-tuning must feed the statistics the
    backbone was trained with."""
    config = timm.data.resolve_data_config({}, model=model)
    return tuple(float(x) for x in config["mean"]), tuple(float(x) for x in config["std"])
