"""The training recipe's rules and the model-quality gate, on real (tiny) computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from embryo_ml.config import EvalConfig, load_config
from embryo_ml.evaluation.gate import validation_verdict
from embryo_ml.evaluation.report import evaluate_predictions
from embryo_ml.evaluation.selection import resolve_selection
from embryo_ml.evaluation.subgroups import mean_group_auc, pooled_group_auc
from embryo_ml.train.ema import WarmupEma, ema_decay_cap
from tests.conftest import tiny_config

# --- EMA ------------------------------------------------------------------------------------


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _loss(model: torch.nn.Module) -> float:
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), x[:, :1] * 2 - x[:, 1:2]))


def _train(model: torch.nn.Module, ema: WarmupEma, steps: int) -> None:
    """`steps` SGD steps on a fixed regression batch, the EMA updated after each."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1] * 2 - x[:, 1:2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)


def test_ema_warmup_tracks_the_trained_model_after_a_few_steps() -> None:
    """150-step run: the warmed-up EMA's loss follows the trained model's; the fixed 0.998
    decay (before the warm-up) leaves the EMA where the random initialisation was."""
    initial = _loss(_model())
    model, twin = _model(), _model()
    warm = WarmupEma(model, decay=0.998, total_steps=150)
    fixed = WarmupEma(twin, decay=0.998, total_steps=150, warmup=False)
    _train(model, warm, 40)
    _train(twin, fixed, 40)
    trained = _loss(model)
    assert trained < 0.5 * initial  # the model learned
    assert _loss(warm.module) < trained + 0.25 * (initial - trained)
    assert _loss(fixed.module) > trained + 0.8 * (initial - trained)
    assert warm.decay() <= ema_decay_cap(0.998, 150) == pytest.approx(1 - 10 / 150)
    assert ema_decay_cap(0.998, 100_000) == 0.998  # long runs keep the configured decay


def test_ema_state_round_trip_and_old_form() -> None:
    model = torch.nn.Linear(4, 2)
    ema = WarmupEma(model, 0.99, 100)
    ema.update(model)
    copy = WarmupEma(model, 0.99, 100)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 1
    copy.load_state_dict(model.state_dict())  # a checkpoint from before the warm-up
    assert torch.equal(copy.module.weight, model.weight)


# --- selection: a small subgroup must not dominate ----------------------------------------


def test_small_subgroup_cannot_dominate_the_selection_metric() -> None:
    """Day 5: 20 good, 40 poor, ranked well by model B. Day 3: 2 good, 12 poor, where A
    happens to be perfect and B poor. The unweighted mean prefers A (noise at n=2); the
    pair-weighted rule prefers B, which ranks 800 of the 824 same-day pairs better."""
    rng = np.random.default_rng(0)
    day = np.array([5] * 60 + [3] * 14)
    y = np.array([True] * 20 + [False] * 40 + [True] * 2 + [False] * 12)
    noise = rng.normal(0, 1, len(y))
    a = np.where(day == 5, noise, 0.0) + np.where((day == 3) & y, 5.0, 0.0)
    b = np.where(day == 5, y * 1.5 + noise * 0.7, 0.0) + np.where((day == 3) & y, -5.0, 0.0)
    mean_a, mean_b = (float(mean_group_auc(y, s, day, 1)[0]) for s in (a, b))
    pooled_a, pairs = pooled_group_auc(y, a, day)
    pooled_b, _ = pooled_group_auc(y, b, day)
    assert pairs == 20 * 40 + 2 * 12
    assert mean_a > mean_b  # the unweighted mean would pick the lucky model
    assert pooled_b > pooled_a + 0.2  # the selection rule picks the one that ranks
    cfg = load_config(None, ["eval.min_group_size=2"])
    selection = resolve_selection(cfg, pd.DataFrame({"day": day}), y)
    assert selection.metric == "pooled_within_day_auc"
    assert "3: 2+12" in selection.note and "5: 20+40" in selection.note
    assert selection.score(y, b) == pytest.approx(pooled_b)


# --- the gate ----------------------------------------------------------------------------


