"""`embryo-ml pretrain`: self-supervised pretraining that learns, resumes on the same curve,
writes weights `train` loads as loaded weights, and keeps evaluation patients out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from embryo_ml.cli.runner import main
from embryo_ml.config import PretrainConfig
from embryo_ml.data.splits import grouped_split
from embryo_ml.errors import DataError
from embryo_ml.train import pretrain as pretrain_module
from embryo_ml.train.pretrain import learning_warnings, pretrain, probe_warnings, resume_path
from embryo_ml.train.pretrain_data import (
    Exclusion,
    content_digest,
    read_record,
    read_sources,
    validation_overlap,
)
from embryo_ml.train.pretrain_model import SimSiam, output_spread
from embryo_ml.train.pretrain_probe import probe_auc
from embryo_ml.train.pretrain_views import (
    PretrainImages,
    ViewSettings,
    _crop_window,
    make_view,
    neighbour_index,
)
from tests.conftest import tiny_config

SIZE = 32
PRETRAIN = ["data.image_size=32", "pretrain.batch_size=16", "pretrain.lr=0.003",
            "pretrain.warmup_epochs=1", "pretrain.probe=false"]


def tiny_pretrain_config(store: Path, *overrides: str):
    return tiny_config(store, *PRETRAIN, *overrides)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> dict:
    """One 6-epoch pretraining run of the tiny model on the synthetic images, with the probe."""
    root = tmp_path_factory.mktemp("pretrain")
    cfg = tiny_pretrain_config(root / "mlflow.db", "pretrain.epochs=6", "pretrain.probe=true")
    result = pretrain(cfg, [synth_data], root / "weights.safetensors", progress=False)
    return {"result": result, "weights": root / "weights.safetensors", "root": root,
            "uri": cfg.tracking.tracking_uri}


def test_pretraining_lowers_its_loss_and_does_not_collapse(pretrained: dict) -> None:
    history = pretrained["result"].history
    assert len(history) == 6
    losses = [row["loss"] for row in history]
    assert losses[-1] < losses[0] - 0.1, losses  # SimSiam's loss falls from ~0 towards -1
    assert history[-1]["output_spread"] > 0.3
    assert not resume_path(pretrained["weights"]).exists()  # finished: no checkpoint left


def test_weights_file_records_its_images_and_the_probe(pretrained: dict, synth_data: Path
                                                       ) -> None:
    record = read_record(pretrained["weights"])
    table = pd.read_csv(synth_data)
    assert record is not None and record.method == "simsiam" and record.images == len(table)
    assert record.image_size == SIZE and record.epochs == 6
    first = str(synth_data.parent / table["path"][0])
    assert content_digest(first) in record.digests
    assert set(record.id_hashes) == {"patient_id", "embryo_id"}
    assert not any(str(v) in json.dumps(record.id_hashes) for v in table["patient_id"])
    probe = record.probe
    assert probe is not None and 0.0 <= probe["auc"] <= 1.0 and probe["folds"] >= 2
    assert "random_init_auc" in probe


def test_run_is_tracked_with_its_loss_curve(pretrained: dict, forget_tracking_uri: None) -> None:
    import mlflow

    client = mlflow.MlflowClient(pretrained["uri"])
    run = client.get_run(pretrained["result"].run_id)
    assert run.info.status == "FINISHED" and run.data.tags["embryo_ml.stage"] == "pretrain"
    assert run.data.params["pretrain.method"] == "simsiam"
    assert run.data.params["data.sha256"] == pretrained["result"].record.fingerprint
    curve = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in curve] == list(range(6))
    assert "probe_auc" in run.data.metrics


def test_train_loads_the_weights_as_loaded_weights(pretrained: dict, synth_data: Path,
                                                   tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from embryo_ml.train.fit import fit

    cfg = tiny_config(tmp_path / "mlflow.db", "data.image_size=32", "train.epochs=1",
                      f"model.pretrained_file={pretrained['weights']}",
                      "train.freeze_backbone_epochs=1", gate_undecided=True)
    with caplog.at_level("INFO"):
        result = fit(cfg, synth_data, tmp_path / "run", progress=False)
    text = caplog.text
    assert "recipe: fine-tune (pretrained weights from model.pretrained_file)" in text
    assert "backbone frozen for 1 epoch" in text
    assert "self-supervised (simsiam, 6 epochs)" in text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["pretraining"]["fingerprint"] == pretrained["result"].record.fingerprint
    # pretrained on every image, so the validation patients were seen: the check fires
    overlap = metrics["pretraining"]["overlap"]
    assert overlap["images"] == result.metrics["n_val"] and overlap["patients"] > 0
    assert "optimistic" in metrics["pretraining"]["warnings"][0]


def test_excluded_validation_patients_do_not_trip_the_check(synth_data: Path, tmp_path: Path
                                                            ) -> None:
    """pretrain --exclude-splits with train's own validation patients: no overlap reported."""
    from embryo_ml.data.manifest import load_table

    table = load_table(synth_data)
    _, val_idx, _ = grouped_split(table, 0.2, seed=0)
    splits = table.assign(split="train")
    splits.loc[val_idx, "split"] = "test"
    splits_csv = tmp_path / "splits.csv"
    splits.to_csv(splits_csv, index=False)
    cfg = tiny_pretrain_config(tmp_path / "mlflow.db", "pretrain.epochs=1")
    out = tmp_path / "w.safetensors"
    result = pretrain(cfg, [synth_data], out, Exclusion.from_splits(splits_csv),
                      progress=False, track=False)
    assert result.record.excluded_images == len(val_idx)
    assert result.record.images == len(table) - len(val_idx)
    record = read_record(out)
    clean = validation_overlap(record, table.iloc[val_idx])
    assert (clean.images, clean.patients) == (0, 0)
    leaked = validation_overlap(record, table.drop(index=val_idx).head(5))
    assert leaked.images == 5 and leaked.patients >= 1


