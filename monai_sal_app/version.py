"""The package's version, stated once: ``pyproject.toml`` reads it from here, and the cards that
record which monai-sal wrote them (model, explainer and trust cards) take it from here."""

__version__ = "0.1.0"