def _frame(n_patients: int, signal: float, seed: int = 0, days: tuple = (3, 5)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        for embryo in range(4):
            good = bool(rng.random() < 0.4)
            rows.append({"patient_id": f"P{patient}", "embryo_id": f"P{patient}-{embryo}",
                         "day": days[patient % len(days)], "y": good,
                         "score": float(1 / (1 + np.exp(-(signal * good + rng.normal()))))})
    frame = pd.DataFrame(rows)
    return frame.assign(predicted=frame["score"] > 0.5)


@pytest.mark.parametrize(("signal", "patients", "verdict"), [
    (3.0, 40, "passed"), (0.0, 40, "failed"), (3.0, 4, "inconclusive")])
def test_gate_verdicts(signal: float, patients: int, verdict: str) -> None:
    cfg = EvalConfig(subgroups=["day"], n_boot=300)
    result = validation_verdict(evaluate_predictions(_frame(patients, signal), cfg), cfg)
    assert result["verdict"] == verdict, result["reason"]
    assert result["passed"] is {"passed": True, "failed": False, "inconclusive": None}[verdict]
    assert [c["name"] for c in result["checks"]] == ["auc", "within_day_auc"]


def test_gate_fails_a_model_that_only_knows_the_day() -> None:
    """Good embryos are mostly day 5 and the score is the day: overall AUC well above 0.5,
    within-day AUC 0.5: failed, by the within-day check."""
    rng = np.random.default_rng(2)
    rows = []
    for patient in range(60):
        day = 5 if patient % 2 else 3
        for _ in range(4):
            good = bool(rng.random() < (0.6 if day == 5 else 0.15))
            rows.append({"patient_id": f"P{patient}", "day": day, "y": good,
                         "score": 0.7 if day == 5 else 0.2})
    frame = pd.DataFrame(rows).assign(predicted=lambda f: f["score"] > 0.5)
    cfg = EvalConfig(subgroups=["day"], n_boot=300)
    result = validation_verdict(evaluate_predictions(frame, cfg), cfg)
    checks = {c["name"]: c["passed"] for c in result["checks"]}
    assert checks == {"auc": True, "within_day_auc": False}
    assert result["verdict"] == "failed" and "within-day" in result["reason"]


# --- precision follows the CPU's bf16 units ----------------------------------------------


def test_auto_precision_follows_bf16_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    from embryo_ml.train import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", "auto", cpu).amp_dtype == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", "auto", cpu).amp_dtype is None
    assert precision.resolve_precision("off", "auto", cpu).amp_dtype is None
    monkeypatch.undo()  # the detection itself reads torch's probes of the CPU
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision.cpu_has_native_bf16() is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert precision.cpu_has_native_bf16() is False


# --- the learning check --------------------------------------------------------------------


def test_learning_warning_names_the_causes() -> None:
    from embryo_ml.train.epochs import learning_warning

    flat = [{"train_loss": 0.70}, {"train_loss": 0.69}, {"train_loss": 0.69}]
    falling = [{"train_loss": 0.70}, {"train_loss": 0.60}, {"train_loss": 0.50}]
    warning = learning_warning(flat, 2, 0.6931)
    assert warning and "learning rate" in warning and "frozen random backbone" in warning
    assert "labels" in warning
    assert learning_warning(falling, 2, 0.6931) is None
    assert learning_warning(flat, 0, 0.6931) is None  # check switched off


