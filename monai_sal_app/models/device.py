"""The compute device used when none is given."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA (the current device) when available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
