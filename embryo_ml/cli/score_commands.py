"""The scoring-path commands: `score` (a folder or manifest -> scores, optionally the report),
`report` (the HTML report of a scores file) and `explain` (one image's heatmap). Torch-free:
they import the scorer, the report and the bundle reader only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from embryo_ml.cli.common import (
    add_report_options,
    add_threads,
    add_trusted_key,
    default_of,
    positive,
    show_progress,
    warn,
)
from embryo_ml.errors import EmbryoMLError

if TYPE_CHECKING:
    from embryo_ml.score.scorer import ScoreSummary

SCORES_FILE = Path("scores.csv")  # `score --out`
REPORT_FILE = Path("report.html")  # `report --out`
OVERLAY_FILE = Path("overlay.png")  # `explain --out`
FAILURES_SHOWN = 10  # failed images listed after a scoring run; the rest are counted
ENGINES = ("local", "dask")  # `score --engine`


def _check_trusted(bundle: Path, keys: list[Path]) -> None:
    """`--trusted-key`: refuse, before any work, a bundle not signed by one of `keys`."""
    if not keys:
        return
    from embryo_ml.export.signing import verify_bundle

    _, signer = verify_bundle(bundle, keys)
    print(f"bundle signed by trusted key {signer.key_id} ({signer.source.name})")


def _warn_about_bundle(folder: Path) -> None:
    """Warn once when the bundle's model did not pass its validation check."""
    from embryo_ml.export.bundle import read_bundle, validation_warning

    warn(validation_warning(read_bundle(folder, verify=False)))  # verified by the command


def _write_report(args: argparse.Namespace, scores: Path, images: Path | None) -> None:
    from embryo_ml.report.html import write_report

    out = write_report(scores, args.bundle, args.report, images=images,
                       heatmaps=not args.no_heatmaps, max_thumbnails=args.max_thumbnails,
                       threads=args.threads, progress=show_progress(args))
    print(f"report -> {out}")


def add_score(parser: argparse.ArgumentParser) -> None:
    from embryo_ml.score.cohort import AGGREGATES
    from embryo_ml.score.distributed import DEFAULT_SHARD_SIZE
    from embryo_ml.score.scorer import score_images
    from embryo_ml.score.session import PRECISIONS

    parser.add_argument("images", type=Path,
                        help="folder of images (searched recursively) or a manifest CSV (its "
                        "`day` column feeds a bundle's day prior)")
    parser.add_argument("--bundle", type=Path, required=True,
                        help="scoring bundle folder (from `export`)")
    parser.add_argument("--out", type=Path, default=SCORES_FILE,
                        help="per-image scores; format by extension: .csv, .jsonl or .parquet. "
                        "Per-embryo results go beside it: scores.csv -> scores.embryos.csv")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and score only the images not in it")
    parser.add_argument("--tta", action="store_true",
                        help="average the logits over the 8 flips/90-degree rotations")
    parser.add_argument("--aggregate", choices=AGGREGATES,
                        default=default_of(score_images, "aggregate"),
                        help="embryo score from its images' scores")
    parser.add_argument("--embryo-pattern", metavar="REGEX",
                        help="regex searched in each image's path, named group embryo_id and "
                        "optionally patient_id, e.g. '(?P<embryo_id>\\d+)_(?P<focal_plane>-?\\d+)'")
    parser.add_argument("--batch-size", type=positive,
                        default=default_of(score_images, "batch_size"),
                        help="images per model run")
    parser.add_argument("--workers", type=positive, default=default_of(score_images, "workers"),
                        help="--engine local: decoding threads (not given: one per core, at most "
                        "4); --engine dask: worker processes of a cluster started on this "
                        "machine, one thread each (not given: one per core)")
    add_threads(parser)
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: score in this process; dask: on a Dask cluster, one on "
                        "this machine (--workers) or a running one (--scheduler), --threads "
                        "per worker (not given: the worker's thread count); needs "
                        "pip install 'embryo-ml[dask]'")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="--engine dask: the address of a running Dask scheduler, e.g. "
                        "tcp://10.0.0.5:8786; its workers need embryo-ml and read access to "
                        "the images and bundle at the same paths")
    parser.add_argument("--shard-size", type=positive, default=DEFAULT_SHARD_SIZE,
                        help="--engine dask: images per task (rounded up to a multiple of "
                        "--batch-size)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        default=default_of(score_images, "precision"),
                        help="model to score with: auto = the bundle's int8 model when it has "
                        "one (2-3x faster on CPU, checked against fp32 at export), else fp32")
    parser.add_argument("--max-pixels", type=positive,
                        default=default_of(score_images, "max_pixels"),
                        help="refuse images with more pixels (decompression-bomb guard)")
    parser.add_argument("--report", type=Path, metavar="HTML",
                        help="also write the HTML report (one self-contained file) when done")
    add_trusted_key(parser)
    add_report_options(parser)
    parser.set_defaults(func=run_score)


def _print_scored(summary: ScoreSummary) -> None:
    """The run in a few lines: counts and speed, where the files are, which images failed."""
    resumed = f", {summary.n_resumed} already there" if summary.n_resumed else ""
    print(f"scored {summary.n_scored} of {summary.n_images} images{resumed} in "
          f"{summary.seconds:.1f}s ({summary.images_per_second:.0f} images/s, "
          f"{summary.precision} model) -> {summary.out}")
    print(f"{summary.n_embryos} embryo(s) -> {summary.embryos_out}")
    if summary.n_failed:
        print(f"{summary.n_failed} image(s) could not be scored (see the 'status' column):")
        for path, status in summary.failures[:FAILURES_SHOWN]:
            print(f"  {path}: {status}")
        if summary.n_failed > FAILURES_SHOWN:
            print(f"  ... and {summary.n_failed - FAILURES_SHOWN} more")


