"""Few-shot class-incremental learning: CD² and SDC on the shared session protocol and engine."""
from trustlab.methods.fscil import cd2, sdc  # noqa: F401  (registers the methods)
