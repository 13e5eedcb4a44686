"""Face-forgery video detection: STDT, NACO, LAST and what only they share (cross-dataset
protocol, clip layers, the synthetic video set, the video report and robustness sweep)."""
from trustlab.methods.video import last, naco, stdt  # noqa: F401  (registers the methods)
