"""Progressive resizing: early epochs train on smaller images; validation at full size."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from embryo_ml.train.resolution import SIDE_STEP, resize_batch, training_sides
from tests.conftest import tiny_config


@pytest.mark.parametrize("epochs", [2, 3, 4, 10, 30])
@pytest.mark.parametrize("start", [0.5, 0.625, 0.8])
def test_sides_grow_from_the_start_fraction_to_full_size(epochs: int, start: float) -> None:
    sides = training_sides(128, epochs, start)
    assert len(sides) == epochs
    assert abs(sides[0] - start * 128) <= SIDE_STEP / 2
    assert sides == sorted(sides), "the side never shrinks"
    assert sides[-1] == 128 and all(side % SIDE_STEP == 0 for side in sides)
    full_from = sides.index(128)
    assert full_from <= round(0.85 * (epochs - 1)), "the last 15% of the run is at full size"
    cost = sum(side * side for side in sides) / (128 * 128 * epochs)
    assert cost < 0.9


def test_off_and_one_epoch_train_at_full_size() -> None:
    assert training_sides(96, 5, 1.0) == [96] * 5
    assert training_sides(96, 1, 0.5) == [96]


def test_resize_batch_keeps_values_and_skips_the_full_size() -> None:
    images = torch.full((2, 3, 64, 64), 0.7)
    images[:, :, :32] = -1.3
    small = resize_batch(images, 32)
    assert small.shape == (2, 3, 32, 32)
    assert torch.allclose(small.mean(), images.mean(), atol=1e-5)  # a normalised image stays so
    assert resize_batch(images, 64) is images


def test_fit_trains_small_then_full_and_validates_at_full_size(
        synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embryo_ml.train import fit as fit_module

    seen: dict[bool, list[int]] = {True: [], False: []}  # training mode -> input sides
    real_build = fit_module.build_model_with_source

    def recording(*args: object, **kwargs: object) -> object:
        model, source = real_build(*args, **kwargs)
        model.register_forward_pre_hook(  # batches only: the 1-image size probe is not one
            lambda module, inputs: seen[module.training].append(inputs[0].shape[-1])
            if len(inputs[0]) > 1 else None)
        return model, source

    monkeypatch.setattr(fit_module, "build_model_with_source", recording)
    cfg = tiny_config(tmp_path / "m.db", "data.image_size=64", "train.epochs=3",
                      "train.batch_size=16", "train.progressive_resize=0.5",
                      "tracking.log_checkpoint=false")
    fit_module.fit(cfg, synth_data, tmp_path / "run", progress=False)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["train_side"].tolist() == [32, 48, 64] == training_sides(64, 3, 0.5)
    per_epoch = len(seen[True]) // 3
    assert seen[True] == [32] * per_epoch + [48] * per_epoch + [64] * per_epoch
    assert seen[False] and set(seen[False]) == {64}, "validation always at full size"


def test_a_model_built_for_one_size_trains_at_full_size() -> None:
    """A ViT with a fixed patch grid refuses other sizes: the schedule falls back to full size
    rather than failing at epoch 0; a CNN keeps its schedule."""
    import timm

    from embryo_ml.train.resolution import schedule_for

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=64)
    cnn = timm.create_model("test_resnet", num_classes=2)
    cnn.train()
    assert schedule_for(vit, 64, 4, 0.5) == [64] * 4
    assert schedule_for(cnn, 64, 4, 0.5) == training_sides(64, 4, 0.5) != [64] * 4
    assert cnn.training, "the probe restores the training mode"
