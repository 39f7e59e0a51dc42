"""A model left as it was found: :func:`model_guard` puts it in eval mode, freezes its parameters
and turns in-place activations off for the duration of a method, a check or an explainer's
training, and restores all of it afterwards, also after an error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["model_guard"]


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, frozen parameters and no in-place activations for the duration; all restored.

    Parameters are frozen because attribution needs gradients with respect to the input only;
    in-place activations are turned off because backward hooks (guided backprop) and captured
    activations (Grad-CAM) must not see tensors modified in place.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    inplace = [(m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        for m, _ in inplace:
            m.inplace = False
        yield model
    finally:
        for m, flag in modes:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in inplace:
            m.inplace = flag
