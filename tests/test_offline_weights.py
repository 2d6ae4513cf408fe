"""`model.pretrained: true` without network: weights come from the local caches, or one clear
`ConfigError` arrives within seconds naming both remedies; and the builder says which weights
it used ("hub", "file", "none")."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from embryo_ml.cli import main
from embryo_ml.config import ModelConfig
from embryo_ml.errors import ConfigError
from embryo_ml.train import models
from embryo_ml.train.models import build_model, build_model_with_source

MODEL = "resnet10t"  # ~5M parameters, has timm hub weights (timm/resnet10t.c3_in1k)
HF_REPO = "timm/resnet10t.c3_in1k"
REMEDIES = ("model.pretrained_file", "model.pretrained=false")


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the Hugging Face and torch-hub caches at empty folders; returns the HF hub cache.
    huggingface_hub reads HF_HUB_CACHE at import time, so its constant is patched as well."""
    hf_cache = tmp_path / "hf" / "hub"
    hf_cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return hf_cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (or to probe) fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network used: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(models, "endpoint_reachable", refuse)


def _donor_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    donor = timm.create_model(MODEL, num_classes=1000)  # the pretrained config's head size
    return {k: v.contiguous() for k, v in donor.state_dict().items()}


def _assert_backbone_equals(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    backbone = [k for k in weights if not k.startswith("fc.")]
    assert len(backbone) > 20 and all(torch.equal(state[k], weights[k]) for k in backbone)
    assert model.get_classifier().out_features == 2


@pytest.mark.parametrize("offline", ["unreachable", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_not_cached_and_offline_fails_fast_naming_both_remedies(
        offline: str, empty_caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[str] = []

    def unreachable(url: str, timeout: float = 3.0) -> bool:
        probed.append(url)
        return False

    monkeypatch.setattr(models, "endpoint_reachable", unreachable)
    if offline != "unreachable":
        monkeypatch.setenv(offline, "1")
    start = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        build_model(ModelConfig(name=MODEL, pretrained=True), num_classes=2)
    assert time.monotonic() - start < 5.0
    message = str(caught.value)
    assert all(remedy in message for remedy in REMEDIES) and MODEL in message
    assert "\n" not in message
    assert probed == (["https://huggingface.co"] if offline == "unreachable" else [])


def test_probe_reports_a_closed_port_quickly() -> None:
    with socket.socket() as server:  # a port that was bound and released: nobody listens
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
    start = time.monotonic()
    assert models.endpoint_reachable(f"http://127.0.0.1:{port}", timeout=1.0) is False
    assert time.monotonic() - start < 2.0
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert models.endpoint_reachable(f"http://127.0.0.1:{server.getsockname()[1]}") is True


def test_download_error_becomes_one_config_error(empty_caches: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_download(*args: object, **kwargs: object) -> str:
        raise OSError("Connection reset by peer\nsecond line of a long traceback")

    monkeypatch.setattr(models, "endpoint_reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", broken_download)
    with pytest.raises(ConfigError) as caught:
        build_model(ModelConfig(name=MODEL, pretrained=True), num_classes=2)
    message = str(caught.value)
    assert "OSError: Connection reset by peer" in message and "second line" not in message
    assert MODEL in message and all(remedy in message for remedy in REMEDIES)


def test_model_without_pretrained_weights_is_a_config_error(no_network: None) -> None:
    with pytest.raises(ConfigError, match="no pretrained weights for 'resnetblur18'"):
        build_model(ModelConfig(name="resnetblur18", pretrained=True), num_classes=2)
    with pytest.raises(ConfigError, match="Invalid pretrained tag"):
        build_model(ModelConfig(name=f"{MODEL}.nope", pretrained=True), num_classes=2)


@pytest.mark.parametrize("cache", ["huggingface", "torch-hub"])
def test_cached_weights_load_without_network(cache: str, empty_caches: Path, tmp_path: Path,
                                             no_network: None) -> None:
    weights = _donor_weights()
    if cache == "huggingface":  # the layout hf_hub_download leaves behind
        repo = empty_caches / f"models--{HF_REPO.replace('/', '--')}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        save_file(weights, str(repo / "snapshots" / commit / "model.safetensors"))
    else:  # timm's url download, named after the url's file
        url = timm.models.get_pretrained_cfg(MODEL).url
        checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
        checkpoints.mkdir(parents=True)
        torch.save(weights, checkpoints / Path(url).name)
    start = time.monotonic()
    model, source = build_model_with_source(ModelConfig(name=MODEL, pretrained=True), 2)
    assert source == "hub" and time.monotonic() - start < 10.0
    _assert_backbone_equals(model, weights)


def test_source_is_file_or_none(tmp_path: Path, no_network: None) -> None:
    weights = _donor_weights(seed=2)
    save_file(weights, str(tmp_path / "w.safetensors"))
    file_cfg = ModelConfig(name=MODEL, pretrained=True,
                           pretrained_file=str(tmp_path / "w.safetensors"))
    model, source = build_model_with_source(file_cfg, 2)  # the file wins over the hub
    assert source == "file"
    _assert_backbone_equals(model, weights)
    model, source = build_model_with_source(ModelConfig(name=MODEL), 2)
    assert source == "none" and model.get_classifier().out_features == 2
    assert not torch.equal(model.state_dict()["conv1.0.weight"], weights["conv1.0.weight"])
    assert isinstance(build_model(ModelConfig(name=MODEL), 2), torch.nn.Module)


def test_cli_train_offline_is_one_error_line(synth_data: Path, tmp_path: Path, empty_caches: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(models, "endpoint_reachable", lambda url, timeout=3.0: False)
    code = main(["train", "--data", str(synth_data), "--out", str(tmp_path / "run"),
                 "--set", f"model.name={MODEL}", "--set", "model.pretrained=true",
                 "--set", "data.image_size=32", "--set", "train.epochs=1"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: model.pretrained:")
    assert all(remedy in errors[0] for remedy in REMEDIES)
