"""`embryo-ml score --engine dask` on a real Dask `LocalCluster` (2 worker processes, 1 thread
each): the same rows as the local engine, a stop then `--resume` (in process and a real SIGTERM
to the CLI), a worker killed mid-shard, a shard of unreadable files, and a scheduler address where
nothing listens. Most tests share one cluster (`--scheduler`); the CLI ones start their own.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("distributed", reason="the dask extra is not installed (pip install "
                    "-e '.[dask]')")

from distributed import WorkerPlugin  # noqa: E402

import embryo_ml.score.distributed as engine  # noqa: E402
from embryo_ml.cli import main  # noqa: E402
from embryo_ml.data.scores_file import DATASET_COMPLETE, embryos_path, settings_path  # noqa: E402
from embryo_ml.score.cluster import WORKER_SETUP  # noqa: E402
from embryo_ml.score.distributed import score_images_dask, whole_batches  # noqa: E402
from embryo_ml.score.parts import Staging, part_files, staging_path  # noqa: E402
from embryo_ml.score.scorer import ScoringInterrupted, score_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
FP32 = {"precision": "fp32", "progress": False}


@pytest.fixture(scope="module")
def scheduler() -> str:
    """The address of a LocalCluster shared by this module's in-process tests."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      preload=[WORKER_SETUP]) as cluster:
        yield cluster.scheduler_address


