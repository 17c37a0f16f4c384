"""Performance measurements beside `rapm-bench bench`: the distillation engine timed on itself."""
