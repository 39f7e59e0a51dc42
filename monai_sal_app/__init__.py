"""monai-sal: saliency maps for medical image classifiers.

The core library (``data``, ``models``, ``saliency``, ``metrics``) is importable without the
MONAI Label server; ``main.py`` and ``lib/`` are the server adapter, ``cli.py`` the command line.
"""

from monai_sal_app.version import __version__

__all__ = ["__version__", "available_methods", "explain"]


def __getattr__(name):
    # Here, not at the top: ``import monai_sal_app`` (and so ``import monai_sal_app.metrics`` or
    # ``.data``) does not import torch and MONAI, which the methods need (about 5 s at start-up).
    if name in ("explain", "available_methods"):
        from monai_sal_app import saliency

        return getattr(saliency, name)
    raise AttributeError(name)