def read_rows(path: Path) -> pd.DataFrame:
    """A scores file or a Parquet dataset folder as text columns (numbers as the CSV has them)."""
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    else:
        table = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines()])
    for column in table.columns:
        if column in ("display_score", "rank_in_cohort"):
            table[column] = ["" if pd.isna(v) else str(int(v)) for v in table[column]]
        elif column == "score" or column.startswith("p_"):
            table[column] = ["" if pd.isna(v) else f"{v:.6f}" for v in table[column]]
    return table.fillna("").astype(str)


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Every path once, the same paths in the same order, text columns equal, numbers within
    1e-5."""
    assert got["path"].is_unique and list(got["path"]) == list(want["path"])
    assert list(got.columns) == list(want.columns)
    for column in want.columns:
        if column == "score" or column.startswith("p_"):
            a = pd.to_numeric(got[column], errors="coerce")
            b = pd.to_numeric(want[column], errors="coerce")
            assert ((a - b).abs().fillna(0) <= TOLERANCE).all(), column
            assert (a.isna() == b.isna()).all(), column
        else:
            assert list(got[column]) == list(want[column]), column


def _local(source: Path, bundle: Path, out: Path, **options) -> pd.DataFrame:
    score_images(source, bundle, out, **FP32, **options)
    return read_rows(out)


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_same_rows_and_files_as_the_local_engine(
    scheduler: str, bundle_dir: Path, synth_data: Path, tmp_path: Path, ext: str
) -> None:
    want = _local(synth_data, bundle_dir, tmp_path / f"local{ext}")
    out = tmp_path / f"dask{ext}"
    summary = score_images_dask(synth_data, bundle_dir, out, scheduler=scheduler,
                                shard_size=32, **FP32)
    assert summary.n_images == summary.n_scored == len(want) == 120
    assert_same_rows(read_rows(out), want)
    assert_same_rows(read_rows(embryos_path(out)).rename(columns={"embryo_id": "path"}),
                     read_rows(embryos_path(tmp_path / f"local{ext}")).rename(
                         columns={"embryo_id": "path"}))
    local_settings = json.loads(settings_path(tmp_path / f"local{ext}").read_text())
    assert json.loads(settings_path(out).read_text()) == local_settings  # shift record too
    assert not staging_path(out).exists()
    if ext == ".parquet":  # a dataset folder: one part per shard, then the marker
        assert out.is_dir() and (out / DATASET_COMPLETE).is_file()
        assert len(part_files(out)) == 4
        _report_reads_the_dataset(out, bundle_dir, tmp_path)


def _report_reads_the_dataset(out: Path, bundle_dir: Path, tmp_path: Path) -> None:
    """`report` (and every reader of scores files) reads a finished dataset folder, and refuses
    an unfinished one in one line."""
    from embryo_ml.data.scores_file import iter_file_rows
    from embryo_ml.errors import DataError
    from embryo_ml.report.html import write_report

    assert len(list(iter_file_rows(out))) == 120
    report = write_report(out, bundle_dir, tmp_path / "report.html")
    assert report.read_text(encoding="utf-8").count("P0001") > 0
    (out / DATASET_COMPLETE).unlink()
    with pytest.raises(DataError, match="unfinished Parquet dataset"):
        list(iter_file_rows(out))


def test_the_cli_runs_on_a_running_scheduler(
    scheduler: str, bundle_dir: Path, synth_data: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    want = _local(synth_data, bundle_dir, tmp_path / "local.csv")
    out = tmp_path / "dask.csv"
    code = main(["-q", "score", str(synth_data), "--bundle", str(bundle_dir), "--out", str(out),
                 "--engine", "dask", "--scheduler", scheduler, "--shard-size", "20",
                 "--precision", "fp32"])
    assert code == 0, capsys.readouterr().err
    assert "scored 120 of 120 images" in capsys.readouterr().out
    assert_same_rows(read_rows(out), want)  # shards of 20 -> 32: the local engine's batches


def test_options_of_the_other_engine_are_refused(
    bundle_dir: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["-q", "score", str(synth_data), "--bundle", str(bundle_dir), "--out",
            str(tmp_path / "s.csv")]
    assert main([*base, "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith("error: --scheduler needs --engine dask")
    assert main([*base, "--engine", "dask", "--workers", "2", "--scheduler", "x:1"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert whole_batches(20, 32) == 32 and whole_batches(64, 32) == 64
    assert whole_batches(65, 32) == 96


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_scheduler_that_does_not_answer_fails_fast_with_one_line(
    bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "embryo_ml.cli", "score", str(synth_data), "--bundle",
         str(bundle_dir), "--out", str(tmp_path / "s.csv"), "--engine", "dask", "--scheduler",
         address], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 15
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --scheduler {address}: "), lines
    assert not (tmp_path / "s.csv").exists()


def test_a_stop_keeps_finished_shards_and_resume_scores_the_rest(
    scheduler: str, bundle_dir: Path, synth_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM (to this process, from inside the driver's loop) after the 2nd finished shard:
    the shards in flight finish, nothing more is submitted; --resume scores the rest."""
    want = _local(synth_data, bundle_dir, tmp_path / "local.csv", batch_size=8)
    out = tmp_path / "dask.csv"
    real, collected = engine._DaskRun._collect, []

    def collect_then_stop(self, future, items, bar) -> None:
        real(self, future, items, bar)
        collected.append(future)
        if len(collected) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(engine._DaskRun, "_collect", collect_then_stop)
    options = {"scheduler": scheduler, "shard_size": 8, "batch_size": 8, **FP32}
    with pytest.raises(ScoringInterrupted) as stopped:
        score_images_dask(synth_data, bundle_dir, out, **options)
    kept = stopped.value.summary
    assert kept.out == staging_path(out) and not out.exists()
    parts = part_files(staging_path(out))
    assert 2 <= len(parts) < 15 and kept.n_images == 8 * len(parts)
    monkeypatch.setattr(engine._DaskRun, "_collect", real)

    summary = score_images_dask(synth_data, bundle_dir, out, resume=True, **options)
    assert summary.n_resumed == kept.n_images and summary.n_images == 120 - kept.n_images
    assert_same_rows(read_rows(out), want)  # exactly one row per image
    again = score_images_dask(synth_data, bundle_dir, out, resume=True, **options)
    assert again.n_images == 0 and again.n_resumed == 120  # nothing to do: no cluster needed
    assert_same_rows(read_rows(out), want)


