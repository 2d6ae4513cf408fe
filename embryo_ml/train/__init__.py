"""Training: plain functions (`train_one_epoch`, `evaluate`, `fit`), MLflow kept in `tracking`."""
