"""Smoke tests of the throughput benchmarks: each `main()` runs at its smallest settings and writes
a JSON with the expected fields and positive, finite numbers. The speed goals themselves are not
asserted (timings on shared CI machines vary too much); see benchmarks/README.md."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """Import a benchmark script as a module (they import their sibling `bench_common`)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_train_throughput_smoke(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    module = bench("train_throughput")
    out = tmp_path / "train.json"
    code = module.main([
        "--model", "test_resnet", "--size", "32", "--images", "40", "--epochs", "2",
        "--batch-size", "8", "--source-size", "64", "--reps", "1", "--baseline-workers", "0",
        "--variants", "w0-fp32-nchw-cache", "w0-bf16-cl-nocache",
        "--work", str(tmp_path / "work"), "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "train_throughput"
    assert result["settings"]["variants"] == ["w0-fp32-nchw-cache", "w0-bf16-cl-nocache"]
    summary = result["summary"]
    assert set(summary) == {"baseline", "w0-fp32-nchw-cache", "w0-bf16-cl-nocache"}
    for name, entry in summary.items():
        for key in ("ips_all", "ips_warm"):
            assert _positive(entry[key]), (name, key, entry[key])
        if name != "baseline":
            assert _positive(entry["ratio_all"]) and _positive(entry["ratio_warm"])
            assert _positive(entry["fit_wall_seconds"])
            assert 0.0 <= entry["val_auc_best"] <= 1.0
    assert {r["name"] for r in result["runs"]} == set(summary)
    assert all(len(r["epoch_seconds"]) == 2 for r in result["runs"])
    assert "goal" in result and "machine" in result
    assert "img/s all" in capsys.readouterr().out


@pytest.mark.slow
def test_score_throughput_smoke(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    module = bench("score_throughput")
    out = tmp_path / "score.json"
    code = module.main([
        "--model", "test_resnet", "--size", "32", "--images", "40", "--source-size", "64",
        "--batch-size", "16", "--eager-workers", "0", "--reps", "1", "--profile-sample", "5",
        "--work", str(tmp_path / "work"), "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "score_throughput"
    summary = result["summary"]
    for key in ("eager_ips", "ours_ips", "ort_model_only_ips", "ratio_ours_eager",
                "ratio_ours_ort_model_only", "eager_cpu_ms_per_image", "ours_cpu_ms_per_image",
                "ort_model_only_cpu_ms_per_image"):
        assert _positive(summary[key]), (key, summary[key])
    for key in ("decode_ms", "quality_ms", "preprocess_ms", "outside_model_ms"):
        assert _positive(result["per_image_ms"][key]), key
    expected = {"eager", "ours", "ours_no_trust", "ort_model_only"}
    assert _positive(summary["ratio_ours_no_trust"])  # the trust layer's cost, same run
    if summary["int8"]:  # the fp32 model is measured beside the bundle's int8 one
        expected |= {"ours_fp32", "ort_model_only_fp32"}
        for key in ("ratio_ours_fp32_eager", "ratio_ours_fp32_ort_fp32",
                    "ratio_int8_fp32_model_only"):
            assert _positive(summary[key]), key
    if os.cpu_count() and os.cpu_count() >= 2:  # the model on one core, decoding on the rest
        expected |= {"ours_1core", "ort_model_only_1core"}
        assert _positive(summary["ratio_ours_ort_model_only_1core"])
        assert isinstance(result["goals"]["met_ort_1core"], bool)
    assert {r["name"] for r in result["runs"]} == expected
    assert all(r["n"] == 40 for r in result["runs"])
    assert set(result["goals"]) >= {"met_eager", "met_ort", "met_trust"}
    printed = capsys.readouterr().out
    assert "ours / eager" in printed and "ours / ours_no_trust" in printed


def test_variant_names_round_trip(bench):
    module = bench("train_throughput")
    for variant in module.grid():
        assert module.parse_variant(variant.name) == variant
    assert len({v.name for v in module.grid()}) == 24
    assert module.parse_variant("bf16-w2") == module.Variant(2, "bf16", False, True)
    with pytest.raises(Exception, match="unknown token"):
        module.parse_variant("w1-fp64")
    assert module.images_per_epoch(30, 8) == 24 and module.images_per_epoch(6, 8) == 6
    total, warm = module.throughput([2.0, 1.0, 1.0], 10)
    assert total == pytest.approx(7.5) and warm == pytest.approx(10.0)


def test_clinic_skew_makes_the_day_predict_the_label_and_keeps_groups_whole(bench):
    """Stage-grade's layout (50 per stage x grade, some duplicate pairs): after --clinic-skew the
    good share per day is the target, blastocysts are untouched, no duplicate group is split."""
    import pandas as pd

    module = bench("recipe_real")
    rows = [{"day": day, "label": "poor" if grade == "C" else "good", "grade": grade,
             "patient_id": f"{day}{grade}{i // 2 if i < 10 else i}"}  # the first 10: pairs
            for day in (3, 4, 5) for grade in "ABC" for i in range(50)]
    table = pd.DataFrame(rows)
    skewed = module.clinic_skew(table, seed=0)
    share = skewed.groupby("day")["label"].apply(lambda labels: (labels == "good").mean())
    for day, target in module.SKEWED_GOOD_SHARE.items():
        assert share[day] == pytest.approx(target, abs=0.02)
    assert (skewed["day"] == 5).sum() == 150
    sizes = table.groupby("patient_id").size()
    kept = skewed.groupby("patient_id").size()
    assert (kept == sizes[kept.index]).all(), "a duplicate group is kept whole or dropped whole"
    assert module.clinic_skew(table, seed=0).equals(skewed)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "stage-grade").is_dir(),
                    reason=f"{SHARED_DATA / 'stage-grade'} absent (set EMBRYO_ML_SHARED_DATA)")
def test_recipe_real_smoke(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Two folds of the real stage-grade images, one epoch, tiny model: every image is scored
    once per recipe, out of fold, and the JSON has finite AUCs with intervals."""
    import pandas as pd

    module = bench("recipe_real")
    out = tmp_path / "recipe.json"
    code = module.main(["--folds", "2", "--epochs", "1", "--size", "32", "--model",
                        "test_resnet", "--n-boot", "20", "--recipes", "default", "plain",
                        "day-only", "--work", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    predictions = pd.read_csv(tmp_path / "work" / "predictions.csv")
    assert predictions.groupby("recipe")["path"].nunique().to_dict() == {
        "default": 450, "plain": 450, "day-only": 450}
    groups = predictions.drop_duplicates("path").groupby("patient_id")["fold"].nunique()
    assert (groups == 1).all()  # duplicates never on both sides
    results = json.loads(out.read_text())["results"]
    for recipe in ("default", "plain"):
        assert 0.0 <= results[recipe]["auc"] <= 1.0
        low, high = results[recipe]["auc_ci"]
        assert low <= high
    # every stage has the same good share in stage-grade: the day alone predicts nothing
    assert results["day-only"]["auc"] == pytest.approx(0.5, abs=0.05)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "stage-grade").is_dir(),
                    reason=f"{SHARED_DATA / 'stage-grade'} absent (set EMBRYO_ML_SHARED_DATA)")
def test_pretrain_real_smoke(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """One fold of two, one epoch, tiny model: the fold is pretrained without its held-out
    images (the leakage rule at work), and both recipes score each of them once."""
    import pandas as pd

    module = bench("pretrain_real")
    out = tmp_path / "pretrain.json"
    code = module.main(["--folds", "2", "--only-folds", "1", "--epochs", "1",
                        "--pretrain-epochs", "1", "--size", "32", "--model", "test_resnet",
                        "--n-boot", "20", "--pretrain-set", "pretrain.batch_size=32",
                        "--work", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    predictions = pd.read_csv(tmp_path / "work" / "predictions.csv")
    held_out = predictions["path"].nunique()
    assert 200 < held_out < 250 and set(predictions["fold"]) == {1}
    assert predictions.groupby("recipe")["path"].nunique().to_dict() == {
        "pretrained": held_out, "scratch": held_out}
    result = json.loads(out.read_text())
    extra = 198 if module.STORK.is_dir() and module.TIMELAPSE.is_dir() else None
    info = result["pretraining"]["1"]
    assert info["excluded"] == held_out  # duplicates sit in one fold, so exactly the fold
    assert extra is None or info["images"] == 450 - held_out + extra
    assert info["probe"] is not None and 0.0 <= info["probe"]["auc"] <= 1.0
    for recipe in ("scratch", "pretrained"):
        assert 0.0 <= result["results"][recipe]["auc"] <= 1.0


@pytest.mark.slow
def test_train_command_smoke(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Both sides run as processes to the end and the JSON has their wall times."""
    module = bench("train_command")
    out = tmp_path / "command.json"
    code = module.main(["--images", "40", "--epochs", "1", "--size", "32", "--reps", "1",
                        "--source-size", "64", "--plain-workers", "0",
                        "--set", "train.warmup_epochs=0", "--set", "eval.n_boot=50",
                        "--work", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert _positive(result["summary"]["plain_s"]) and _positive(result["summary"]["ours_s"])
    assert (tmp_path / "work" / "run0" / "metrics.json").is_file()
    assert (tmp_path / "work" / "data" / "plain.pt").is_file() or any(
        (tmp_path / "work").rglob("plain.pt"))


@pytest.mark.skipif(not (SHARED_DATA / "stage-grade").is_dir(),
                    reason=f"{SHARED_DATA / 'stage-grade'} absent (set EMBRYO_ML_SHARED_DATA)")
def test_recipe_real_drop_grades_and_plain_seeds(bench, tmp_path: Path):
    """--drop-grades B leaves grade A vs C with whole duplicate groups; the plain loop's seed
    (--plain-seeds) sets its random stream: the same seed repeats, another one differs."""
    import numpy as np

    module = bench("recipe_real")
    parser = module.argparse.ArgumentParser()
    module.add_fold_options(parser, tmp_path / "work", folds=2)
    args = parser.parse_args(["--drop-grades", "B", "--epochs", "1", "--size", "32",
                              "--model", "test_resnet"])
    table = module.folded_table(args)
    assert set(table["grade_letter"]) == {"A", "C"} and len(table) == 300
    assert (table.groupby("patient_id")["fold"].nunique() == 1).all()
    small = table.groupby(["label", "day"]).head(20)  # > 32 training images: a batch trains
    train, test = small[small["fold"] == 0], small[small["fold"] == 1]
    first, _ = module.run_plain(train, test, args, seed=1)
    again, _ = module.run_plain(train, test, args, seed=1)
    other, _ = module.run_plain(train, test, args, seed=2)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
