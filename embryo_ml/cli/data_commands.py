"""The `data` commands: `manifest` (a manifest CSV from a folder or CSV), `split` (grouped,
stratified test split and folds) and `check` (counts, duplicates, unreadable files, leakage)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from embryo_ml.cli.common import (
    add_library_options,
    count,
    default_of,
    output_file,
    show_progress,
)

SPLITS_FILE = Path("splits.csv")  # `data split --out`


def add_manifest(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="image folder or manifest CSV")
    parser.add_argument("--pattern", help="regex searched in each relative path; named groups "
                        "become columns, e.g. '(?P<embryo_id>\\d+)_(?P<focal_plane>-?\\d+)_"
                        "(?P<grade>[^.]+)'")
    parser.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    parser.add_argument("--label-from-folder", action="store_true",
                        help="label = top-level folder name (default only without --pattern)")
    parser.add_argument("--allow-unmatched", action="store_true",
                        help="keep paths the pattern does not match (empty columns)")
    parser.set_defaults(func=run_manifest)


def run_manifest(args: argparse.Namespace) -> int:
    from embryo_ml.data.manifest import build_manifest, write_manifest

    output_file(args.out, "--out")
    table = build_manifest(args.source, args.pattern, out=args.out,
                           label_from_folder=True if args.label_from_folder else None,
                           allow_unmatched=args.allow_unmatched)
    write_manifest(table, args.out)
    columns = ", ".join(c for c in table.columns if c != "path")
    print(f"wrote {args.out}: {len(table)} images; columns: {columns or '(path only)'}")
    return 0


def add_split(parser: argparse.ArgumentParser) -> None:
    from embryo_ml.data.splits import make_splits

    parser.add_argument("manifest", type=Path,
                        help="manifest CSV with labels (patient_id or embryo_id group the rows)")
    add_library_options(
        parser, make_splits,
        ("--folds", "folds", int, "cross-validation folds over the rows not in the test split"),
        ("--test-fraction", "test_fraction", float,
         "share of the rows held out as the test split (whole groups)"),
        ("--seed", "seed", int, "random seed: the same seed gives the same split"))
    parser.add_argument("--out", type=Path, default=SPLITS_FILE,
                        help="CSV to write: path, split, fold, group")
    parser.set_defaults(func=run_split)


def run_split(args: argparse.Namespace) -> int:
    from embryo_ml.data.manifest import load_labelled, write_manifest
    from embryo_ml.data.splits import make_splits

    output_file(args.out, "--out")
    table = load_labelled(args.manifest)
    splits = make_splits(table, folds=args.folds, test_fraction=args.test_fraction,
                         seed=args.seed)
    base = args.out.resolve().parent
    splits["path"] = [os.path.relpath(p, base).replace(os.sep, "/") for p in splits["path"]]
    write_manifest(splits, args.out)
    sizes = splits.groupby(["split", "fold"]).size()
    print(f"wrote {args.out}: " + ", ".join(
        ("test" if split == "test" else f"fold {fold}") + f" {n}"
        for (split, fold), n in sizes.items()))
    print("verified: no group in two folds or in both train and test")
    return 0


def add_check(parser: argparse.ArgumentParser) -> None:
    from embryo_ml.data.check import check_data

    parser.add_argument("data", type=Path, help="manifest CSV or folder-per-class tree")
    parser.add_argument("--splits", type=Path, help="splits.csv to check for leakage")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    parser.add_argument("--near-threshold", type=count,
                        default=default_of(check_data, "near_threshold"),
                        help="max differing bits of the perceptual hash for a near-duplicate")
    parser.add_argument("--allow", action="store_true",
                        help="exit 0 even with unreadable files or leakage")
    parser.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    import json

    from embryo_ml.data.check import check_data
    from embryo_ml.data.check_format import format_report
    from embryo_ml.data.manifest import load_table, read_manifest
    from embryo_ml.data.splits import split_parts
    from embryo_ml.fileio import atomic_write_text

    if args.json:
        output_file(args.json, "--json")  # before the check, not after it
    table = load_table(args.data)
    splits = None
    if args.splits:
        splits = read_manifest(args.splits)
        splits = splits.assign(split=split_parts(splits))
    report = check_data(table, splits, near_threshold=args.near_threshold,
                        progress=show_progress(args))
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_json(), indent=2))
        print(f"wrote {args.json}")
    return 0 if report.ok(allow=args.allow) else 1
