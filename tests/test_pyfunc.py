"""The scoring bundle as an MLflow pyfunc model: in-process, `mlflow models predict`,
`mlflow models serve` over HTTP, and `embryo-ml export --register` with the `candidate` alias.

Every prediction is checked against `score_images` (the `embryo-ml score` path) on the same files.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.errors import BundleError
from embryo_ml.export.bundle import read_bundle
from embryo_ml.score.scorer import score_images
from embryo_ml.serving.pyfunc import LoggedBundleModel, log_bundle_model
from tests.mlflow_server import mlflow_command, mlflow_env, model_server, unreachable_url

TOLERANCE = 1e-6
# `RunTracker` sets mlflow's process-wide URI; do not leak this module's store.
pytestmark = pytest.mark.usefixtures("forget_tracking_uri")


def _env(tracking_uri: str, allowed_root: Path) -> dict[str, str]:
    # served models read no path without EMBRYO_ML_ALLOWED_ROOTS
    return mlflow_env(MLFLOW_TRACKING_URI=tracking_uri, EMBRYO_ML_ALLOWED_ROOTS=str(allowed_root))


@pytest.fixture(scope="module")
def images(synth_data: Path, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four synthetic images in one folder, and what `score_images` makes of them."""
    folder = tmp_path_factory.mktemp("pyfunc-images")
    sources = sorted((synth_data.parent / "images").rglob("*.png"))
    files = []
    for i, source in enumerate([sources[0], sources[1], sources[-1], sources[-2]]):
        files.append(shutil.copy(source, folder / f"img{i}.png"))
    out = folder.parent / "expected.csv"
    score_images(folder, bundle_dir, out, progress=False, workers=1, threads=1)
    expected = pd.read_csv(out, dtype="string", keep_default_na=False).set_index("path")
    return {"files": [Path(f) for f in files], "expected": expected, "folder": folder}


def _request(images: dict) -> pd.DataFrame:
    """3 paths + 1 base64 image + corrupt base64 + a missing file + an empty row."""
    files = images["files"]
    encoded = base64.b64encode(files[3].read_bytes()).decode("ascii")
    return pd.DataFrame({
        "id": ["first", "second", "b64", None, "bad-b64", "gone", "empty"],
        "path": [str(files[0]), str(files[1]), None, str(files[2]), None,
                 str(images["folder"] / "missing.png"), None],
        "image_base64": [None, None, encoded, None, "not base64 at all!", None, None],
    })


def _strict_json(text: str | bytes) -> object:
    """JSON as any client reads it: NaN/Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise AssertionError(f"non-JSON constant {constant} in the model's answer")

    return json.loads(text, parse_constant=refuse)


def _check(predictions: pd.DataFrame, images: dict, classes: list[str]) -> None:
    """Rows in input order; scored rows equal the CLI scorer's; bad rows carry a status."""
    expected = images["expected"]
    assert list(predictions["id"]) == ["first", "second", "b64", "3", "bad-b64", "gone", "empty"]
    scored = {0: "img0.png", 1: "img1.png", 2: "img3.png", 3: "img2.png"}
    for position, name in scored.items():
        got, want = predictions.iloc[position], expected.loc[name]
        assert got["status"] == "ok" == want["status"]
        for column in ["score", *[f"p_{c}" for c in classes]]:
            assert abs(float(got[column]) - float(want[column])) <= TOLERANCE, (name, column)
        assert got["label_pred"] == want["label_pred"]
        assert got["flags"] == want["flags"]
    statuses = list(predictions["status"])
    assert statuses[4].startswith("unreadable: invalid base64")
    assert statuses[5] == "unreadable: path not allowed"  # says nothing of what exists
    assert statuses[6].startswith("no input")
    for position in (4, 5, 6):
        assert predictions.iloc[position]["score"] is None or pd.isna(
            predictions.iloc[position]["score"])


def test_pyfunc_in_process_matches_the_scorer(
    logged_model: LoggedBundleModel, images: dict, trained_run: dict, bundle_dir: Path
) -> None:
    uri = trained_run["uri"]
    client = mlflow.MlflowClient(uri)
    model_id = logged_model.model_uri.removeprefix("models:/")
    # Logged into the training run named in bundle.json, with the bundle's hash as a tag.
    assert logged_model.run_id == trained_run["result"].run_id == read_bundle(bundle_dir).run_id
    model = client.get_logged_model(model_id)
    assert model.source_run_id == logged_model.run_id
    assert model.tags["embryo_ml.bundle_sha256"] == read_bundle(bundle_dir).sha256

    mlflow.set_tracking_uri(uri)  # models:/ resolves through the global URI (reset after)
    loaded = mlflow.pyfunc.load_model(logged_model.model_uri,
                                      model_config={"allowed_roots": [str(images["folder"])]})
    predictions = loaded.predict(_request(images))
    _check(predictions, images, read_bundle(bundle_dir).classes)
    schema = loaded.metadata.get_input_schema()
    assert schema.input_names() == ["id", "path", "image_base64"]
    # One column is enough: a paths-only frame.
    only_paths = loaded.predict(pd.DataFrame({"path": [str(images["files"][0])]}))
    assert list(only_paths["status"]) == ["ok"] and list(only_paths["id"]) == ["0"]
    with pytest.raises(Exception, match="'path' or 'image_base64' column"):
        loaded.predict(pd.DataFrame({"file": ["x.png"]}))


