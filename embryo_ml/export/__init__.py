"""Scoring bundles: `bundle` (format: write, read, verify; torch-free) and `onnx_export` (torch)."""
