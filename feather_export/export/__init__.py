"""Artifacts: export a model into ONNX segments + manifest, validate them against PyTorch."""
