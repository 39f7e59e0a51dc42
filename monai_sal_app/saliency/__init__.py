"""Every attribution method behind one call, :func:`explain`.

Importing this package imports every module in it, and each module registers its methods with
``@register``; ``available_methods()`` then lists them with their defaults.
"""

import importlib
import pkgutil

from monai_sal_app.saliency.core import available_methods, explain, get_method, model_guard, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["available_methods", "explain", "get_method", "model_guard", "register"]