def test_pyfunc_refuses_a_tampered_bundle(logged_model: LoggedBundleModel, trained_run: dict,
                                          tmp_path: Path) -> None:
    mlflow.set_tracking_uri(trained_run["uri"])  # models:/ resolves through the global URI
    local = Path(mlflow.artifacts.download_artifacts(logged_model.model_uri,
                                                     dst_path=str(tmp_path)))
    onnx_files = list(local.rglob("model.onnx"))
    assert len(onnx_files) == 1
    with open(onnx_files[0], "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="hash mismatch"):
        mlflow.pyfunc.load_model(str(local))


def test_log_bundle_model_refuses_a_bad_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    bad = shutil.copytree(bundle_dir, tmp_path / "bundle")
    (bad / "model.onnx").write_bytes(b"not the model")
    with pytest.raises(BundleError, match="hash mismatch"):
        log_bundle_model(bad, tracking_uri=f"sqlite:///{tmp_path / 'unused.db'}")
    assert not (tmp_path / "unused.db").exists()  # refused before touching the store


@pytest.mark.slow
def test_mlflow_models_predict_cli(logged_model: LoggedBundleModel, images: dict,
                                   trained_run: dict, bundle_dir: Path, tmp_path: Path) -> None:
    request = _request(images)
    records = json.loads(request.to_json(orient="records"))
    (tmp_path / "input.json").write_text(json.dumps({"dataframe_records": records}))
    command = mlflow_command("models", "predict", "-m", logged_model.model_uri,
                             "-i", str(tmp_path / "input.json"), "-t", "json",
                             "--env-manager", "local", "-o", str(tmp_path / "out.json"))
    done = subprocess.run(command, cwd=tmp_path, env=_env(trained_run["uri"], images["folder"]),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = _strict_json((tmp_path / "out.json").read_text())
    predictions = answer["predictions"] if isinstance(answer, dict) else answer
    _check(pd.DataFrame(predictions), images, read_bundle(bundle_dir).classes)


@pytest.mark.slow
def test_mlflow_models_serve_invocations(logged_model: LoggedBundleModel, images: dict,
                                         trained_run: dict, bundle_dir: Path,
                                         tmp_path: Path) -> None:
    env = _env(trained_run["uri"], images["folder"])
    with model_server(logged_model.model_uri, cwd=tmp_path, env=env) as (url, process):
        split = json.loads(_request(images).to_json(orient="split", index=False))
        body = json.dumps({"dataframe_split": split}).encode()
        post = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=60) as response:
            assert response.status == 200
            answer = _strict_json(response.read())
        _check(pd.DataFrame(answer["predictions"]), images, read_bundle(bundle_dir).classes)
    assert process.poll() is not None


def test_export_register_sets_candidate_alias(trained_run: dict, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    name = "embryo-test-register"
    uri = trained_run["uri"]  # the run's own store: `export` defaults to it
    client = mlflow.MlflowClient(uri)
    assert main(["-q", "export", str(trained_run["run_dir"]), "--out", str(tmp_path / "b1"),
                 "--register", name]) == 0
    out = capsys.readouterr().out
    assert f"registered model '{name}' version 1, alias 'candidate' -> version 1" in out
    first = client.get_model_version_by_alias(name, "candidate")
    assert str(first.version) == "1"
    assert first.run_id == trained_run["result"].run_id

    second = log_bundle_model(tmp_path / "b1", registered_name=name, tracking_uri=uri)
    assert second.version == "2"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "2"
    assert client.get_model_version(name, "1").aliases == []


def test_export_fails_fast_on_unreachable_tracking(trained_run: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    dead = unreachable_url()
    code = main(["-q", "export", str(trained_run["run_dir"]), "--out", str(tmp_path / "b"),
                 "--log-model", "--tracking-uri", dead])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "unreachable" in err
    assert not (tmp_path / "b").exists()  # checked before the export
