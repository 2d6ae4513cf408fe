#!/usr/bin/env python
"""`embryo-ml score --engine dask --workers 2` vs `--engine local`: images/s and the same rows.

Same machine, same bundle, same N images in one run (default 2,000 synthetic embryos stored as
500 px JPEGs, like clinic exports). Each side is one fresh `embryo-ml score` process, timed from
start to exit: Python start-up, the bundle check, for dask the local cluster's start (2 worker
processes of one thread each) and shut-down, decoding, inference and every file written. Runs
are interleaved (local, dask, then dask, local, ...), and the ratio is the median over
repetitions of dask images/s / local images/s within one repetition. Both use `--precision
fp32` (the check below is on the fp32 model) and the same `--batch-size`.

The rows are then compared: every path once in each output, the same paths, every text column
equal (status, label, flags, ids, rank) and every score and class probability within 1e-5.

Goal: ratio >= 0.85 (what the scheduler, the worker processes and the part files cost).

    python benchmarks/score_distributed.py                         # resnet18 @ 224 px, ~6 min
    python benchmarks/score_distributed.py --model resnet10t --size 64 --reps 3
    python benchmarks/score_distributed.py --bundle DIR --images 40  # an existing bundle
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import median, print_table, workspace, write_json

GOAL = 0.85
TOLERANCE = 1e-5
ENGINES = ("local", "dask")
_SECONDS = re.compile(r"scored \d+ of (\d+) images.* in ([0-9.]+)s")


def score_command(engine: str, folder: Path, bundle: Path, out: Path,
                  args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "embryo_ml.cli", "-q", "score", str(folder), "--bundle",
               str(bundle), "--out", str(out), "--precision", "fp32", "--batch-size",
               str(args.batch_size)]
    if engine == "dask":
        command += ["--engine", "dask", "--workers", str(args.workers)]
        if args.shard_size:
            command += ["--shard-size", str(args.shard_size)]
    return command


def run_engine(engine: str, folder: Path, bundle: Path, out: Path,
               args: argparse.Namespace) -> dict[str, Any]:
    """One `embryo-ml score` process: wall seconds, and the seconds it reports itself (from
    the bundle check to the last file, so without Python's start-up)."""
    started = time.perf_counter()
    done = subprocess.run(score_command(engine, folder, bundle, out, args), capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{engine} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    match = _SECONDS.search(done.stdout)
    n, inside = (int(match.group(1)), float(match.group(2))) if match else (0, float("nan"))
    return {"engine": engine, "n": n, "wall_s": wall, "ips": n / wall,
            "command_s": inside, "command_ips": n / inside if inside else float("nan")}


def compare_rows(local: Path, dask: Path) -> dict[str, Any]:
    """Every path once in each, the same paths, text columns equal, numbers within 1e-5."""
    def read(path: Path) -> list[dict[str, str]]:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    a, b = read(local), read(dask)
    by_path = {row["path"]: row for row in b}
    unique = len({r["path"] for r in a}) == len(a) and len(by_path) == len(b)
    numeric = [c for c in (a[0] if a else {}) if c == "score" or c.startswith("p_")]
    worst, unequal = 0.0, 0
    for row in a:
        other = by_path.get(row["path"])
        if other is None:
            unequal += 1
            continue
        for column, value in row.items():
            if column in numeric and value and other[column]:
                worst = max(worst, abs(float(value) - float(other[column])))
            elif value != other[column]:
                unequal += 1
    same = unique and set(by_path) == {r["path"] for r in a} and unequal == 0
    return {"n_local": len(a), "n_dask": len(b), "every_path_once": unique,
            "unequal_cells": unequal, "max_abs_score_diff": worst,
            "same_rows": same and worst <= TOLERANCE}


def bundle_for(work: Path, args: argparse.Namespace) -> Path:
    if args.bundle is not None:
        return args.bundle
    from score_throughput import train_bundle  # a 1-epoch model, exported as a bundle

    return train_bundle(work / "model", args)[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default="resnet18", help="timm model (default resnet18)")
    parser.add_argument("--size", type=int, default=224, help="model input size in px")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="score with this bundle instead of training one")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="dask worker processes")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="dask images per task (default: the engine's)")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    images = parser.add_argument_group("the images (`bench_common.workspace` makes them)")
    for flag, kind, default, text in (
            ("--images", int, 2000, "how many"),
            ("--source-size", int, 500, "side in px, like clinic JPEGs"),
            ("--source-format", str, "jpg", "jpg or png"),
            ("--seed", int, 0, "of the synthetic embryos"),
            ("--work", Path, None, "keep them (and the model, the outputs) in this folder, "
                                   "reused when given again; default: a temporary folder")):
        images.add_argument(flag, type=kind, default=default, help=text)
    return parser.parse_args(argv)


def summarise(runs: list[dict[str, Any]], rows: dict[str, Any], reps: int) -> dict[str, Any]:
    """Median images/s of each engine and of the ratio within a repetition; printed."""
    by = {(r["engine"], r["rep"]): r for r in runs}

    def ratio(key: str) -> float:
        return median([by[("dask", r)][key] / by[("local", r)][key] for r in range(reps)])

    summary = {f"{e}_ips": median([by[(e, r)]["ips"] for r in range(reps)]) for e in ENGINES}
    summary |= {"ratio_dask_local": ratio("ips"), "ratio_reported": ratio("command_ips")}
    print()
    print_table(["engine", "img/s (process)", "img/s (reported)"],
                [[e, summary[f"{e}_ips"], median([by[(e, r)]["command_ips"] for r in range(reps)])]
                 for e in ENGINES])
    met = "met" if summary["ratio_dask_local"] >= GOAL else "not met"
    print(f"\ndask / local  {summary['ratio_dask_local']:.2f}  (goal >= {GOAL}: {met}); as "
          f"reported by the command (no Python start-up): {summary['ratio_reported']:.2f}")
    print(f"rows: {rows['n_local']} local, {rows['n_dask']} dask, every path once: "
          f"{rows['every_path_once']}, unequal cells: {rows['unequal_cells']}, max score "
          f"difference {rows['max_abs_score_diff']:.2g} -> "
          f"{'same rows' if rows['same_rows'] else 'ROWS DIFFER'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with workspace(args, "score-distributed-") as (work, manifest):
        folder = manifest.parent / "images"
        bundle = bundle_for(work, args)
        print(f"{args.images} images ({args.source_size} px {args.source_format}), bundle "
              f"{bundle}, fp32, batch {args.batch_size}, dask --workers {args.workers}, "
              f"{args.reps} interleaved reps", flush=True)
        runs: list[dict[str, Any]] = []
        for rep in range(args.reps):
            for engine in ENGINES if rep % 2 == 0 else ENGINES[::-1]:
                result = run_engine(engine, folder, bundle, work / f"{engine}.csv", args)
                runs.append({"rep": rep, **result})
                print(f"  rep {rep} {engine}: {result['ips']:.1f} img/s "
                      f"({result['wall_s']:.1f} s)", flush=True)
        rows = compare_rows(work / "local.csv", work / "dask.csv")
    summary = summarise(runs, rows, args.reps)
    write_json(args.json, {
        "benchmark": "score_distributed",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "work")},
        "summary": summary,
        "goals": {"ratio_dask_local": GOAL, "met": summary["ratio_dask_local"] >= GOAL},
        "rows": rows, "runs": runs,
    })
    return 0 if rows["same_rows"] else 1

if __name__ == "__main__":
    sys.exit(main())
