"""Interpretable forgery detection by feature whitening (the method and its face-manipulation set)."""
from trustlab.methods.whitening import whitening  # noqa: F401  (registers the method)
