"""Masked-face recognition by de-occlusion distillation (the method, its masks and identity set)."""
from trustlab.methods.deocclusion import deocclusion  # noqa: F401  (registers the method)
