"""Scoring path: ONNX Runtime, numpy, Pillow/OpenCV only. Never imports torch or mlflow, so a
hospital PC can score without the training stack and `embryo-ml score` starts fast."""
