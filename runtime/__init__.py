"""feather_runtime: the lean runtime for feather-export artifacts.

Importing this package must not import torch or transformers.
"""
from .errors import FeatherError
from .pipeline import Pipeline, Result

__all__ = ["FeatherError", "Pipeline", "Result"]
