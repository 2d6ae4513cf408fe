"""The shipped recipes validate, the default builds offline, and augment-preview draws a grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embryo_ml.cli import main
from embryo_ml.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_recipe_builds_offline_with_pretrained_false() -> None:
    from embryo_ml.train.models import build_model

    cfg = load_config(CONFIGS / "default.yaml", ["model.pretrained=false"])
    assert cfg.model.pretrained is False and cfg.loss.class_weights == "auto"
    model = build_model(cfg.model, num_classes=2)
    assert model.get_classifier().out_features == 2


def test_pretrained_file_is_loaded_and_head_skipped(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from embryo_ml.config import ModelConfig
    from embryo_ml.train.models import build_model

    donor = build_model(ModelConfig(name="test_resnet"), num_classes=5)  # another head size
    weights = {k: v.contiguous() for k, v in donor.state_dict().items()}
    save_file(weights, str(tmp_path / "w.safetensors"))
    torch.save(donor.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = build_model(ModelConfig(name="test_resnet", pretrained_file=str(tmp_path / name)),
                            num_classes=2)
        state = model.state_dict()
        backbone = [k for k in weights if weights[k].shape == state[k].shape]
        assert backbone and all(torch.equal(state[k], weights[k]) for k in backbone)
        assert model.get_classifier().out_features == 2


def test_augment_preview_grid(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert main(["augment-preview", str(CONFIGS / "default.yaml"), "--data", str(synth_data),
                 "--out", str(out), "--count", "3", "--draws", "4",
                 "--set", "data.image_size=48"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape[:2] == (3 * 48, 5 * 48)
    tiles = [grid[:48, 48 * i:48 * (i + 1)] for i in range(5)]
    assert any(not np.array_equal(tiles[0], t) for t in tiles[1:])  # augmentations differ


def test_augment_preview_bad_data_is_one_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["augment-preview", str(CONFIGS / "default.yaml"), "--data",
                 str(tmp_path / "missing.csv"), "--out", str(tmp_path / "g.png")])
    assert code == 2 and capsys.readouterr().err.startswith("error: ")


def test_auto_workers_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """`data.num_workers=auto`: none on a CPU (the workers would take cores from training),
    some with CUDA; a number given is kept."""
    import torch

    from embryo_ml.errors import ConfigError
    from embryo_ml.train.trainer import loader_args, worker_count

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for cfg in (load_config(None, ["data.cache_dir=/tmp/cache"]), load_config(None, [])):
        assert cfg.data.num_workers == "auto"
        assert worker_count(cfg, cpu) == 0
        assert loader_args(cfg, cpu)["persistent_workers"] is False
        assert worker_count(cfg, gpu) == 8
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert worker_count(load_config(None, []), gpu) == 2
    assert worker_count(load_config(None, ["data.num_workers=3"]), cpu) == 3
    with pytest.raises(ConfigError, match="num_workers"):
        load_config(None, ["data.num_workers=-1"])
