"""Checks that run the model: does a map depend on the model (randomization), does it track what the
model uses (fidelity), does it come back the same (repeatability), and latent subtypes.

Imports ``saliency``, ``models`` and ``metrics``; never the server or the CLI. Definitions:
docs/METHODS.md. The trust card, which runs them all for one model: :func:`trust_card`.
"""

from monai_sal_app.evaluation.trust import read_trust_card, trust_card, trust_summary, write_trust_card

__all__ = ["read_trust_card", "trust_card", "trust_summary", "write_trust_card"]