# --- a deliberately broken run, end to end ------------------------------------------------


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shuffled labels: nothing in the images predicts them. 240 images, so the validation
    split is large enough to decide (not 'inconclusive')."""
    from embryo_ml.data.synthetic import generate_dataset
    from embryo_ml.train.fit import fit

    root = tmp_path_factory.mktemp("broken")
    manifest = generate_dataset(root / "data", n=240, size=48, seed=5)
    table = pd.read_csv(manifest)
    table["label"] = table["label"].sample(frac=1.0, random_state=0).to_numpy()
    table.to_csv(manifest, index=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = tiny_config(uri, "data.image_size=32", "train.epochs=2", "train.batch_size=32",
                      "data.val_fraction=0.34", "tracking.log_checkpoint=false")
    result = fit(cfg, manifest, root / "run", progress=False)
    return {"root": root, "run_dir": root / "run", "metrics": result.metrics, "uri": uri,
            "images": root / "data"}


def test_broken_run_is_marked_failed(broken_run: dict) -> None:
    validation = broken_run["metrics"]["validation"]
    assert validation["verdict"] == "failed", validation["reason"]
    assert validation["passed"] is False
    saved = json.loads((broken_run["run_dir"] / "metrics.json").read_text())
    assert saved["validation"]["verdict"] == "failed"
    assert any("did not learn" in w for w in saved["learning_warnings"])


def test_broken_run_export_refused_then_allowed_score_warns_report_banner(
    broken_run: dict, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from embryo_ml.cli import main
    from embryo_ml.export.bundle import read_bundle

    bundle = tmp_path / "bundle"
    code = main(["-q", "export", str(broken_run["run_dir"]), "--out", str(bundle),
                 "--no-int8"])
    err = capsys.readouterr().err
    assert code == 2 and not bundle.exists()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--allow-failed-validation" in lines[0], err
    assert main(["-q", "export", str(broken_run["run_dir"]), "--out", str(bundle), "--no-int8",
                 "--allow-failed-validation"]) == 0
    assert read_bundle(bundle).validation["verdict"] == "failed"
    capsys.readouterr()
    scores = tmp_path / "scores.csv"
    report = tmp_path / "report.html"
    assert main(["-q", "score", str(broken_run["images"] / "images"), "--bundle", str(bundle),
                 "--out", str(scores), "--report", str(report)]) == 0
    err = capsys.readouterr().err
    assert "FAILED its validation check" in err, err
    html = report.read_text(encoding="utf-8")
    assert "did not pass its validation check" in html


def test_failed_run_is_never_registered(broken_run: dict, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from embryo_ml.cli import main

    code = main(["-q", "export", str(broken_run["run_dir"]), "--out", str(tmp_path / "b"),
                 "--no-int8", "--allow-failed-validation", "--register", "broken",
                 "--tracking-uri", broken_run["uri"]])
    assert code == 2
    import mlflow

    assert not mlflow.MlflowClient(broken_run["uri"]).search_registered_models()


# --- refit on train + validation ----------------------------------------------------------


def test_refit_trains_on_all_images_for_the_chosen_epochs(synth_data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from embryo_ml.export.onnx_export import load_run_model
    from embryo_ml.train import trainer as trainer_module
    from embryo_ml.train.fit import fit, load_checkpoint

    sizes: list[int] = []
    real_build = trainer_module.build_trainer

    def recording(*args: object, **kwargs: object) -> object:
        sizes.append(len(args[3]))  # the training set of each trainer
        return real_build(*args, **kwargs)

    monkeypatch.setattr("embryo_ml.train.fit.build_trainer", recording)
    cfg = tiny_config(tmp_path / "m.db", "data.image_size=32", "train.epochs=2",
                      "train.batch_size=16", "train.refit=true", "tracking.log_checkpoint=false")
    result = fit(cfg, synth_data, tmp_path / "run", progress=False)
    refit = result.metrics["refit"]
    assert sizes == [result.metrics["n_train"], 120] and refit["n_images"] == 120
    assert refit["epochs"] == result.metrics["best_epoch"] + 1
    assert len(refit["train_loss"]) == refit["epochs"]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    selection = load_checkpoint(tmp_path / "run" / "selection.pt")
    assert best["refit"] is True and "refit" not in selection
    assert any(not torch.equal(best["state_dict"][k], selection["state_dict"][k])
               for k in best["state_dict"])
    model, _ = load_run_model(tmp_path / "run")  # export reads the refit model
    assert "validation run" in refit["calibration"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["refit"]["epochs"] == refit["epochs"]
    assert model is not None


def test_auc_standard_error_and_the_one_se_rule() -> None:
    from embryo_ml.evaluation.selection import auc_standard_error

    # Hanley & McNeil: AUC 0.80, 50 + 50 cases: (0.16 + 49 x 0.0267 + 49 x 0.0711) / 2500 -> 0.0445
    assert auc_standard_error(0.8, 50, 50) == pytest.approx(0.0445, abs=0.0005)
    assert auc_standard_error(0.8, 500, 500) < auc_standard_error(0.8, 50, 50) / 3
    assert auc_standard_error(0.8, 0, 10) == float("inf")
    cfg = load_config(None, ["eval.min_group_size=2"])
    day = np.array([3] * 10 + [5] * 10 + [3] * 4)
    y = np.array([True, False] * 10 + [False] * 4)
    selection = resolve_selection(cfg, pd.DataFrame({"day": day}), y)
    assert (selection.n_positive, selection.n_negative) == (10, 14)


def test_keep_epoch_prefers_the_latest_within_one_standard_error() -> None:
    from embryo_ml.evaluation.selection import keep_epoch

    scores, se = [0.60, 0.72, 0.70, 0.74, 0.71, 0.60], 0.05
    best, kept = -np.inf, None
    for epoch, score in enumerate(scores):
        improved, keep = keep_epoch(score, best, se)
        best = max(best, score)
        kept = epoch if keep else kept
    assert kept == 4  # 0.71 is within 0.05 of 0.74; the final 0.60 is not
    best, kept = -np.inf, None
    for epoch, score in enumerate(scores):  # tolerance 0: the maximum, as before
        improved, keep = keep_epoch(score, best, 0.0)
        best = max(best, score)
        kept = epoch if keep else kept
    assert kept == 3
