"""The files a scoring run keeps beside its scores: the settings sidecar that `--resume` and
`report` check, the rows a resumed run reads back, and the guard that keeps a run from writing
over its own inputs. The files' formats belong to `embryo_ml.data.scores_file`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from embryo_ml.data.images import is_image_file
from embryo_ml.data.scores_file import (
    embryos_path,
    iter_file_rows,
    partial_path,
    recover_rows,
    settings_path,
    write_table,
)
from embryo_ml.errors import ConfigError
from embryo_ml.export.bundle import Bundle
from embryo_ml.score.cohort import Cohorts
from embryo_ml.score.session import OnnxScorer


def run_settings(bundle: Bundle, scorer: OnnxScorer, embryo_pattern: str | None
                 ) -> dict[str, Any]:
    """What decides the numbers in a scores file: the bundle (its identity `bundle_sha256`,
    which covers bundle.json and every file in it), the model file, test-time augmentation and
    how embryos are named, and whether the model passed its validation check. Written beside it
    (`settings_path`) when a run starts, and again with the run's dataset-shift record
    (`"shift"`, `embryo_ml.score.shift`) when it finishes; `--resume` checks the first four,
    `report` the bundle."""
    int8 = scorer.precision == "int8" and bundle.int8 is not None
    model_sha = bundle.int8["sha256"] if int8 else bundle.sha256  # type: ignore[index]
    return {"bundle_sha256": bundle.bundle_sha256, "model": scorer.precision,
            "model_sha256": model_sha,
            "tta": scorer.tta, "embryo_pattern": embryo_pattern, "bundle": str(bundle.path),
            "validation": bundle.verdict}  # the model's quality gate; None = before the gate


def check_resumable(out: Path, settings: dict[str, Any]) -> None:
    """`--resume` must not mix scores of two models or option sets in one file: ConfigError
    (one line) when the earlier run's settings differ. An output without settings (written by an
    older version) cannot be checked and is resumed."""
    path = settings_path(out)
    if not path.is_file() or not (out.is_file() or partial_path(out).is_file()):
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    differ = []
    if earlier.get("bundle_sha256", settings["bundle_sha256"]) != settings["bundle_sha256"]:
        differ.append(f"bundle {str(earlier['bundle_sha256'])[:12]}... -> "
                      f"{str(settings['bundle_sha256'])[:12]}... (bundle.json or a file in it "
                      "changed)")
    if earlier.get("model_sha256", settings["model_sha256"]) != settings["model_sha256"]:
        differ.append(f"model {earlier.get('model')} {str(earlier['model_sha256'])[:12]}... -> "
                      f"{settings['model']} {settings['model_sha256'][:12]}...")
    for key, option in (("tta", "--tta"), ("embryo_pattern", "--embryo-pattern")):
        if key in earlier and earlier[key] != settings[key]:
            differ.append(f"{option} {earlier[key]!r} -> {settings[key]!r}")
    if differ:
        said = ", ".join(differ)
        raise ConfigError(f"--resume: {out} was scored with other settings ({said}; see "
                          f"{path.name}); resume with the same bundle and options, or score to "
                          "a new --out")


def read_back(out: Path, columns: list[str], cohorts: Cohorts) -> set[str]:
    """The paths already scored (the partial file's rows, a torn last record dropped; see
    `recover_rows`); their scores go to `cohorts`. Ranks of a finished earlier run are cleared,
    so the file never shows stale ranks if this run is interrupted too."""
    done: set[str] = set()
    ranked = False
    for row in recover_rows(out, columns):
        done.add(str(row["path"]))
        cohorts.add(row)
        ranked = ranked or row.get("rank_in_cohort") not in (None, "")
    if ranked:
        partial = partial_path(out)
        write_table(partial, columns,
                    ({**row, "rank_in_cohort": ""} for row in iter_file_rows(partial)))
    return done


def with_rank(row: dict[str, Any], cohorts: Cohorts) -> dict[str, Any]:
    rank = cohorts.rank_of(row)
    return {**row, "rank_in_cohort": "" if rank is None else str(rank)}


def refuse_overwriting_inputs(source: str | os.PathLike[str], out: Path) -> None:
    """ConfigError (one line), before any work, when a file this run writes (`out`, its partial
    file, embryos table or settings) is one of its inputs: the manifest being scored, an image
    it lists, or an image inside the scored folder."""
    partial = partial_path(out)
    written = {out: "scores", partial: "partial file", embryos_path(out): "embryos table",
               settings_path(out): "settings file", settings_path(partial): "settings file"}
    source = Path(source)
    inputs: list[tuple[Path, str]] = []
    if source.is_file():
        inputs = [(source, "the manifest being scored")]
        inputs += [(image, f"an image being scored ({image})")
                   for image in _listed_like(source, [p.name for p in written])]
    elif source.is_dir():
        inputs = [(path, f"an image being scored ({path})") for path in written
                  if is_image_file(path) and source.resolve() in path.resolve().parents]
    for path, kind in written.items():
        for given, what in inputs:
            if _same_file(path, given) and path == out:
                raise ConfigError(f"--out {out} is {what}; choose another --out")
            if _same_file(path, given):
                raise ConfigError(f"--out {out} would overwrite {what} with its {kind} "
                                  f"({path}); choose another --out")


def _listed_like(manifest: Path, names: list[str]) -> list[Path]:
    """The manifest's entries whose path ends like one of `names` (only those can be a file
    this run writes), resolved against its folder as `read_manifest` does."""
    try:
        raw = pd.read_csv(manifest, usecols=["path"], dtype="string", keep_default_na=False)
    except (ValueError, OSError):
        return []  # `iter_items` says what is wrong with it
    paths = raw["path"]
    like = paths[paths.str.lower().str.endswith(tuple(n.lower() for n in names))]
    base = manifest.resolve().parent
    return [base / p for p in like]


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links, case-insensitive file systems
    except OSError:
        return False  # one of them does not exist yet
