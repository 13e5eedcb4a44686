"""Method families. ``import_all()`` (called by the registry the first time a method is asked
for) imports every family package, whose ``__init__`` imports and so registers its methods.
Importing this package alone imports no method: a script may import one family (the GPU benchmark
imports ``trustlab.methods.video`` on a machine without Ray)."""
import importlib
import pkgutil


def import_all() -> None:
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")
