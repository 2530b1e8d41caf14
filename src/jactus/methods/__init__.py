"""Methods behind one interface (`Method`); each registers itself by name on import."""

from .base import REGISTRY, Method, MethodContext, get_method_class, register  # noqa: F401
from . import full_ft  # noqa: F401  (registers full_ft, linear_probe)

__all__ = ["REGISTRY", "Method", "MethodContext", "get_method_class", "register"]
