"""A served model cannot be turned against its server: it reads no file outside the allowed
roots and says nothing about what exists there, decodes only the four image formats, and bounds
what one request may cost.

The fast tests score through `predict_frame` with the hand-built bundle (`tests.fake_bundle`);
the last ones load a logged bundle model with `mlflow.pyfunc.load_model` (as tests/test_pyfunc.py
does) and check that it applies the same rules, including the HTTP status of a refused request.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from embryo_ml.data.images import read_image
from embryo_ml.errors import DataError, ImageReadError
from embryo_ml.export.bundle import read_bundle
from embryo_ml.score.scorer import OnnxScorer
from embryo_ml.serving.pyfunc import LoggedBundleModel, predict_frame
from tests.fake_bundle import make_fake_bundle, uniform_image

ROOTS = "EMBRYO_ML_ALLOWED_ROOTS"
NOT_ALLOWED = "unreadable: path not allowed"
# A minimal Encapsulated PostScript file, written by hand: Pillow identifies it by its first
# bytes and, to decode it, runs Ghostscript on it.
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")
SETTINGS = ("EMBRYO_ML_MAX_ROWS", "EMBRYO_ML_MAX_IMAGE_BYTES", "EMBRYO_ML_MAX_PIXELS",
            "EMBRYO_ML_MAX_REQUEST_PIXELS")


@pytest.fixture(autouse=True)
def _no_served_settings(monkeypatch: pytest.MonkeyPatch, forget_tracking_uri: None) -> None:
    """Each test starts from the defaults: no allowed roots, default limits (and, after it,
    mlflow's process-wide URI is reset: `RunTracker` sets it)."""
    for name in (ROOTS, *SETTINGS):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> OnnxScorer:
    folder = make_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle", np.eye(3, 2))
    return OnnxScorer(read_bundle(folder), threads=1)


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/ (allowed) with an image, a folder and a link out; outside/ with a real image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    inside = uniform_image(root / "inside.png", (200, 40, 40))
    secret = uniform_image(outside / "secret.png", (40, 200, 40))
    (root / "link.png").symlink_to(secret)
    (root / "alias.png").symlink_to(inside)  # a link that stays inside is fine
    return {"root": root, "outside": outside, "inside": inside, "secret": secret}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _paths(scorer: OnnxScorer, paths: list[str], **kwargs: object) -> list[str]:
    return list(predict_frame(scorer, pd.DataFrame({"path": paths}), **kwargs)["status"])


# -- paths: no oracle for the server's file system ------------------------------------------

def test_every_unreadable_path_gets_the_same_status(
    scorer: OnnxScorer, tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tree["root"]
    monkeypatch.setenv(ROOTS, os.pathsep.join([str(tmp) for tmp in (root, root / "sub")]))
    monkeypatch.chdir(tree["outside"])
    refused = [
        str(tree["secret"]),  # absolute path outside the root (a real image)
        str(root / ".." / "outside" / "secret.png"),  # ../ escape
        str(root / "sub" / ".." / ".." / "outside" / "secret.png"),
        str(root / "link.png"),  # a symlink inside the root pointing out of it
        str(root / "sub"),  # a folder
        str(root / "missing.png"),  # a file that does not exist
        "secret.png",  # relative: the server's working folder
        str(Path(__file__).resolve()),  # any file the server can read
        "/etc/passwd",
        str(root / "inside.png\0.txt"),
    ]
    statuses = _paths(scorer, refused)
    assert statuses == [NOT_ALLOWED] * len(refused)  # identical: nothing about existence
    assert _paths(scorer, [str(tree["inside"]), str(root / "alias.png"),
                           str(root / "sub" / ".." / "inside.png")]) == ["ok"] * 3


def test_without_roots_no_path_is_read_but_base64_is(scorer: OnnxScorer,
                                                     tree: dict[str, Path]) -> None:
    inside = tree["inside"]
    frame = pd.DataFrame({"path": [str(inside), str(inside), str(tree["root"] / "nope.png")],
                          "image_base64": [None, _b64(inside.read_bytes()), None]})
    assert list(predict_frame(scorer, frame)["status"]) == [NOT_ALLOWED, "ok", NOT_ALLOWED]


def test_roots_from_the_model_config_and_their_real_path(scorer: OnnxScorer,
                                                         tree: dict[str, Path]) -> None:
    from embryo_ml.serving.served_input import ServedInput

    link = tree["root"].parent / "root-link"
    link.symlink_to(tree["root"], target_is_directory=True)
    served = ServedInput.from_settings({"allowed_roots": [str(link)]}, environ={})
    assert served.roots == (str(tree["root"].resolve()),)
    statuses = _paths(scorer, [str(link / "inside.png"), str(tree["inside"]),
                               str(tree["secret"])], served=served)
    assert statuses == ["ok", "ok", NOT_ALLOWED]
    # an explicit empty list in the config wins over the environment
    served = ServedInput.from_settings({"allowed_roots": []}, environ={ROOTS: str(link)})
    assert _paths(scorer, [str(tree["inside"])], served=served) == [NOT_ALLOWED]


def test_special_files_are_refused_without_blocking(tree: dict[str, Path]) -> None:
    from embryo_ml.serving.served_input import read_allowed

    fifo = tree["root"] / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    root = (str(tree["root"].resolve()), "/dev")
    for path in (fifo, "/dev/zero", tree["root"] / "sub"):
        with pytest.raises(ImageReadError) as info:
            read_allowed(str(path), root, 1000)
        assert info.value.reason == "path not allowed"
    assert read_allowed(str(tree["inside"]), root, 1000) == tree["inside"].read_bytes()


# -- one list of image formats ---------------------------------------------------------------

def test_eps_is_refused_as_base64_and_as_file(
    scorer: OnnxScorer, tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ghostscript: list[object] = []

    def no_ghostscript(*args: object, **kwargs: object) -> None:
        ghostscript.append(args)
        raise OSError("Ghostscript must not run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    eps = tree["root"] / "figure.png"  # the name does not matter, the content does
    eps.write_bytes(EPS)
    monkeypatch.setenv(ROOTS, str(tree["root"]))
    frame = pd.DataFrame({"path": [None, str(eps)], "image_base64": [_b64(EPS), None]})
    statuses = list(predict_frame(scorer, frame)["status"])
    assert statuses == ["unreadable: unsupported format EPS"] * 2
    with pytest.raises(ImageReadError, match="unsupported format EPS"):  # `embryo-ml score`
        read_image(eps)
    assert ghostscript == []


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PPM", "ICO"])
def test_other_formats_are_named_and_refused(scorer: OnnxScorer, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 90, 90)).save(buffer, format=fmt)
    frame = pd.DataFrame({"image_base64": [_b64(buffer.getvalue())]})
    assert list(predict_frame(scorer, frame)["status"]) == [f"unreadable: unsupported format {fmt}"]


def test_opencv_gets_only_jpeg_bytes() -> None:
    from embryo_ml.data import images

    # A PNG that ends like a JPEG: OpenCV would decode it by its content.
    png = _png(Image.new("RGB", (8, 8), (1, 2, 3))) + images.JPEG_END
    assert images._decode_jpeg(png, (8, 8), "RGB", None) is None


# -- limits per request ----------------------------------------------------------------------

def test_too_many_rows_refuse_the_request(scorer: OnnxScorer, tree: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = _b64(tree["inside"].read_bytes())
    monkeypatch.setenv("EMBRYO_ML_MAX_ROWS", "3")
    assert len(predict_frame(scorer, pd.DataFrame({"image_base64": [encoded] * 3}))) == 3
    with pytest.raises(DataError, match="request has 4 rows, this model accepts at most 3") as info:
        predict_frame(scorer, pd.DataFrame({"image_base64": [encoded] * 4}))
    assert "\n" not in str(info.value)


def test_an_image_over_the_byte_limit_gets_a_status(
    scorer: OnnxScorer, tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    big = tree["root"] / "noise.png"
    big.write_bytes(_png(Image.fromarray(noise)))  # ~3 KB; the uniform image is 82 bytes
    monkeypatch.setenv(ROOTS, str(tree["root"]))
    monkeypatch.setenv("EMBRYO_ML_MAX_IMAGE_BYTES", "1000")
    frame = pd.DataFrame({"path": [str(big), None, str(tree["inside"]), None],
                          "image_base64": [None, _b64(big.read_bytes()), None,
                                           _b64(tree["inside"].read_bytes())]})
    statuses = list(predict_frame(scorer, frame)["status"])
    assert [s.startswith("unreadable: image too large (") for s in statuses] == [True, True,
                                                                                 False, False]
    assert "limit 1000" in statuses[0] and statuses[2:] == ["ok", "ok"]


def test_pixel_limits_apply_before_decoding(
    scorer: OnnxScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def recording_load(self: ImageFile.ImageFile) -> object:
        loaded.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    # 8 KB of PNG that decodes to 8000x8000: refused by the default limit, from its header.
    bomb = _b64(_png(Image.new("1", (8000, 8000), 0)))
    statuses = list(predict_frame(scorer, pd.DataFrame({"image_base64": [bomb]}))["status"])
    assert statuses == ["unreadable: image too large (8000x8000 pixels, limit 16000000)"]
    assert (8000, 8000) not in loaded
    monkeypatch.setenv("EMBRYO_ML_MAX_PIXELS", "1000")
    small, over = (_b64(_png(Image.new("RGB", (s, s), (99, 9, 9)))) for s in (16, 64))
    statuses = list(predict_frame(scorer, pd.DataFrame({"image_base64": [over, small]}))["status"])
    assert statuses == ["unreadable: image too large (64x64 pixels, limit 1000)", "ok"]
    assert (64, 64) not in loaded


def test_decoded_pixels_per_request_are_bounded(scorer: OnnxScorer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBRYO_ML_MAX_REQUEST_PIXELS", "600")  # 16x16 images: 256 each
    encoded = _b64(_png(Image.new("RGB", (16, 16), (50, 60, 70))))
    frame = pd.DataFrame({"image_base64": [encoded] * 5})
    statuses = list(predict_frame(scorer, frame, workers=1)["status"])
    assert statuses[:3] == ["ok"] * 3  # 768 pixels decoded when the budget was found spent
    assert statuses[3:] == ["unreadable: request too large (its images decoded 768 pixels, "
                            "limit 600)"] * 2


def test_rows_are_decoded_one_batch_at_a_time(
    scorer: OnnxScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [_b64(_png(Image.new("RGB", (16, 16), (i, 0, 0)))) for i in range(200)]
    row_of = {text: i for i, text in enumerate(texts)}
    events: list[tuple[str, int]] = []
    b64decode, outputs = base64.b64decode, scorer.outputs

    def decoding(text: str | bytes, *args: object, **kwargs: object) -> bytes:
        key = text.decode("ascii") if isinstance(text, bytes) else text
        if key in row_of:
            events.append(("decode", row_of[key]))
        return b64decode(text, *args, **kwargs)

    def inferring(batch: np.ndarray) -> tuple:
        events.append(("infer", len(batch)))
        return outputs(batch)

    monkeypatch.setattr(base64, "b64decode", decoding)
    monkeypatch.setattr(scorer, "outputs", inferring)
    predict_frame(scorer, pd.DataFrame({"image_base64": texts}), batch_size=32, workers=4)
    first_inference = events.index(("infer", 32))
    assert sorted(row for _, row in events[:first_inference]) == list(range(32))
    assert events.index(("decode", 100)) > first_inference
    assert sum(kind == "infer" for kind, _ in events[:events.index(("decode", 100))]) == 3


# -- the logged model, as `mlflow.pyfunc.load_model` and `mlflow models serve` run it -------

@pytest.fixture()
def served_tree(synth_data: Path, tree: dict[str, Path]) -> dict[str, Path]:
    """`tree` with a real synthetic embryo image inside the root and outside it."""
    source = sorted((synth_data.parent / "images").rglob("*.png"))[0]
    shutil.copy(source, tree["inside"])
    shutil.copy(source, tree["secret"])
    return tree


def _load(logged: LoggedBundleModel, trained_run: dict,
          **config: object) -> mlflow.pyfunc.PyFuncModel:
    mlflow.set_tracking_uri(trained_run["uri"])  # models:/ resolves through the global URI
    return mlflow.pyfunc.load_model(logged.model_uri, model_config=config or None)


def test_loaded_model_applies_the_path_rules(logged_model: LoggedBundleModel, trained_run: dict,
                                             served_tree: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root, inside = served_tree["root"], served_tree["inside"]
    paths = [str(inside), str(served_tree["secret"]), str(root / ".." / "outside" / "secret.png"),
             str(root / "link.png"), str(root / "sub"), str(root / "missing.png")]
    frame = pd.DataFrame({"path": paths + [None, None],
                          "image_base64": [None] * 6 + [_b64(inside.read_bytes()), _b64(EPS)]})
    model = _load(logged_model, trained_run)
    statuses = list(model.predict(frame)["status"])  # no roots: no path
    assert statuses == [NOT_ALLOWED] * 6 + ["ok", "unreadable: unsupported format EPS"]
    monkeypatch.setenv(ROOTS, str(root))  # read when the request arrives
    statuses = list(model.predict(frame)["status"])
    assert statuses == ["ok"] + [NOT_ALLOWED] * 5 + ["ok", "unreadable: unsupported format EPS"]
    monkeypatch.delenv(ROOTS)
    configured = _load(logged_model, trained_run, allowed_roots=[str(root)])
    assert list(configured.predict(frame)["status"]) == statuses


def test_loaded_model_refuses_a_large_request_with_http_400(
    logged_model: LoggedBundleModel, trained_run: dict, served_tree: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    model = _load(logged_model, trained_run, max_rows=2, max_image_bytes=100)
    encoded = _b64(served_tree["inside"].read_bytes())  # a 64 px PNG, over 100 bytes
    statuses = list(model.predict(pd.DataFrame({"image_base64": [encoded] * 2}))["status"])
    assert all(s.startswith("unreadable: image too large (") for s in statuses), statuses
    too_many = pd.DataFrame({"image_base64": [encoded] * 3})
    with pytest.raises(MlflowException, match="request has 3 rows") as info:
        model.predict(too_many)
    assert info.value.get_http_status_code() == 400
    # what `mlflow models serve` answers: its /invocations handler turns this into the response
    body = json.dumps({"dataframe_split": json.loads(too_many.to_json(orient="split",
                                                                      index=False))}).encode()
    with pytest.raises(MlflowException) as info:
        scoring_server.invocations(body, "application/json", model,
                                   model.metadata.get_input_schema())
    assert info.value.get_http_status_code() == 400
    assert "this model accepts at most 2 per request" in info.value.message
    # where `mlflow models serve` runs, the same config comes as JSON in the environment
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"max_rows": 1}))
    with pytest.raises(MlflowException, match="request has 2 rows"):
        _load(logged_model, trained_run).predict(too_many.iloc[:2])


def test_trusted_keys_decide_which_bundle_a_server_loads(
    bundle_dir: Path, trained_run: dict, served_tree: dict[str, Path], tmp_path: Path,
    logged_model: LoggedBundleModel, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from embryo_ml.errors import BundleError, ConfigError
    from embryo_ml.export.signing import generate_key_pair, sign_bundle
    from embryo_ml.serving.pyfunc import log_bundle_model, trusted_keys

    team_key, team_pub, _ = generate_key_pair(tmp_path / "team")
    _, other_pub, _ = generate_key_pair(tmp_path / "other")
    signed = tmp_path / "signed"
    shutil.copytree(bundle_dir, signed)
    sign_bundle(signed, team_key)
    signed_model = log_bundle_model(signed, tracking_uri=trained_run["uri"])
    image = pd.DataFrame({"image_base64": [_b64(served_tree["inside"].read_bytes())]})

    model = _load(signed_model, trained_run, trusted_keys=str(team_pub))
    assert list(model.predict(image)["status"]) == ["ok"]
    with pytest.raises(BundleError, match="not a trusted key"):
        _load(signed_model, trained_run, trusted_keys=[str(other_pub)])
    with pytest.raises(BundleError, match="is not signed"):  # the unsigned one, same key
        _load(logged_model, trained_run, trusted_keys=[str(team_pub)])
    monkeypatch.setenv("EMBRYO_ML_TRUSTED_KEYS", str(other_pub))  # `mlflow models serve`
    with pytest.raises(BundleError, match="not a trusted key"):
        _load(signed_model, trained_run)
    monkeypatch.delenv("EMBRYO_ML_TRUSTED_KEYS")
    assert list(_load(logged_model, trained_run).predict(image)["status"]) == ["ok"]  # no keys
    assert trusted_keys({}, {"EMBRYO_ML_TRUSTED_KEYS": f"a.pub{os.pathsep}keys/"}) == [
        "a.pub", "keys/"]
    with pytest.raises(ConfigError, match="'trusted_keys'"):
        trusted_keys({"trusted_keys": 5})
