"""ITEM: generated-image detection by image-text mismatch (the method and its captioned scenes)."""
from trustlab.methods.item import item  # noqa: F401  (registers the method)
