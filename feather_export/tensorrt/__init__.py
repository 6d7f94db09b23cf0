"""TensorRT: engine plans and optimization profiles, the engine builder, the compatibility lint."""
