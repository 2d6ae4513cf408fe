"""Fuzz targets: the readers of user input, each with the contract it promises.

Every reader either returns a well-formed result or raises its documented error type (from
`embryo_ml.errors`; `ValueError` for `parse_gardner`), never anything else, and never hangs. One
definition serves two budgets: `tests/test_fuzz.py` runs each target for a few seconds
(derandomized, so CI is reproducible) and `benchmarks/fuzz_long.py` runs the same targets with
many more examples.

A target is a strategy (what to feed) and a check (feed one example, assert the contract); both
take a `Resources` with a scratch folder, small images written here and a bundle folder to
tamper with. Build one with `make_resources`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import string
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from embryo_ml.errors import BundleError, ConfigError, DataError, ImageReadError

FUZZ_MAX_PIXELS = 2_000_000  # mutated headers may claim any size: keep each decode small


@dataclass
class Resources:
    work: Path  # scratch folder, rewritten by every example
    images: dict[str, bytes]  # name -> encoded bytes of a small valid image
    bundle: Path | None  # a copy of a real bundle folder whose bundle.json is rewritten
    bundle_json: dict[str, Any] | None  # that bundle's original bundle.json


def _encoded(array: np.ndarray, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def small_images() -> dict[str, bytes]:
    """A few tiny images of the formats clinics export, written here (no files from elsewhere)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    return {
        "rgb.png": _encoded(rgb, "PNG"),
        "grey.png": _encoded(grey, "PNG"),
        "rgb.jpg": _encoded(rgb, "JPEG", quality=80),
        "grey.jpg": _encoded(grey, "JPEG", quality=80),
        "rgb.tif": _encoded(rgb, "TIFF"),
        "grey16.tif": _encoded((grey.astype(np.uint16) * 257), "TIFF"),
        "rgb.bmp": _encoded(rgb, "BMP"),
    }


def make_resources(work: Path, bundle: Path | None = None) -> Resources:
    """Scratch folder `work` (created), the small images and a copy of `bundle` (if given)."""
    work.mkdir(parents=True, exist_ok=True)
    copy, original = None, None
    if bundle is not None:
        copy = work / "bundle"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(bundle, copy)
        original = json.loads((copy / "bundle.json").read_text(encoding="utf-8"))
    return Resources(work, small_images(), copy, original)


# ------------------------------------------------------------------------------ images ----

@st.composite
def mutated(draw: st.DrawFn, originals: dict[str, bytes]) -> bytes:
    """A valid small image with bytes flipped, overwritten, inserted, deleted or cut off."""
    data = bytearray(originals[draw(st.sampled_from(sorted(originals)))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        where = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[where] = draw(st.integers(0, 255))
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[where:where + draw(st.integers(1, 16))]
        else:
            del data[where:]
    return bytes(data)


def image_examples(res: Resources) -> st.SearchStrategy[bytes]:
    headers = [data[:16] for data in res.images.values()]
    return st.one_of(
        st.binary(max_size=512),
        st.builds(lambda head, tail: head + tail, st.sampled_from(headers),
                  st.binary(max_size=256)),
        mutated(res.images),
    )


def _check_decoded(array: np.ndarray) -> None:
    assert isinstance(array, np.ndarray) and array.dtype == np.uint8, array
    assert array.ndim == 3 and array.shape[2] == 3 and min(array.shape[:2]) > 0, array.shape


def check_image(res: Resources, data: bytes) -> None:
    """`read_image` (from a file) and `read_image_bytes`: an RGB uint8 array or ImageReadError."""
    from embryo_ml.data.images import read_image, read_image_bytes

    path = res.work / "image.bin"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd files; only errors matter here
        for read in (lambda: read_image(path, FUZZ_MAX_PIXELS),
                     lambda: read_image(path, FUZZ_MAX_PIXELS, min_side=4),
                     lambda: read_image_bytes(data, FUZZ_MAX_PIXELS)):
            try:
                _check_decoded(read())
            except ImageReadError as error:
                assert str(error), "an ImageReadError names the file and the reason"


# ---------------------------------------------------------------------------- manifest ----

_CELL_TEXT = st.text(alphabet=st.sampled_from(list(string.printable) + ["\x00", "é", "\u2212"]),
                     max_size=12)
_HEADER = st.sampled_from(["path", "label", "patient_id", "embryo_id", "grade", "day", "x", ""])


@st.composite
def csv_text(draw: st.DrawFn) -> bytes:
    """CSV-ish bytes: a header of manifest-like column names, rows of odd cells, odd bytes."""
    columns = draw(st.lists(_HEADER, min_size=0, max_size=5))
    rows = draw(st.lists(st.lists(_CELL_TEXT, min_size=0, max_size=6), max_size=5))
    quote = draw(st.booleans())

    def cell(text: str) -> str:
        return '"' + text.replace('"', '""') + '"' if quote else text

    lines = [",".join(columns)] + [",".join(cell(c) for c in row) for row in rows]
    text = draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    data = text.encode("utf-8")
    if draw(st.booleans()):  # sometimes not UTF-8, or with a BOM
        data = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b""])) + data
    return data


