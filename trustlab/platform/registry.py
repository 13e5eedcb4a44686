"""The method registry: each method module registers itself with ``@register_method``.

``list_methods()`` and ``get_method()`` first import every method family
(``trustlab.methods.import_all``) so that the registry is complete before anyone asks; the
platform itself never names a method.
"""
from __future__ import annotations

import importlib
from typing import Callable

_REGISTRY: dict[str, object] = {}
_LOADED = False


class UnknownMethodError(KeyError):
    """Raised for a method name that no module registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it a plain line
        return str(self.args[0])


def register_method(name: str) -> Callable:
    """Class decorator: instantiate the class once and register it under ``name`` (``get_method``
    returns it wrapped in ``trustlab.platform.method.Bound``, which applies the optional-hook rule)."""

    def deco(cls):
        from trustlab.platform.method import Bound

        if name in _REGISTRY and type(_REGISTRY[name].impl) is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        inst = cls()
        inst.name = name
        _REGISTRY[name] = Bound(inst)
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        importlib.import_module("trustlab.methods").import_all()
        _LOADED = True


def list_methods() -> list[str]:
    """Sorted names of every registered method."""
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str):
    """The registered method object for ``name``; ``UnknownMethodError`` lists the valid ones.
    A method already registered (its family imported) is returned without importing the others
    (a script that imports one family, as benchmarks/gpu_step.py does, stays with that family)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; valid choices: {', '.join(sorted(_REGISTRY))}"
        ) from None
