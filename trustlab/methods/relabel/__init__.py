"""Re-label distillation for prediction interpretation (the method and its attribution baselines)."""
from trustlab.methods.relabel import relabel  # noqa: F401  (registers the method)
