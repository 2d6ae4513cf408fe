"""Property-based fuzzing of the readers of user input (`tests/fuzz_targets.py`), a few seconds
per target, derandomized so CI sees the same examples every run; `benchmarks/fuzz_long.py` runs
the same properties much longer. Below them: one regression test per bug the fuzzing found."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embryo_ml.config import load_config
from embryo_ml.data.images import read_image, read_image_bytes
from embryo_ml.data.manifest import read_manifest
from embryo_ml.errors import ConfigError, DataError, ImageReadError
from tests.fuzz_targets import Resources, fuzz_settings, make_resources, run_target

# Examples per target inside the suite: each target takes a few seconds. The deadline is
# generous for a shared CI machine; a hang still fails it (and pytest-timeout backs it up).
SUITE_EXAMPLES = {"image": 150, "manifest": 100, "gardner": 200, "config": 100, "bundle": 100}
SUITE_DEADLINE_MS = 5000


@pytest.fixture(scope="module")
def resources(tmp_path_factory: pytest.TempPathFactory) -> Resources:
    return make_resources(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["image", "manifest", "gardner", "config"])
def test_reader_returns_or_raises_its_error(target: str, resources: Resources) -> None:
    """Arbitrary and mutated input: a well-formed result or the documented error, nothing else,
    and no example slower than the deadline."""
    run_target(target, resources, fuzz_settings(SUITE_EXAMPLES[target], SUITE_DEADLINE_MS))


@pytest.mark.timeout(300)
def test_read_bundle_returns_or_raises_bundle_error(bundle_dir: Path,
                                                    tmp_path: Path) -> None:
    """bundle.json of a copy of a real bundle replaced by arbitrary JSON, a field replaced or
    removed, or text: `read_bundle` gives a usable Bundle or BundleError."""
    resources = make_resources(tmp_path, bundle_dir)
    run_target("bundle", resources, fuzz_settings(SUITE_EXAMPLES["bundle"], SUITE_DEADLINE_MS))


# ------------------------------------------------------------- bugs the fuzzing found ----

@pytest.mark.parametrize("text", ["path\n,\n", "path\n,,\n"])
def test_manifest_with_an_empty_path_and_extra_fields_is_a_data_error(
    tmp_path: Path, text: str
) -> None:
    # Was: ValueError (NaN index) / TypeError (tuple index) from the line-number lookup.
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(DataError, match="m.csv"):
        read_manifest(manifest)


def test_manifest_first_row_with_an_extra_field_is_refused_not_shifted(tmp_path: Path) -> None:
    # Was: pandas made the first field of every row the index, so `path` read the label column
    # and `label` the extra field, silently.
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,good,P0001\nb.png,poor\n")
    with pytest.raises(DataError, match="more fields than the header"):
        read_manifest(manifest)
    manifest.write_text("path,label\na.png,good,\nb.png,poor\n")  # an empty extra: still read
    assert [Path(p).name for p in read_manifest(manifest)["path"]] == ["a.png", "b.png"]


def test_manifest_path_with_a_nul_byte_is_a_data_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"  # was: ValueError (embedded null byte) from Path.resolve
    manifest.write_bytes(b"path\nok.png\nbad\x00.png\n")
    with pytest.raises(DataError, match="row 3"):
        read_manifest(manifest)


@pytest.mark.parametrize("value", ["2001-13-40", "2001-02-30", "!!int x", "!!float x"])
def test_yaml_values_pyyaml_cannot_construct_are_config_errors(tmp_path: Path,
                                                               value: str) -> None:
    # Was: ValueError from PyYAML's date/int/float constructors, a traceback.
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  epochs: {value}\n")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(config)
    with pytest.raises(ConfigError, match="train.epochs"):  # as --set: read as text, refused
        load_config(None, [f"train.epochs={value}"])


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"  # was: RecursionError
    config.write_text("seed: " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config)


def test_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"  # was: UnicodeDecodeError
    config.write_bytes("train:\n  epochs: 2  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="c.yaml: not UTF-8"):
        load_config(config)


def _tiff_with_a_second_page_without_size() -> bytes:
    """A valid one-page TIFF whose next-page pointer leads to a page with no width/height."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    first = struct.unpack_from("<I", data, 4)[0]
    pointer = first + 2 + 12 * struct.unpack_from("<H", data, first)[0]
    data += b"\0" * (len(data) % 2)
    second = len(data)
    data += struct.pack("<H", 1) + struct.pack("<HHII", 258, 3, 1, 8) + b"\0\0\0\0"
    struct.pack_into("<I", data, pointer, second)
    return bytes(data)


def test_tiff_page_without_dimensions_is_an_image_read_error(tmp_path: Path) -> None:
    # Was: TypeError("Missing dimensions") from Pillow counting the pages.
    data = _tiff_with_a_second_page_without_size()
    with pytest.raises(ImageReadError, match="Missing dimensions"):
        read_image_bytes(data)
    path = tmp_path / "bad.tif"
    path.write_bytes(data)
    with pytest.raises(ImageReadError, match="bad.tif"):
        read_image(path)


def test_long_fuzz_script_runs_at_its_smallest(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_long.py"
    spec = importlib.util.spec_from_file_location("fuzz_long", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fuzz.json"
    assert module.main(["--examples", "5", "--targets", "gardner", "config",
                        "--work", str(tmp_path), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["target"] for r in results] == ["gardner", "config"]
    assert all(r["examples"] >= 1 and r["failure"] is None for r in results)
    assert "examples/s" in capsys.readouterr().out
