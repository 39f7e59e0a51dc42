"""The studies a recipe file can name (``recipe: <name>``), one module each.

Each module of this package defines ``RECIPE`` (``experiments.runner.Recipe``): its settings with
their defaults, what ``--data`` and ``--model`` it accepts, and the function that runs it. The
registry is every module's ``RECIPE``, by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from monai_sal_app.experiments.study import Recipe

__all__ = ["RECIPES"]


def _recipes() -> dict[str, Recipe]:
    recipes = {}
    for module in pkgutil.iter_modules(__path__):
        recipe = importlib.import_module(f"{__name__}.{module.name}").RECIPE
        recipes[recipe.name] = recipe
    return dict(sorted(recipes.items()))


RECIPES: dict[str, Recipe] = _recipes()
