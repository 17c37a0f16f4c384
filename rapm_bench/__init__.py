"""rapm-bench: RAPM distillation and few-step model evaluation on one GPU."""

__version__ = "0.1.0"
