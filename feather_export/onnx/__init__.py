"""ONNX graph builders: the vision, embed, decoder-span and select segments, and the custom select op."""
