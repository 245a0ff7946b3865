"""raydistill: chain-of-thought distillation studies on Ray."""

__version__ = "0.1.0"