def manifest_examples(res: Resources) -> st.SearchStrategy[bytes]:
    return st.one_of(csv_text(), st.binary(max_size=256))


def check_manifest(res: Resources, data: bytes) -> None:
    """`read_manifest` / `load_labelled` / `build_targets`: a table with absolute paths, or
    DataError."""
    import pandas as pd

    from embryo_ml.config import LabelsConfig
    from embryo_ml.data.labels import build_targets
    from embryo_ml.data.manifest import load_labelled, read_manifest

    path = res.work / "manifest.csv"
    path.write_bytes(data)
    try:
        table = read_manifest(path)
    except DataError:
        return
    assert isinstance(table, pd.DataFrame) and len(table) > 0
    assert all(Path(p).is_absolute() for p in table["path"])
    for labels in (LabelsConfig(), LabelsConfig(task="gardner"), LabelsConfig(task="multiclass")):
        with contextlib.suppress(DataError):
            build_targets(load_labelled(path), labels, positive_class="good")


# ----------------------------------------------------------------------------- Gardner ----

_GRADE_CHARS = list("0123456789ABCabcdDZ+- \t") + ["\u2212", "\u2013", "ß", "ǆ", "٣", "ｱ"]
grade_examples = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.sampled_from(_GRADE_CHARS), max_size=8),
    st.builds(lambda e, i, s1, t, s2: f"{e}{i}{s1}{t}{s2}", st.integers(-1, 8),
              st.sampled_from("ABCabcD "), st.sampled_from(["", "+", "-", "\u2212"]),
              st.sampled_from("ABCabcD "), st.sampled_from(["", "+", "-", "--"])),
)


def check_gardner(res: Resources, text: str) -> None:
    """`parse_gardner`: a GardnerGrade that survives a round trip through its text, or
    ValueError."""
    from embryo_ml.data.labels import GardnerGrade, parse_gardner

    try:
        grade = parse_gardner(text)
    except ValueError as error:
        assert str(error)
        return
    assert isinstance(grade, GardnerGrade) and 1 <= grade.expansion <= 6
    again = parse_gardner(str(grade))
    assert (again.expansion, again.icm, again.te, again.icm_sub, again.te_sub) == (
        grade.expansion, grade.icm, grade.te, grade.icm_sub, grade.te_sub), (text, str(grade))


# ------------------------------------------------------------------------------ config ----

def _config_keys() -> list[str]:
    from embryo_ml.config import Config

    return sorted(Config().flat())


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=8))
_YAML_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                            max_leaves=8)
_YAML_BITS = st.sampled_from(["2001-13-40", "2001-02-03 25:61:00", "&a [1, *a]", "*b", "!!int x",
                              "!!python/object:os.system", "[[[[", "{a: 1, a: 2}", ": :", "- -",
                              "0x", "1e999", ".nan", "~", "'", '"\\x"', "%YAML 9.9", "---", "\t"])


@st.composite
def config_tree(draw: st.DrawFn) -> dict[str, Any]:
    """A nested dict whose keys are mostly real config keys, with arbitrary values."""
    tree: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(_config_keys()) | st.text(max_size=8), max_size=4)):
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            node = child if isinstance(child, dict) else node
        node[parts[-1]] = draw(_YAML_VALUES)
    return tree


@st.composite
def yaml_text(draw: st.DrawFn) -> bytes:
    import yaml

    kind = draw(st.sampled_from(["tree", "text", "bits", "bytes"]))
    if kind == "tree":
        return yaml.safe_dump(draw(config_tree()), allow_unicode=True).encode("utf-8")
    if kind == "text":
        return draw(st.text(max_size=64)).encode("utf-8")
    if kind == "bits":
        key = draw(st.sampled_from(_config_keys()))
        section, name = key.split(".", 1) if "." in key else (key, None)
        value = draw(_YAML_BITS)
        text = f"{section}:\n  {name}: {value}\n" if name else f"{section}: {value}\n"
        return text.encode("utf-8")
    return draw(st.binary(max_size=64))


def config_examples(res: Resources) -> st.SearchStrategy[tuple[bytes, list[str]]]:
    override = st.one_of(
        st.text(max_size=24),
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_config_keys()) | st.text(max_size=8),
                  _YAML_BITS | st.text(max_size=10) | st.integers().map(str)),
    )
    return st.tuples(yaml_text(), st.lists(override, max_size=3))


