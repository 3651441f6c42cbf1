"""Real-dataset adapters: each module registers one official layout with ``@register_source``."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
