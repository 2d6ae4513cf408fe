"""Spark: the logged pyfunc model (`embryo-ml export --log-model`) as a UDF,
`mlflow.pyfunc.spark_udf`, on `local[2]`, gives the scores `embryo-ml score` gives.

Needs pyspark (`pip install -e '.[spark]'`) and Java 17 or later; skipped, saying which is
missing, without them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("pyspark", reason="pyspark is not installed (pip install -e '.[spark]')")


def _java_problem() -> str | None:
    """Why Spark cannot start here, or None: it needs a Java 17+ runtime."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        return "Spark needs Java 17 or later (no java on PATH or JAVA_HOME)"
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"Spark needs Java 17 or later ({java} -version failed: {error})"
    said = done.stderr or done.stdout
    quoted = said.split('"')[1] if '"' in said else ""
    major = quoted.split(".")[1] if quoted.startswith("1.") else quoted.split(".")[0]
    if not major.isdigit() or int(major) < 17:
        return f"Spark needs Java 17 or later, found {quoted or said.strip()[:80]!r}"
    return None


if _java_problem():
    pytest.skip(_java_problem(), allow_module_level=True)

import mlflow  # noqa: E402

from embryo_ml.export.bundle import read_bundle  # noqa: E402
from embryo_ml.score.scorer import score_images  # noqa: E402

TOLERANCE = 1e-6
pytestmark = [
    pytest.mark.slow,  # a JVM and two Python workers: about 35 s
    pytest.mark.usefixtures("forget_tracking_uri"),
    # pyspark's own notes about pandas 3, not about this code
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def spark():
    """A local[2] SparkSession whose Python workers run this interpreter (embryo-ml, mlflow)."""
    from pyspark.sql import SparkSession

    saved = {k: os.environ.get(k) for k in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    session = (SparkSession.builder.master("local[2]").appName("embryo-ml-test")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.driver.memory", "1g").getOrCreate())
    yield session
    session.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_spark_udf_scores_paths_and_bytes_like_the_cli(
    spark, logged_model, trained_run: dict, bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    from pyspark.sql.functions import base64, col, struct

    folder = tmp_path / "images"
    folder.mkdir()
    for source in sorted((synth_data.parent / "images").rglob("*.png"))[:6]:
        shutil.copy(source, folder / source.name)
    (folder / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    score_images(folder, bundle_dir, tmp_path / "expected.csv", progress=False)
    expected = pd.read_csv(tmp_path / "expected.csv", dtype=str, keep_default_na=False)
    expected = expected.set_index("path")

    mlflow.set_tracking_uri(trained_run["uri"])  # models:/ resolves through the global URI
    udf = mlflow.pyfunc.spark_udf(spark, logged_model.model_uri, env_manager="local",
                                  model_config={"allowed_roots": [str(folder)]})
    files = sorted(str(p) for p in folder.iterdir())
    frame = spark.createDataFrame([(f,) for f in files], ["path"]).repartition(2)
    got = frame.withColumn("scored", udf(struct("path"))).select("scored.*").toPandas()

    assert sorted(got["path"]) == files
    _check(got, "path", expected, read_bundle(bundle_dir).classes)

    # The files' bytes instead of their paths (no allowed roots needed): Spark reads them.
    contents = spark.read.format("binaryFile").load(str(folder))
    request = contents.select(col("path").alias("id"), base64("content").alias("image_base64"))
    got = request.withColumn("scored", udf(struct("id", "image_base64"))).select(
        "scored.*").toPandas()
    assert sorted(Path(i).name for i in got["id"]) == sorted(Path(f).name for f in files)
    _check(got, "id", expected, read_bundle(bundle_dir).classes)


def _check(got: pd.DataFrame, key: str, expected: pd.DataFrame, classes: list[str]) -> None:
    """Each row as `embryo-ml score` scored its file (by name): status, scores to 1e-6,
    label and flags."""
    for _, row in got.iterrows():
        want = expected.loc[Path(row[key]).name]
        assert row["status"] == want["status"]
        if want["status"] != "ok":
            assert row["status"].startswith("unreadable") and pd.isna(row["score"])
            continue
        for column in ["score", *[f"p_{c}" for c in classes]]:
            assert abs(float(row[column]) - float(want[column])) <= TOLERANCE, column
        assert row["label_pred"] == want["label_pred"] and row["flags"] == want["flags"]