def check_config(res: Resources, example: tuple[bytes, list[str]]) -> None:
    """`load_config(file, --set ...)` and `load_config(None, --set ...)`: a Config or
    ConfigError."""
    from embryo_ml.config import Config, load_config

    data, overrides = example
    path = res.work / "config.yaml"
    path.write_bytes(data)
    for source, sets in ((path, []), (path, overrides), (None, overrides)):
        try:
            assert isinstance(load_config(source, sets), Config)
        except ConfigError as error:
            assert str(error)


# ------------------------------------------------------------------------------ bundle ----

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=10)


def bundle_examples(res: Resources) -> st.SearchStrategy[tuple[Any, bool]]:
    """(bundle.json content, re-identify): arbitrary JSON, the real object with a field
    replaced, removed or changed inside, or text that is not JSON. With re-identify, an object
    gets a freshly computed identity (`bundle_sha256`), so the value checks behind the
    identity check are reached with `verify=True` too."""
    original = res.bundle_json or {}
    fields = sorted(original)

    def nested(field: str, key: str, value: Any) -> dict[str, Any]:
        inner = original.get(field)
        inner = {**inner, key: value} if isinstance(inner, dict) else value
        return {**original, field: inner}

    nested_fields = [f for f in fields if isinstance(original[f], dict)] or ["x"]
    content = st.one_of(
        _JSON,
        st.builds(lambda f, v: {**original, f: v}, st.sampled_from(fields), _JSON)
        if fields else st.nothing(),
        st.builds(lambda f: {k: v for k, v in original.items() if k != f},
                  st.sampled_from(fields)) if fields else st.nothing(),
        st.builds(nested, st.sampled_from(nested_fields),
                  st.sampled_from(["file", "sha256", "verdict", "passed", "checks", "reason",
                                   "offset", "classes", "limits", "k", "quantiles", "alpha"]),
                  _JSON),
        st.text(max_size=32).map(lambda text: _NotJson(text)),
    )
    return st.tuples(content, st.booleans())


@dataclass(frozen=True)
class _NotJson:
    text: str  # written as is


def _bundle_text(content: Any, reidentify: bool) -> str:
    if isinstance(content, _NotJson):
        return content.text
    if reidentify and isinstance(content, dict):
        from embryo_ml.export import bundle as bundle_module

        identify = getattr(bundle_module, "bundle_identity", None)  # bundles with an identity
        if identify is not None:
            content = {**content, "bundle_sha256": identify(content)}
    return json.dumps(content)


def check_bundle(res: Resources, example: tuple[Any, bool]) -> None:
    """`read_bundle` (verified and not): a Bundle whose basic properties work, or BundleError."""
    from embryo_ml.export.bundle import Bundle, read_bundle, validation_warning

    assert res.bundle is not None, "the bundle target needs a bundle folder"
    (res.bundle / "bundle.json").write_text(_bundle_text(*example), encoding="utf-8")
    for verify in (True, False):
        try:
            bundle = read_bundle(res.bundle, verify=verify)
        except BundleError as error:
            assert str(error)
            continue
        assert isinstance(bundle, Bundle)
        assert 0 <= bundle.positive_index < len(bundle.classes)
        assert bundle.model_path.parent == res.bundle
        message = validation_warning(bundle)
        assert message is None or isinstance(message, str)


# ---------------------------------------------------------------------------- registry ----

@dataclass(frozen=True)
class Target:
    examples: Callable[[Resources], st.SearchStrategy[Any]]
    check: Callable[[Resources, Any], None]
    needs_bundle: bool = False


TARGETS: dict[str, Target] = {
    "image": Target(image_examples, check_image),
    "manifest": Target(manifest_examples, check_manifest),
    "gardner": Target(lambda res: grade_examples, check_gardner),
    "config": Target(config_examples, check_config),
    "bundle": Target(bundle_examples, check_bundle, needs_bundle=True),
}


def fuzz_settings(max_examples: int, deadline_ms: float = 2000, derandomize: bool = True,
                  **extra: Any) -> settings:
    """Reproducible (derandomized) unless asked, no example database in the working folder; the
    deadline fails any single example that takes longer (a hang shows up as a deadline
    failure)."""
    return settings(max_examples=max_examples, derandomize=derandomize, database=None,
                    deadline=timedelta(milliseconds=deadline_ms),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], **extra)


def run_target(name: str, res: Resources, chosen: settings,
               on_example: Callable[[], None] | None = None, random_seed: int | None = None,
               ) -> None:
    """Run target `name` under `chosen` settings (with `random_seed`, when given, instead of
    derandomized examples); raises the (shrunk) failure, if any."""
    target = TARGETS[name]

    @chosen
    @given(target.examples(res))
    def fuzz(example: Any) -> None:
        if on_example is not None:
            on_example()
        target.check(res, example)

    if random_seed is not None:
        fuzz = seed(random_seed)(fuzz)
    fuzz()
