"""Re-export of the project error type (defined in the runtime so both packages share it)."""
from feather_runtime.errors import FeatherError

__all__ = ["FeatherError"]
