"""House rule 2: the scoring path runs without torch or mlflow."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["embryo_ml.score", "embryo_ml.score.scorer",
                                    "embryo_ml.export.bundle", "embryo_ml.cli",
                                    "embryo_ml.report.html"])
def test_scoring_path_imports_neither_torch_nor_mlflow(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(','.join(m for m in ('torch', 'mlflow', 'albumentations') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
