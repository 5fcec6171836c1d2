"""Registry entry point: `build_masker("attention")` loads this module name (masking/__init__._MODULES);
the generator itself lives in `attention_guided.py`."""
from .attention_guided import AttentionGuidedMasking

__all__ = ["AttentionGuidedMasking"]
