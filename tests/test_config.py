import time
from pathlib import Path

import pytest
import yaml

from embryo_ml.config import load_config
from embryo_ml.config_text import expanded_size
from embryo_ml.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides_of_contract_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n"), [
        "seed=7", "model.name=resnet10t", "model.pretrained=false",
        "model.pretrained_file=/w.safetensors", "data.image_size=96", "train.epochs=4",
        "train.batch_size=8", "train.lr=3e-4",
    ])
    assert cfg.seed == 7
    assert cfg.model.name == "resnet10t" and cfg.model.pretrained is False
    assert cfg.model.pretrained_file == "/w.safetensors"
    assert cfg.data.image_size == 96
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (4, 8, 3e-4)
    assert cfg.flat()["train.lr"] == 3e-4


def test_typo_in_file_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.epoch" in message and str(path) in message and "train.epochs" in message


def test_typo_in_override_and_wrong_type() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'model.nmae'"):
        load_config(None, ["model.nmae=resnet18"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))


def billion_laughs(levels: int) -> str:
    """Nine anchors of nine aliases each: 9**levels values in a few hundred bytes."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\naugment: *l{levels - 1}\n"


def test_alias_bomb_and_self_reference_are_refused_at_once(tmp_path: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="stand for more than 100,000 values"):
        load_config(write(tmp_path, billion_laughs(9)))  # 387 million values: hung before
    assert time.perf_counter() - started < 5
    with pytest.raises(ConfigError, match="contains itself"):
        load_config(write(tmp_path, "model: &m\n  name: *m\n"))


def test_aliases_of_a_normal_size_still_work(tmp_path: Path) -> None:
    l0, l1, l2 = 1 + 9, 1 + 9 * 10, 1 + 9 * 91  # a list counts itself and its items
    # the mapping, its 4 keys, l0..l2, and augment: l2 counted again, as if copied out
    assert expanded_size(yaml.safe_load(billion_laughs(3))) == 1 + 4 + l0 + l1 + l2 + l2
    text = "model: &m\n  name: resnet18\n  drop_rate: 0.1\n"
    cfg = load_config(write(tmp_path, text), ["model.pretrained=false"])
    assert cfg.model.name == "resnet18" and cfg.model.drop_rate == 0.1


def test_demo_recipe_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert cfg.model.pretrained is False


def test_amp_off_survives_yaml(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare `off` as false; `train.amp: off` must still mean "off"."""
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    assert load_config(write(tmp_path, "train:\n  amp: off\n")).train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=true"])
