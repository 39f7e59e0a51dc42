"""A model left as it was found: :func:`model_guard` puts it in eval mode, freezes its parameters
and turns in-place activations off for the duration of a method, a check or an explainer's
training, and restores all of it afterwards, also after an error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["in_place_activations_off", "model_guard"]


@contextlib.contextmanager
def in_place_activations_off(model: nn.Module) -> Iterator[nn.Module]:
    """The modules of ``model`` with ``inplace=True`` (ReLU, ELU, Dropout, ...) compute out of
    place for the duration; restored afterwards, also after an error."""
    inplace = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    try:
        for m in inplace:
            m.inplace = False
        yield model
    finally:
        for m in inplace:
            m.inplace = True


@contextlib.contextmanager
def model_guard(model: nn.Module, keep_in_place: bool = False) -> Iterator[nn.Module]:
    """Eval mode, frozen parameters and no in-place activations for the duration; all restored.

    Parameters are frozen because attribution needs gradients with respect to the input only;
    in-place activations are turned off because backward hooks (guided backprop) and captured
    activations (Grad-CAM's first pass) must not see tensors modified in place. ``keep_in_place``:
    leave them on, for work that neither hooks into modules nor captures activations (plain input
    gradients, forward passes), or that guards its captures itself: autograd handles them, and
    they spare a tensor per activation.
    """
    # Only what differs is set and restored: a module attribute goes through nn.Module.__setattr__,
    # which costs milliseconds over the hundreds of modules of a DenseNet, on every call.
    training = [m for m in model.modules() if m.training]
    grads = [p for p in model.parameters() if p.requires_grad]
    in_place = contextlib.nullcontext() if keep_in_place else in_place_activations_off(model)
    try:
        for m in training:
            m.training = False
        for p in grads:
            p.requires_grad_(False)
        with in_place:
            yield model
    finally:
        for m in training:
            m.training = True
        for p in grads:
            p.requires_grad_(True)
