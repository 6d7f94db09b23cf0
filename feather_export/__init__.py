"""feather_export: export LLaVA checkpoints into pruned ONNX segments and engines."""
from feather_export.errors import FeatherError

__version__ = "0.1.0"
__all__ = ["FeatherError", "__version__"]
