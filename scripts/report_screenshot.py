#!/usr/bin/env python
"""Regenerate the report screenshot of the docs (`docs/assets/report.png`) from a real report.

    python scripts/report_screenshot.py [--out docs/assets/report.png] [--keep DIR]
    python scripts/report_screenshot.py --report report.html   # photograph an existing report

Trains a small model on synthetic embryos, exports its bundle, scores a few synthetic patients,
writes the HTML report with `write_report` and photographs it in headless Chromium, so the
picture in the docs is what the code renders today, never a hand-made mock-up. Needs the full
install (it trains) and `chromium` (`make browser`). About a minute on 2 CPUs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "assets" / "report.png"
WINDOW = "1200,2600"  # tall enough to reach the first patients' rows below the model facts
MAX_BYTES = 400_000  # the docs' image budget; the PNG is palette-quantized to stay under it
# Settings that train, in about a minute, a model that passes its validation check, so the
# screenshot shows a report without the failed-model banner.
TRAIN_IMAGES, NEW_IMAGES, IMAGE_SIZE = 400, 14, 96
OVERRIDES = ["train.epochs=8", "train.threads=1"]


def find_chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        sys.exit("report_screenshot: chromium is not installed (Debian: apt-get install "
                 "chromium, or `make browser`)")
    return found


def build_report(work: Path) -> Path:
    """Synthetic data -> a small trained run -> bundle -> scores -> the HTML report."""
    from embryo_ml.config import load_config
    from embryo_ml.data.synthetic import generate_dataset
    from embryo_ml.export.onnx_export import export_bundle
    from embryo_ml.report.html import write_report
    from embryo_ml.score.scorer import score_images
    from embryo_ml.train.fit import fit

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        *OVERRIDES, f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"data.cache_dir={work / 'cache'}"])
    manifest = generate_dataset(work / "data", n=TRAIN_IMAGES, size=IMAGE_SIZE, seed=0)
    run = fit(cfg, manifest, work / "run", progress=False)
    print(f"trained: validation AUC {run.metrics['val_auc']:.3f}, "
          f"check {run.metrics['validation']['verdict']}")
    bundle = export_bundle(work / "run", work / "bundle")
    new = generate_dataset(work / "new_images", n=NEW_IMAGES, size=IMAGE_SIZE, seed=1000)
    scores = work / "scores.csv"
    score_images(new, bundle.path, scores, progress=False)
    return write_report(scores, bundle.path, work / "report.html", images=new)


def screenshot(report: Path, out: Path, profile: Path) -> None:
    """Headless Chromium: the top of the page at a fixed window size, as a PNG."""
    command = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-extensions", "--hide-scrollbars",
               "--run-all-compositor-stages-before-draw",  # no half-painted tiles at the bottom
               f"--user-data-dir={profile}", "--virtual-time-budget=5000",
               f"--window-size={WINDOW}", f"--screenshot={out}", report.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not out.is_file():
        sys.exit(f"report_screenshot: chromium failed ({done.returncode}): {done.stderr[-1500:]}")


def shrink(png: Path, limit: int = MAX_BYTES) -> None:
    """Re-save optimized; quantize to a palette when the full-colour file is over `limit`."""
    from PIL import Image

    with Image.open(png) as image:
        image = image.convert("RGB")
    image.save(png, optimize=True)
    if png.stat().st_size > limit:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="build in DIR and keep it (default: a temporary folder)")
    parser.add_argument("--report", type=Path, default=None, metavar="HTML",
                        help="photograph this report instead of building one")
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    with tempfile.TemporaryDirectory(prefix="report-shot-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = args.report or build_report(work)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shot = work / "report.png"
        screenshot(report, shot, work / "chromium-profile")
        shrink(shot)
        shutil.copyfile(shot, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1000} KB) from {report.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