def _check_engine(args: argparse.Namespace) -> None:
    """Options of the other engine are a mistake, said before any work."""
    if args.engine == "local" and args.scheduler is not None:
        raise EmbryoMLError("--scheduler needs --engine dask")


def run_score(args: argparse.Namespace) -> int:
    from embryo_ml.score.scorer import ScoringInterrupted, score_images
    from embryo_ml.score.shift import shift_warning

    if args.report is not None and args.report.is_dir():  # before the work, not after it
        raise EmbryoMLError(f"--report {args.report} is a folder; give an .html file name")
    _check_engine(args)
    _check_trusted(args.bundle, args.trusted_key)
    options = dict(batch_size=args.batch_size, threads=args.threads, progress=show_progress(args),
                   max_pixels=args.max_pixels, resume=args.resume, tta=args.tta,
                   aggregate=args.aggregate, embryo_pattern=args.embryo_pattern,
                   precision=args.precision)
    try:
        if args.engine == "dask":
            from embryo_ml.score.distributed import score_images_dask

            summary = score_images_dask(args.images, args.bundle, args.out, workers=args.workers,
                                        scheduler=args.scheduler, shard_size=args.shard_size,
                                        **options)
        else:
            summary = score_images(args.images, args.bundle, args.out, workers=args.workers,
                                   **options)
    except ScoringInterrupted as stop:
        kept = stop.summary.n_images + stop.summary.n_resumed
        print(f"stopped: {kept} row(s) kept in {stop.summary.out}; run the same command with "
              "--resume to score the rest", file=sys.stderr)
        raise
    _print_scored(summary)
    warn(summary.validation_warning)  # beside the results it qualifies
    warn(summary.prior_warning)  # images scored without the day prior the model was fit with
    warn(summary.day_warning)  # images whose stated day they do not look like (day_mismatch)
    warn(shift_warning(summary.shift))  # `warning: dataset shift: ...` for a shifted run
    if args.report is not None:
        _write_report(args, summary.out, args.images)
    return 0


def add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scores", type=Path, help="scores file from `score` (.csv/.jsonl/.parquet)")
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle that scored it")
    parser.add_argument("--out", dest="report", type=Path, default=REPORT_FILE,
                        metavar="HTML", help="the report to write")
    parser.add_argument("--images", type=Path, default=None,
                        help="the folder (or manifest CSV) that was scored: image paths in the "
                        "scores are relative to it (default: the scores file's folder)")
    add_threads(parser)
    add_trusted_key(parser)
    add_report_options(parser)
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    _check_trusted(args.bundle, args.trusted_key)
    _write_report(args, args.scores, args.images)
    _warn_about_bundle(args.bundle)  # after the work: an error stays the only line
    return 0


def add_explain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="the image to explain")
    parser.add_argument("--bundle", type=Path, required=True,
                        help="scoring bundle folder (from `export`)")
    parser.add_argument("--out", type=Path, default=OVERLAY_FILE,
                        help="PNG: the image and its heatmap overlay side by side")
    parser.add_argument("--class", dest="class_name", metavar="NAME",
                        help="show the evidence for this class (default: the predicted class)")
    parser.add_argument("--day", default="", metavar="VALUE",
                        help="the image's day (the value of the bundle's day-prior column), so "
                             "that the score and predicted class are those `score` gives from a "
                             "manifest with it (default: from the image alone)")
    add_threads(parser)
    add_trusted_key(parser)
    parser.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    """A heatmap is a score too: the same signature check and validation warning as `score`."""
    from embryo_ml.score.explain import explain_image

    _check_trusted(args.bundle, args.trusted_key)
    result = explain_image(args.image, args.bundle, args.out, class_name=args.class_name,
                           threads=args.threads, day=args.day)
    print(f"score {result.score:.4f} (calibrated probability of {result.positive_class!r}); "
          f"heatmap of the evidence for {result.class_name!r}")
    print(f"wrote {args.out} (left: the image, right: the heatmap over it)")
    _warn_about_bundle(args.bundle)  # after the work: an error stays the only line
    note = _explain_day_note(args.bundle, args.day)
    if note:
        warn(note)
    return 0


def _explain_day_note(bundle_dir: Path, day: str) -> str:
    """Why `explain`'s score may differ from the scores file's: the model's day prior was not
    used (no --day, or a day it has no offset for), or --day was given to a model without one."""
    from embryo_ml.evaluation.prior import prior_value
    from embryo_ml.export.bundle import read_bundle

    prior = read_bundle(bundle_dir, verify=False).prior  # verified by the command
    if prior is None:
        return ("--day is ignored: this model has no day prior (its scores come from the image "
                "alone)") if day else ""
    column, known = prior["column"], sorted(prior["offsets"])
    if not day:
        return (f"this score is from the image alone: the model also uses the {column!r} where "
                f"a manifest gives it ({', '.join(known)}); pass --day to see the score "
                "`score` gives then")
    if prior_value(day) not in prior["offsets"]:
        return (f"--day {day!r} is not one the model has a prior for ({', '.join(known)}): "
                "this score is from the image alone")
    return ""
