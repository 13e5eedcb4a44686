"""Method modules. Importing this package registers every method with the platform registry.
A new method is one module here plus one YAML in experiments/conf/method/."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