def test_exclusion_matches_copies_and_patients(tmp_path: Path, synth_data: Path) -> None:
    table = pd.read_csv(synth_data)
    first = synth_data.parent / table["path"][0]
    copy = tmp_path / "renamed_copy.png"
    shutil.copy(first, copy)
    listed = pd.DataFrame({"path": [str(copy)], "patient_id": ["nobody"]})
    exclusion_csv = tmp_path / "exclude.csv"
    listed.to_csv(exclusion_csv, index=False)
    exclusion = Exclusion.from_splits(exclusion_csv)  # no split column: every row
    sources = read_sources([synth_data])
    digests = [content_digest(p) for p in sources["path"]]
    drop = exclusion.excluded_rows(sources, digests)
    assert drop.sum() == 1 and sources["path"][np.flatnonzero(drop)[0]] == str(first)
    by_patient = pd.DataFrame({"path": [str(copy)], "patient_id": [table["patient_id"][0]]})
    by_patient.to_csv(exclusion_csv, index=False)
    drop = Exclusion.from_splits(exclusion_csv).excluded_rows(sources, digests)
    assert drop.sum() == (table["patient_id"] == table["patient_id"][0]).sum()
    with pytest.raises(DataError, match="no rows of split 'val'"):
        splits = tmp_path / "splits.csv"
        listed.assign(split="test").to_csv(splits, index=False)
        Exclusion.from_splits(splits, ["val"])


