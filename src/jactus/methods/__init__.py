"""Methods behind one interface (`Method`). Each module in this package registers its methods by name on import;
every module here is imported, so adding a method is adding a file (and its `conf/method/*.yaml`)."""

import importlib
import pkgutil

from .base import REGISTRY, Method, MethodContext, get_method_class, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Method", "MethodContext", "get_method_class", "register"]
