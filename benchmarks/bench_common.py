"""Helpers shared by the throughput benchmarks: clinic-sized synthetic images, interleaved
repetitions, medians, a plain-text table and the JSON record.

Not a benchmark itself. The scripts import it as a sibling module (`python benchmarks/x.py` puts
this folder on `sys.path`; the tests do the same).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import resource
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from embryo_ml.fileio import atomic_write_text

# albumentations asks pypi.org for a newer version when imported (2 s timeout): not while timing.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

GENERATOR_MAX_SIZE = 256  # embryo_ml.data.synthetic draws at most this size (and slowly above)
DATA_STAMP = "benchmark-data.json"


def make_images(
    folder: Path, n: int, source_size: int, source_format: str, seed: int = 0
) -> Path:
    """`n` labelled synthetic embryo images as a clinic would store them; returns the manifest.

    The generator draws at min(source_size, 256) px and writes 8-bit grey PNGs. With
    `source_format` "png" and a source size of at most 256, those files are used as they are.
    Otherwise each image is upscaled (bicubic) to source_size x source_size and written as
    grey-stored-as-RGB JPEG (quality 90, as the STORK sample and most incubator exports are) or
    RGB PNG, so that decoding costs what it costs on real 500-800 px clinic images. A stamp file
    lets a later run with the same `--work` folder and arguments reuse the images.
    """
    if source_format not in ("jpg", "png"):
        raise ValueError(f"source format must be jpg or png, got {source_format!r}")
    from embryo_ml.data.synthetic import generate_dataset

    params = {"n": n, "source_size": source_size, "source_format": source_format, "seed": seed}
    stamp = folder / DATA_STAMP
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("params") == params and (folder / saved["manifest"]).is_file():
            return folder / saved["manifest"]
    gen_size = min(source_size, GENERATOR_MAX_SIZE)
    manifest = generate_dataset(folder / "generated", n, size=gen_size, seed=seed)
    if source_format == "png" and source_size == gen_size:
        result = manifest
    else:
        result = _convert(manifest, folder / "clinic", source_size, source_format)
    stamp.write_text(json.dumps({"params": params,
                                 "manifest": result.relative_to(folder).as_posix()}))
    return result


def _convert(manifest: Path, out: Path, size: int, fmt: str) -> Path:
    source = manifest.parent
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if fmt == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    for row in rows:
        gray = cv2.imread(str(source / row["path"]), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise RuntimeError(f"cannot read generated image {source / row['path']}")
        if gray.shape != (size, size):
            interpolation = cv2.INTER_CUBIC if size > gray.shape[0] else cv2.INTER_AREA
            gray = cv2.resize(gray, (size, size), interpolation=interpolation)
        rel = str(Path(row["path"]).with_suffix(f".{fmt}").as_posix())
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(target), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), params):
            raise RuntimeError(f"cannot write {target}")
        row["path"] = rel
    result = out / "manifest.csv"
    with open(result, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return result


@contextlib.contextmanager
def mlflow_store(folder: Path) -> Iterator[str]:
    """MLflow tracking in a sqlite file in `folder` for the duration (the variable is restored:
    `fit` reads MLFLOW_TRACKING_URI when the config names no tracking URI)."""
    uri = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


@contextlib.contextmanager
def workspace(args: Any, prefix: str) -> Iterator[tuple[Path, Path]]:
    """(work folder, manifest of the benchmark images) for one benchmark run: `args.work` or a
    temporary folder, MLflow in a sqlite file there, images made (or reused) by `make_images`
    from `args.images`, `args.source_size`, `args.source_format` and `args.seed`."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with mlflow_store(work):
            yield work, make_images(work / "data", args.images, args.source_size,
                                    args.source_format, args.seed)


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its waited-for children (DataLoader
    workers): less sensitive than wall time to other processes sharing the machine."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine() -> dict[str, Any]:
    """What the figures were measured on (the load average says how busy the machine was)."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "processor": _cpu_name()}
    with contextlib.suppress(OSError):
        info["load_average_1m"] = os.getloadavg()[0]
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
        info["amx_bf16"] = "amx_bf16" in flags
        info["avx512_bf16"] = "avx512_bf16" in flags
    except (OSError, IndexError):
        pass
    try:
        import onnxruntime
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def text(value: Any) -> str:
        if isinstance(value, float):
            return "-" if not math.isfinite(value) else f"{value:.3g}" if abs(value) < 10 \
                else f"{value:.1f}"
        return str(value)

    cells = [[text(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def write_json(path: Path | None, record: dict[str, Any]) -> None:
    if path is None:
        return
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
              **record}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plain_training(model: Any, loader: Any, epochs: int) -> None:
    """The plain loop's training, as a tutorial writes it: AdamW 1e-3 (weight decay 0.05),
    cosine decay per step, cross-entropy, float32, no validation."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for images, y in loader:
            loss = torch.nn.functional.cross_entropy(model(images), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