def test_resume_after_interruption_continues_the_same_curve(synth_data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    cfg = tiny_pretrain_config(tmp_path / "mlflow.db", "pretrain.epochs=3")
    straight = pretrain(cfg, [synth_data], tmp_path / "straight.safetensors", progress=False,
                        track=False)
    real_epoch = pretrain_module._epoch

    def interrupted(run, loader, device, progress, epoch):  # noqa: ANN001, ANN202
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(run, loader, device, progress, epoch)

    out = tmp_path / "resumed.safetensors"
    monkeypatch.setattr(pretrain_module, "_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, [synth_data], out, progress=False, track=False)
    assert resume_path(out).is_file() and not out.exists()
    with pytest.raises(DataError, match="--resume"):  # not silently restarted
        pretrain(cfg, [synth_data], out, progress=False, track=False)
    monkeypatch.setattr(pretrain_module, "_epoch", real_epoch)
    resumed = pretrain(cfg, [synth_data], out, resume=True, progress=False, track=False)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]
    np.testing.assert_allclose([r["loss"] for r in resumed.history],
                               [r["loss"] for r in straight.history], rtol=0, atol=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "straight.safetensors")), load_file(str(out))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_cli_pretrain_bad_inputs_are_one_line(tmp_path: Path, synth_data: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    table = pd.read_csv(synth_data)
    for name in table["path"][:10]:
        shutil.copy(synth_data.parent / name, broken / Path(name).name)
    (broken / "truncated.png").write_bytes((synth_data.parent / table["path"][0]).read_bytes()[:60])
    store = f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"
    cases = {
        "no images found": [str(empty)],
        "cannot be read": [str(broken)],
        "images not found": [str(tmp_path / "missing")],
        "did you mean 'pretrain.epochs'": [str(synth_data), "--set", "pretrain.epoch=2"],
        "written as .safetensors": [str(synth_data), "--out", str(tmp_path / "w.pt")],
        "no interrupted run": [str(synth_data), "--resume"],
    }
    for expected, args in cases.items():
        out_args = [] if "--out" in args else ["--out", str(tmp_path / "w.safetensors")]
        code = main(["pretrain", *args, *out_args, "--set", "model.name=test_resnet",
                     "--set", "data.image_size=32", "--set", store, "-q"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (expected, err)
        assert expected in errors[0], (expected, errors[0])
    assert not (tmp_path / "w.safetensors").exists()


def test_cli_pretrain_then_train_round_trip(tmp_path: Path, synth_data: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "w.safetensors"
    store = ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    tiny = ["--set", "model.name=test_resnet", "--set", "data.image_size=32"]
    assert main(["pretrain", str(synth_data), "--out", str(weights), *tiny, *store, "-q",
                 "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "pretrained test_resnet at 32 px on 120 images" in out
    assert "linear probe (120 labelled images" in out and f"model.pretrained_file={weights}" in out
    assert main(["pretrain", str(synth_data), "--out", str(weights), *tiny, *store, "-q"]) == 2
    assert "exists" in capsys.readouterr().err


def test_views_keep_the_embryo_and_repeat_by_seed() -> None:
    rng = np.random.default_rng(0)
    box = (40.0, 50.0, 160.0, 170.0)  # a 120 px embryo in a 256 px image
    for _ in range(200):
        cx, cy, side = _crop_window(rng, 256, box, 0.3)
        assert side >= 120 - 1e-9
        assert cx - side / 2 <= box[0] + 1e-6 and cx + side / 2 >= box[2] - 1e-6
        assert cy - side / 2 <= box[1] + 1e-6 and cy + side / 2 >= box[3] - 1e-6
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    settings = ViewSettings.from_config(PretrainConfig(), SIZE, (0.5,) * 3, (0.25,) * 3)
    one = make_view(image, None, settings, np.random.default_rng([0, 3, 7]))
    again = make_view(image, None, settings, np.random.default_rng([0, 3, 7]))
    other = make_view(image, None, settings, np.random.default_rng([0, 4, 7]))
    assert one.shape == (3, SIZE, SIZE) and one.dtype == np.float32
    assert np.array_equal(one, again) and not np.array_equal(one, other)


def test_positive_pairs_are_neighbouring_images_of_one_embryo(synth_data: Path) -> None:
    assert neighbour_index([[0, 1, 2, 3, 4]], 1, 6) == [[1], [0, 2], [1, 3], [2, 4], [3], []]
    table = pd.read_csv(synth_data)
    paths = [str(synth_data.parent / p) for p in table["path"][:6]]
    settings = ViewSettings.from_config(PretrainConfig(), SIZE, (0.5,) * 3, (0.25,) * 3)
    dataset = PretrainImages(paths, [[1], [0], [], [], [], []], settings, seed=0, pair_p=1.0)
    seen: list[int] = []
    dataset.source = lambda index: (seen.append(index),  # type: ignore[method-assign]
                                    np.zeros((64, 64, 3), np.uint8))[1]
    dataset[0]
    assert seen == [0, 1]  # the second view came from the embryo's other image
    seen.clear()
    dataset[2]
    assert seen == [2]  # a lone image pairs with itself


def test_output_spread_sees_collapse_and_warnings_say_so() -> None:
    healthy = torch.randn(256, 64)
    collapsed = torch.ones(256, 64) + 1e-4 * torch.randn(256, 64)
    assert 0.8 < output_spread(healthy) < 1.2 and output_spread(collapsed) < 0.05
    rows = [{"loss": -0.01 * i, "output_spread": 0.02} for i in range(4)]
    found = learning_warnings(rows)
    assert any("collapsed" in w for w in found) and any("did not fall" in w for w in found)
    assert learning_warnings([{"loss": -0.1 * i, "output_spread": 0.9} for i in range(4)]) == []
    assert "no gain" in probe_warnings({"auc": 0.55, "random_init_auc": 0.6})[0]
    assert probe_warnings({"auc": 0.7, "random_init_auc": 0.6}) == [] == probe_warnings(None)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    backbone.num_features = 8  # what a timm backbone says of its pooled features
    model = SimSiam(backbone, 16, 4)
    loss, projections = model(torch.randn(6, 12), torch.randn(6, 12))
    assert -1.0 <= loss.item() <= 1.0 and projections.shape == (6, 16)


def test_linear_probe_tells_signal_from_noise() -> None:
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 60)
    groups = np.repeat(np.arange(30), 4)
    signal = rng.normal(size=(120, 16)) + y[:, None] * 1.5
    noise = rng.normal(size=(120, 16))
    assert probe_auc(signal, y, groups, 5, 0) > 0.9
    assert 0.3 < probe_auc(noise, y, groups, 5, 0) < 0.7


def test_train_warns_of_weights_made_for_another_run(tmp_path: Path, synth_data: Path) -> None:
    """A collapsed pretraining, another model, size or normalisation: each its own warning."""
    from safetensors.torch import save_file

    from embryo_ml.train.pretrain_check import pretraining_check
    from embryo_ml.train.pretrain_data import PretrainRecord

    record = PretrainRecord("resnet18", 128, [0.5] * 3, [0.25] * 3, "simsiam", 3, 10, "f" * 64,
                            [], {}, output_spread=0.01)
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights), metadata=record.to_metadata())
    cfg = tiny_config(tmp_path / "m.db", "data.image_size=32",
                      f"model.pretrained_file={weights}")
    table = pd.read_csv(synth_data).head(4).assign(
        path=lambda t: [str(synth_data.parent / p) for p in t["path"]])
    found = pretraining_check(cfg, table, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    text = " ".join(found["warnings"])
    assert "collapsed" in text and "for resnet18" in text and "at 128 px" in text
    assert "normalisation" in text and found["overlap"]["images"] == 0
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))  # weights from elsewhere: nothing to check
    cfg = tiny_config(tmp_path / "m.db", f"model.pretrained_file={plain}")
    assert pretraining_check(cfg, table, (0.5,) * 3, (0.25,) * 3) is None
