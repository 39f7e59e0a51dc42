"""The studies a recipe file can name (``recipe: <name>``), one module each.

Each module of this package defines ``RECIPE`` (``experiments.study.Recipe``): its settings with
their defaults, what ``--data`` and ``--model`` it accepts, and the function that runs it.
:data:`RECIPES` is the registry: every module's ``RECIPE``, by name; a new study is added to it here.
"""

from __future__ import annotations

from monai_sal_app.experiments.studies import (
    ct_importance,
    demo,
    explainers,
    subtypes,
    trainable_vs_posthoc,
    trust,
)
from monai_sal_app.experiments.study import Recipe

__all__ = ["RECIPES", "get_recipe"]

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        ct_importance.RECIPE,
        demo.RECIPE,
        explainers.RECIPE,
        subtypes.RECIPE,
        trainable_vs_posthoc.RECIPE,
        trust.RECIPE,
    )
}


def get_recipe(name) -> Recipe:
    """The registered study called ``name``; ValueError naming the studies otherwise."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
