"""Long fuzzing run of the readers of user input (the properties of `tests/test_fuzz.py`).

    python benchmarks/fuzz_long.py [--examples 5000] [--targets image manifest ...]
        [--bundle BUNDLE_DIR] [--seed N] [--work DIR] [--json out.json]

Each target (image reader, manifest reader, Gardner grade parser, config loader, `read_bundle`)
must either return a well-formed result or raise its documented error type, within the
per-example deadline; `tests/fuzz_targets.py` defines what is fed and what is checked. The suite
runs a few seconds of each, derandomized; this script runs many more examples, derandomized by
default too (the same examples on every machine) or from `--seed` for fresh ones.

The bundle target tampers with a copy of `--bundle` (a real exported bundle gives the most
fields to tamper with); without it, a hand-built bundle (`tests/fake_bundle.py`) is used.
Prints examples/s per target and each failure (Hypothesis's shrunk example and the error);
exits 1 when any target failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `tests.fuzz_targets`, `tests.fake_bundle`

from tests.fuzz_targets import TARGETS, fuzz_settings, make_resources, run_target  # noqa: E402


def _fake_bundle(folder: Path) -> Path:
    import numpy as np

    from tests.fake_bundle import make_fake_bundle

    return make_fake_bundle(folder, np.eye(3, 2, dtype=np.float32))


def fuzz_one(name: str, res, examples: int, deadline_ms: float,
             random_seed: int | None) -> dict:
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1

    chosen = fuzz_settings(examples, deadline_ms, derandomize=random_seed is None,
                           print_blob=True)
    start = time.perf_counter()
    failure = None
    try:
        run_target(name, res, chosen, on_example=tick, random_seed=random_seed)
    except Exception as error:  # a property failed: the shrunk examples are in the notes
        traceback.print_exception(error, file=sys.stdout)
        failure = "".join(traceback.format_exception_only(type(error), error)).strip()
    seconds = time.perf_counter() - start
    return {"target": name, "examples": count, "seconds": round(seconds, 2),
            "examples_per_s": round(count / seconds, 1) if seconds else None,
            "failure": failure}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="examples per target")
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
    parser.add_argument("--bundle", type=Path, help="an exported bundle to tamper with")
    parser.add_argument("--seed", type=int, help="random examples from this seed (default: "
                        "derandomized, the same on every run)")
    parser.add_argument("--deadline-ms", type=float, default=2000,
                        help="a single example slower than this fails (a hang)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        work = args.work or Path(tmp)
        bundle = args.bundle
        if bundle is None and any(TARGETS[t].needs_bundle for t in args.targets):
            bundle = _fake_bundle(work / "fake-bundle")
        res = make_resources(work / "scratch", bundle)
        results = []
        for name in args.targets:
            result = fuzz_one(name, res, args.examples, args.deadline_ms, args.seed)
            results.append(result)
            status = "ok" if result["failure"] is None else f"FAILED: {result['failure']}"
            print(f"{name:9s} {result['examples']:7d} examples in {result['seconds']:7.1f}s "
                  f"({result['examples_per_s']} examples/s): {status}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"examples": args.examples, "seed": args.seed,
                                         "results": results}, indent=2), encoding="utf-8")
    failed = [r["target"] for r in results if r["failure"]]
    print(f"{len(failed)} of {len(results)} target(s) failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
