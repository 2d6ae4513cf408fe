#!/usr/bin/env python
"""Peak memory of `embryo-ml score` as the number of images grows.

Scoring streams: images are decoded a bounded number at a time, rows are written as they are
scored, and the per-embryo ranking keeps one small record per embryo. So peak memory should be
(nearly) flat in the number of images. This script measures it:

1. writes max(N) small PNGs (noise round a bright ring, `--image-size` px) and, for each N, a
   manifest of the first N with patient and embryo ids (5 images per embryo, 4 embryos per
   patient), so aggregation and ranking are part of the run;
2. scores each manifest in a fresh Python process (`embryo-ml score`, CSV output), which reports
   its own peak resident memory (VmHWM from /proc/self/status; ru_maxrss where there is no /proc);
3. prints one line per N and the ratio largest / smallest, and with `--json` one JSON line.

    python benchmarks/score_memory.py --bundle BUNDLE_DIR --sizes 1000 10000
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

CHILD = """
import json, resource, sys
from embryo_ml.cli import main
code = main(sys.argv[1:])
peak = None
try:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
except OSError:
    pass
if peak is None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
print("PEAK " + json.dumps({"code": code, "peak_bytes": peak}))
"""


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    ring = (np.abs(radius - size * 0.35) < 1.5) * 120
    names = []
    for i in range(n):
        name = f"{i // 1000:03d}/img{i:06d}.png"
        path = folder / name
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            noise = rng.integers(0, 100, (size, size))
            cv2.imwrite(str(path), np.clip(noise + ring, 0, 255).astype(np.uint8))
        names.append(name)
    return names


def write_manifest(path: Path, names: list[str]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "embryo_id"])
        for i, name in enumerate(names):
            embryo = i // 5
            writer.writerow([f"images/{name}", f"P{embryo // 4:05d}", f"E{embryo:06d}"])
    return path


def measure(manifest: Path, bundle: Path, out: Path, batch_size: int,
            extra: list[str]) -> dict:
    args = ["-q", "score", str(manifest), "--bundle", str(bundle), "--out", str(out),
            "--batch-size", str(batch_size), *extra]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"scoring {manifest} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result = json.loads(lines[-1][5:])
    if result["code"] != 0:
        raise SystemExit(f"scoring {manifest} exited {result['code']}:\n{done.stderr[-2000:]}")
    return {"peak_bytes": result["peak_bytes"], "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for images and outputs (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    parser.add_argument("score_args", nargs="*", help="more `embryo-ml score` options after --")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="score-memory-") as tmp:
        work = args.work or Path(tmp)
        names = write_images(work / "images", max(args.sizes), args.image_size)
        results = {}
        for n in args.sizes:
            manifest = write_manifest(work / f"manifest_{n}.csv", names[:n])
            results[n] = measure(manifest, args.bundle, work / f"scores_{n}.csv",
                                 args.batch_size, args.score_args)
            with open(work / f"scores_{n}.csv") as handle:
                rows = sum(1 for _ in handle) - 1
            if rows != n:
                raise SystemExit(f"expected {n} rows, found {rows}")
            mib = results[n]["peak_bytes"] / 2**20
            print(f"{n:>8} images: peak RSS {mib:7.1f} MiB, {results[n]['seconds']:6.1f} s "
                  f"({n / results[n]['seconds']:.0f} images/s with start-up)")
    small, large = min(args.sizes), max(args.sizes)
    ratio = results[large]["peak_bytes"] / results[small]["peak_bytes"]
    print(f"ratio {large} / {small}: {ratio:.3f}")
    if args.json:
        print(json.dumps({"sizes": {str(n): r for n, r in results.items()}, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
