"""Checks that run the model: does a map depend on the model (randomization), does it track what the
model uses (fidelity), does it come back the same (repeatability), and latent subtypes.

Imports ``saliency``, ``models`` and ``metrics``; never the server or the CLI. Definitions:
docs/METHODS.md.
"""