def test_resume_keeps_only_the_parts_that_count(tmp_path: Path) -> None:
    """A part of an attempt older than the interrupted one landed late: its images were
    scored again since, so it is deleted; the interrupted attempt's parts are kept."""
    out = tmp_path / "scores.csv"
    staging = Staging(out)
    staging.begin({"bundle_sha256": "x"})  # attempt 1
    first = staging.part(0)
    first.write_text("path\n")
    staging.begin({"bundle_sha256": "x"})  # attempt 2: keeps attempt 1's part
    assert staging.attempt == 2 and staging.accepted == [first.name]
    late = staging.folder / "part-0001-000007.csv"  # attempt 1's shard, landed after 2 began
    late.write_text("path\n")
    own = staging.part(3)
    own.write_text("path\n")
    staging.begin({"bundle_sha256": "x"})  # attempt 3
    assert staging.accepted == [first.name, own.name] and not late.exists()
    assert staging.paths() == [first, own]


def _links(synth_data: Path, folder: Path, times: int) -> int:
    """`times` links to each synthetic image in one folder: that many more images to score."""
    sources = sorted((synth_data.parent / "images").rglob("*.png"))
    folder.mkdir()
    for copy, source in itertools.product(range(times), sources):
        (folder / f"{copy}_{source.name}").symlink_to(source)
    return times * len(sources)


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "embryo_ml.cli", "-q", "score", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_to_the_cli_then_resume_gives_one_row_per_image(
    scheduler: str, bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    n = _links(synth_data, folder, 4)
    out = tmp_path / "scores.parquet"
    args = [str(folder), "--bundle", str(bundle_dir), "--out", str(out), "--engine", "dask",
            "--shard-size", "8", "--batch-size", "8", "--precision", "fp32"]
    process = _cli([*args, "--workers", "2"])
    deadline = time.monotonic() + 120
    while len(part_files(staging_path(out))) < 2:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no part file within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"kept in {staging_path(out)}" in err and "--resume" in err
    kept = part_files(staging_path(out))
    assert 2 <= len(kept) < n // 8, "the run ended before SIGTERM arrived: give it more images"
    assert not out.exists()

    process = _cli([*args, "--scheduler", scheduler, "--resume"])  # any cluster resumes
    stdout, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert f"{8 * len(kept)} already there" in stdout
    final = pd.read_parquet(out)
    expected = {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}
    assert len(final) == n and set(final["path"]) == expected  # exactly one row per image
    assert (out / DATASET_COMPLETE).is_file() and not staging_path(out).exists()


class KillWorkerOnce(WorkerPlugin):
    """A worker plugin (test only): the first worker to start a shard is killed (SIGKILL)
    a moment later, once per marker file."""

    name = "kill-worker-once"

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key: object, start: str, finish: str, **kwargs: object) -> None:
        if finish != "executing" or "score-shard" not in str(key):
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()


