"""Serving: the MLflow pyfunc model and the checks on what a served request may read."""
