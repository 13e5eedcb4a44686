"""Few-shot class-incremental learning: CD² and SDC on the shared session protocol
(``protocol.py``) and engine (``engine.py``)."""
from trustlab.methods.fscil import cd2, sdc  # noqa: F401  (registers the methods)
