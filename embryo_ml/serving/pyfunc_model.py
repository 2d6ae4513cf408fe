"""MLflow "models from code" entry point: `log_bundle_model` logs this file as the model.

MLflow runs it when the model is logged and loaded; it only names the model object. Everything
else (the bundle, the scorer) comes from the model's artifacts in `BundleModel.load_context`.
"""

import mlflow

from embryo_ml.serving.pyfunc import BundleModel

mlflow.models.set_model(BundleModel())
