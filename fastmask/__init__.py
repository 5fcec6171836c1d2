"""fastmask: a performance-first training engine for masked image modeling."""
__version__ = "0.1.0"
