"""What a served model reads: images sent with the request, files only under allowed roots, and
limits per request. MLflow-free (the pyfunc model in `embryo_ml.serving.pyfunc` applies it), so
any other server can apply the same rules.

A model server answers whoever can reach it, so a request must not make it read or reveal the
server's files, nor spend its memory and time without bound:

- `image_base64` rows are always accepted. A `path` is read only when allowed roots are set
  (`allowed_roots` in the model config, else `EMBRYO_ML_ALLOWED_ROOTS`, folders separated by
  `os.pathsep`), and only if it is a regular file whose real path (symlinks and `..` resolved)
  lies under a root's real path. Every other path (outside the roots, missing, a folder, a
  device, unreadable) gets the same status, `unreadable: path not allowed`, so the answer says
  nothing about what exists on the server. Relative paths and roots are taken from the server's
  working folder. The file is opened by its real path (no symlink followed at the last step) and
  checked again once open, so a link swapped in between is refused too.
- Limits (setting: model config key, else environment variable, else the default): rows per
  request (`max_rows`; more refuses the request), encoded bytes per image (`max_image_bytes`),
  pixels per image as stored (`max_pixels`, checked from the header before decoding), and
  decoded pixels per request (`max_request_pixels`: once spent, the remaining rows are not
  decoded). A row over a limit gets `unreadable: image too large (...)` or `unreadable: request
  too large (...)`.
- Rows are read and decoded when their batch is scored, never all before the first batch.

`embryo-ml score` is not served: it reads the folders its user names, without roots.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np

from embryo_ml.data.preprocess import read_for_model
from embryo_ml.errors import ConfigError, DataError, ImageReadError
from embryo_ml.score.batch import LoadedImage, load_item
from embryo_ml.score.items import ScoreItem
from embryo_ml.score.session import OnnxScorer

ALLOWED_ROOTS_ENV = "EMBRYO_ML_ALLOWED_ROOTS"
ALLOWED_ROOTS_KEY = "allowed_roots"
NOT_ALLOWED = "path not allowed"  # the one status reason of every path that is not read
# key -> (environment variable, default)
LIMITS: dict[str, tuple[str, int]] = {
    "max_rows": ("EMBRYO_ML_MAX_ROWS", 256),
    "max_image_bytes": ("EMBRYO_ML_MAX_IMAGE_BYTES", 16 * 2**20),  # 16 MiB
    "max_pixels": ("EMBRYO_ML_MAX_PIXELS", 16_000_000),  # 4000x4000
    "max_request_pixels": ("EMBRYO_ML_MAX_REQUEST_PIXELS", 256_000_000),
}
_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


@dataclass(frozen=True)
class ServedInput:
    """The rules one request is read by; `from_settings` resolves them."""

    roots: tuple[str, ...] = ()  # real paths; empty: no `path` is read
    max_rows: int = LIMITS["max_rows"][1]
    max_image_bytes: int = LIMITS["max_image_bytes"][1]
    max_pixels: int = LIMITS["max_pixels"][1]
    max_request_pixels: int = LIMITS["max_request_pixels"][1]

    @classmethod
    def from_settings(cls, config: Mapping[str, Any] | None = None,
                      environ: Mapping[str, str] | None = None) -> ServedInput:
        """Each setting from `config` (the pyfunc model config), else `environ` (default: the
        process environment, as it is now), else its default. `ConfigError` names a bad one."""
        config = config or {}
        environ = os.environ if environ is None else environ
        if config.get(ALLOWED_ROOTS_KEY) is not None:
            roots = _roots(config[ALLOWED_ROOTS_KEY], f"model config {ALLOWED_ROOTS_KEY!r}")
        else:
            roots = _roots(environ.get(ALLOWED_ROOTS_ENV, ""), ALLOWED_ROOTS_ENV)
        limits = {}
        for key, (variable, default) in LIMITS.items():
            if config.get(key) is not None:
                limits[key] = _positive(config[key], f"model config {key!r}")
            elif environ.get(variable, "").strip():
                limits[key] = _positive(environ[variable], f"environment variable {variable}")
            else:
                limits[key] = default
        return cls(roots, **limits)

    def check_rows(self, n_rows: int) -> None:
        """`DataError` (one line) for a request of more than `max_rows` rows."""
        if n_rows > self.max_rows:
            variable = LIMITS["max_rows"][0]
            raise DataError(f"request has {n_rows} rows, this model accepts at most "
                            f"{self.max_rows} per request (model config 'max_rows' or "
                            f"{variable}); send the rows in smaller requests")


def _roots(value: Any, source: str) -> tuple[str, ...]:
    if isinstance(value, str | os.PathLike):
        value = os.fspath(value).split(os.pathsep)
    if not isinstance(value, list | tuple) or not all(
            isinstance(v, str | os.PathLike) for v in value):
        raise ConfigError(f"{source} must be a list of folders, got {value!r}")
    roots = (os.fspath(v).strip() for v in value)
    return tuple(dict.fromkeys(os.path.realpath(root) for root in roots if root))


def _positive(value: Any, source: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        number = None if isinstance(value, bool | float) else int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1:
        raise ConfigError(f"{source} must be a whole number of at least 1, got {value!r}")
    return number


def _under(real: str, roots: tuple[str, ...]) -> bool:
    return any(PurePath(real).is_relative_to(root) for root in roots)


def read_allowed(path: str, roots: tuple[str, ...], max_bytes: int) -> bytes:
    """The bytes of `path` when it is a regular file under one of `roots` (real paths, see
    `ServedInput`); else `ImageReadError(path, NOT_ALLOWED)`, the same whatever the reason.
    A file over `max_bytes` raises "image too large" (it is allowed: its size is no secret)."""
    refused = ImageReadError(path, NOT_ALLOWED)
    try:
        real = os.path.realpath(path)
        if not roots or not _under(real, roots):
            raise refused
        handle = os.open(real, _OPEN_FLAGS)  # a FIFO cannot block it, a last-step link fails
    except (OSError, ValueError):  # ValueError: e.g. a NUL byte in the path
        raise refused from None
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode) or not _still_under(handle, roots):
            raise refused
        if info.st_size > max_bytes:
            raise _too_large(path, info.st_size, max_bytes)
        with os.fdopen(handle, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    except OSError:
        raise refused from None
    finally:
        os.close(handle)
    if len(data) > max_bytes:  # grew since fstat
        raise _too_large(path, len(data), max_bytes)
    return data


def _still_under(handle: int, roots: tuple[str, ...]) -> bool:
    """The opened file is still under a root (a folder on the way may have been swapped for a
    link after `realpath`); checked where the system says which file a descriptor is."""
    link = f"/proc/self/fd/{handle}"
    try:
        return _under(os.readlink(link), roots)
    except OSError:
        return not os.path.isdir("/proc/self/fd")  # elsewhere the realpath check stands alone


def _too_large(name: str, size: int, limit: int) -> ImageReadError:
    return ImageReadError(name, f"image too large ({size} bytes, limit {limit})")


def decode_base64(text: str, max_bytes: int | None = None) -> bytes:
    """Strict base64 (whitespace and a data-URL prefix allowed); raises `ValueError`, or
    `ImageReadError` ("image too large") beyond `max_bytes`, checked before decoding."""
    text = re.sub(r"\s+", "", _DATA_URL.sub("", text.strip()))
    if max_bytes is not None and len(text) > 4 * (-(-max_bytes // 3)):
        raise _too_large("<base64>", len(text) // 4 * 3, max_bytes)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"invalid base64 ({error})") from None


class ServedRequest:
    """Reads and decodes the rows of one request under `served`'s rules (`load`, from worker
    threads), through the scorer's own `load_item`; counts the pixels it decodes."""

    def __init__(self, scorer: OnnxScorer, served: ServedInput) -> None:
        self.scorer = scorer
        self.served = served
        self.decoded_pixels = 0
        self._lock = threading.Lock()

    def load(self, path: str, encoded: str, day: str = "") -> LoadedImage:
        """One row: `encoded` (base64) when given, else `path`; a status for a bad row. `day`:
        the row's value of the bundle's day-prior column (normalised), "" = none."""
        item = ScoreItem(path=path, file="", prior_value=day)
        if not encoded and not path:
            return LoadedImage.failed(item, "no input: give a path or image_base64")
        limit = self.served.max_image_bytes
        try:
            data = (decode_base64(encoded, limit) if encoded
                    else read_allowed(path, self.served.roots, limit))
        except ImageReadError as error:
            return LoadedImage.failed(item, f"unreadable: {error.reason}")
        except ValueError as error:
            return LoadedImage.failed(item, f"unreadable: {error}")
        if len(data) > limit:
            reason = _too_large(path, len(data), limit).reason
            return LoadedImage.failed(item, f"unreadable: {reason}")
        return load_item(self, ScoreItem(path=path, file="", data=data, prior_value=day))

    # The `ImageReader` that `load_item` uses: read (here under the request's limits), prepare
    # and flags as the scorer does.
    def read(self, item: ScoreItem) -> np.ndarray:
        budget = self.served.max_request_pixels
        with self._lock:
            if self.decoded_pixels >= budget:
                raise ImageReadError(item.path, f"request too large (its images decoded "
                                     f"{self.decoded_pixels} pixels, limit {budget})")
        image = read_for_model(None, self.scorer.bundle.input_size, self.served.max_pixels,
                               data=item.data, name=item.path)
        with self._lock:
            self.decoded_pixels += image.shape[0] * image.shape[1]
        return image

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return self.scorer.prepare(image)

    def image_flags(self, image: np.ndarray) -> list[str]:
        return self.scorer.image_flags(image)
