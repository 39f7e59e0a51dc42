"""monai-sal: saliency maps for medical image classifiers.

The core library (``data``, ``models``, ``saliency``, ``metrics``) is importable without the
MONAI Label server; ``main.py`` and ``lib/`` are the server adapter, ``cli.py`` the command line.
"""

from monai_sal_app.version import __version__

__all__ = ["__version__", "available_methods", "explain"]


def __getattr__(name):
    # Lazy: ``import monai_sal_app.metrics`` must not pull torch in (the Slicer module uses it).
    if name in ("explain", "available_methods"):
        from monai_sal_app import saliency

        return getattr(saliency, name)
    raise AttributeError(name)