def test_a_worker_killed_mid_shard_is_survived(
    bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster

    want = _local(synth_data, bundle_dir, tmp_path / "local.csv")
    marker = tmp_path / "killed"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(KillWorkerOnce(str(marker)))
        out = tmp_path / "dask.csv"
        summary = score_images_dask(synth_data, bundle_dir, out,
                                    scheduler=cluster.scheduler_address, shard_size=32, **FP32)
    assert marker.is_file()  # a worker did die under a shard
    assert summary.n_images == 120
    assert_same_rows(read_rows(out), want)


def test_a_shard_of_unreadable_files_gets_status_rows_like_the_local_engine(
    scheduler: str, synth_data: Path, bundle_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a0_torn.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    (folder / "a1_empty.jpg").write_bytes(b"")
    (folder / "a2_text.png").write_text("not an image")
    (folder / "a3_zeros.tif").write_bytes(b"\0" * 64)
    for image in sorted((synth_data.parent / "images").rglob("*.png"))[:4]:
        shutil.copy(image, folder / f"b_{image.name}")
    want = _local(folder, bundle_dir, tmp_path / "local.csv", batch_size=4)
    summary = score_images_dask(folder, bundle_dir, tmp_path / "dask.csv", scheduler=scheduler,
                                shard_size=4, batch_size=4, **FP32)
    got = read_rows(tmp_path / "dask.csv")
    assert_same_rows(got, want)
    assert (got["status"][:4].str.startswith("unreadable")).all()
    assert summary.n_failed == 4 and summary.n_scored == 4
    assert [path for path, _ in summary.failures] == list(got["path"][:4])


def test_shards_that_keep_failing_are_reported_with_their_images_and_resumed(
    scheduler: str, bundle_dir: Path, synth_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers that refuse the bundle (not the driver's): every shard fails after its retries;
    nothing more is submitted, no row is written for them, the message names the images and
    `failed.txt` lists them; --resume then scores them."""
    monkeypatch.setattr(engine, "identity", lambda bundle: "0" * 64)
    out = tmp_path / "dask.csv"
    options = {"scheduler": scheduler, "shard_size": 32, **FP32}
    with pytest.raises(engine.ShardsFailed) as failed:
        score_images_dask(synth_data, bundle_dir, out, **options)
    message = str(failed.value)
    assert "BundleError" in message and "--resume" in message and "\n" not in message
    listed = (staging_path(out) / "failed.txt").read_text().splitlines()
    assert listed == failed.value.images and listed[0] in message
    assert 0 < len(listed) <= 4 * 32 and not part_files(staging_path(out)) and not out.exists()
    monkeypatch.undo()
    want = _local(synth_data, bundle_dir, tmp_path / "local.csv")
    score_images_dask(synth_data, bundle_dir, out, resume=True, **options)
    assert_same_rows(read_rows(out), want)


def test_workers_run_the_model_on_their_own_threads(scheduler: str, bundle_dir: Path) -> None:
    """One ONNX Runtime session per worker process, with the worker's thread count (1)."""
    from distributed import Client

    from embryo_ml.export.bundle import identity, read_bundle
    from embryo_ml.score.shard import ShardJob, shard_scorer

    job = ShardJob(str(bundle_dir.resolve()), identity(read_bundle(bundle_dir)), None,
                   10_000_000, False, "fp32", 8, ("path",))

    def threads_and_session(job: ShardJob) -> tuple[int, int, bool]:
        first, second = shard_scorer(job), shard_scorer(job)
        return (first.session.get_session_options().intra_op_num_threads, os.getpid(),
                first is second)

    with Client(scheduler, set_as_default=False) as client:
        answers = [client.submit(threads_and_session, job, workers=[worker], pure=False).result()
                   for worker in client.nthreads()]
    assert [(threads, cached) for threads, _, cached in answers] == [(1, True)] * 2
    assert len({pid for _, pid, _ in answers}) == 2  # one session in each worker process


def test_benchmark_smoke(bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                         ) -> None:
    """`benchmarks/score_distributed.py` at its smallest: both engines, the same rows."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("score_distributed", None)
    module = importlib.import_module("score_distributed")
    result_file = tmp_path / "distributed.json"
    code = module.main(["--bundle", str(bundle_dir), "--images", "40", "--source-size", "64",
                        "--reps", "1", "--work", str(tmp_path / "work"),
                        "--json", str(result_file)])
    assert code == 0
    result = json.loads(result_file.read_text())
    assert result["benchmark"] == "score_distributed" and result["rows"]["same_rows"]
    for key in ("local_ips", "dask_ips", "ratio_dask_local"):
        assert result["summary"][key] > 0, key
    assert {r["engine"] for r in result["runs"]} == {"local", "dask"}


def test_the_scoring_path_imports_dask_only_when_the_engine_runs() -> None:
    code = ("import sys, embryo_ml.score.distributed, embryo_ml.score.shard; "
            "from embryo_ml.cli.parser import build_parser; build_parser(['score']); "
            "print(','.join(m for m in ('dask', 'distributed') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO)
    assert done.stdout.strip() == ""
