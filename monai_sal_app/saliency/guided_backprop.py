"""Guided backpropagation (Springenberg et al. 2015), 2D and 3D.

The input gradient of the target logit, computed with every ReLU's backward pass replaced by
grad_in = max(grad_out, 0) * [x > 0]: only positive gradients pass, and only where the ReLU's
input was positive (the forward pass is unchanged).

Why not captum or monai.visualize: both swap the backward pass of ``nn.ReLU`` *modules* only
(captum with backward hooks, MONAI by replacing modules), so a network that calls ``torch.relu``
or ``F.relu`` in its ``forward`` silently gets the plain gradient there. Here the override sits
below the module level: while :func:`guided_relus` is active, a ``TorchFunctionMode`` intercepts
every ReLU call that reaches torch's function dispatch (``torch.relu``, ``torch.relu_``,
``F.relu`` with or without ``inplace``, ``Tensor.relu``, ``Tensor.relu_``), which covers
``nn.ReLU`` modules (their forward calls ``F.relu``) and functional calls alike, and routes it
through an autograd function with the guided backward. Nothing is patched or hooked: leaving the
context (normally or by an exception) pops the mode and the model and torch are as before.
ReLUs written as ``clamp(min=0)`` or other activations (LeakyReLU, PReLU, ...) are not ReLUs
here; a model with no ReLU call at all raises ``ValueError`` rather than returning the plain
gradient.

Definition and reference: docs/METHODS.md#guided-backprop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from monai_sal_app.saliency.core import auto_batch_size, register
from monai_sal_app.saliency.gradient import input_gradients


def _relu_grad(grad_out: torch.Tensor, relu_out: torch.Tensor, guided: bool) -> torch.Tensor:
    """ReLU's backward: guided (max(grad, 0) where the ReLU's output is positive) or plain.

    ``threshold_backward`` is the kernel of ReLU's own backward (grad where out > 0, else 0); the
    guided clamp then runs in place on that fresh tensor: two passes over the data, not four.
    """
    grad_in = torch.ops.aten.threshold_backward(grad_out, relu_out, 0)
    return grad_in.clamp_(min=0) if guided else grad_in


class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward max(grad, 0) where the input was positive, 0 elsewhere (the plain
    ReLU backward while ``mode.guided`` is False, see :class:`_GuidedReLUMode`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mode: _GuidedReLUMode) -> torch.Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        ctx.mode = mode
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (out,) = ctx.saved_tensors
        return _relu_grad(grad_out, out, ctx.mode.guided), None


class _GuidedReLUInplace(_GuidedReLU):
    """In-place variant (``relu_``, ``F.relu(inplace=True)``): modifies and returns ``x``; same backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mode: _GuidedReLUMode) -> torch.Tensor:
        ctx.mark_dirty(x)
        x.clamp_(min=0)
        ctx.save_for_backward(x)
        ctx.mode = mode
        return x


_OUT_OF_PLACE_RELUS = frozenset({torch.relu, torch.Tensor.relu})
_IN_PLACE_RELUS = frozenset({torch.relu_, torch.Tensor.relu_})  # F.relu_ is torch.relu_


class _GuidedReLUMode(TorchFunctionMode):
    """Routes every ReLU call through the guided autograd functions and counts them.

    ``guided`` (True) is read by those functions when the backward pass runs, so one forward
    pass can serve a plain backward (``guided = False``, e.g. Grad-CAM's layer gradient) and a
    guided one (guided Grad-CAM).
    """

    def __init__(self) -> None:
        super().__init__()
        self.relu_calls = 0
        self.guided = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.relu:  # F.relu always forwards ``inplace`` by keyword
            self.relu_calls += 1
            return (_GuidedReLUInplace if kwargs.get("inplace", False) else _GuidedReLU).apply(args[0], self)
        if func in _OUT_OF_PLACE_RELUS:
            self.relu_calls += 1
            return _GuidedReLU.apply(args[0], self)
        if func in _IN_PLACE_RELUS:
            self.relu_calls += 1
            return _GuidedReLUInplace.apply(args[0], self)
        return func(*args, **kwargs)


@contextlib.contextmanager
def guided_relus() -> Iterator[_GuidedReLUMode]:
    """Within this context every ReLU (module or functional) has the guided backward pass.

    Yields the mode, whose ``relu_calls`` counts the ReLU calls it rerouted. Thread-local, and
    gone on exit (torch function modes are a stack popped by the ``with`` statement).
    """
    with _GuidedReLUMode() as mode:
        yield mode


def require_relu_calls(mode: _GuidedReLUMode, model: nn.Module) -> None:
    """``ValueError`` if no ReLU went through ``mode``: guided backprop would be the plain gradient."""
    if mode.relu_calls == 0:
        raise ValueError(
            f"guided backprop needs ReLU activations, and {type(model).__name__} calls none "
            "(nn.ReLU, torch.relu, F.relu or Tensor.relu); it would equal the plain gradient"
        )


def guided_input_gradients(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Guided-backprop gradient (N, C, *spatial) of the target logit; ``batch_size`` images per
    pass, None picks it from free memory. ``ValueError`` if the model calls no ReLU."""
    if batch_size is None:
        batch_size = auto_batch_size(model, images, 1)
    with guided_relus() as mode:
        grads = input_gradients(model, images, target, batch_size)
    require_relu_calls(mode, model)
    return grads


@register(
    "guided_backprop",
    "input gradient with every ReLU passing back only positive gradients (modules and functional)",
    signed=True,
    hooks=True,
)
def guided_backprop(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Guided-backprop maps (N, 1, *spatial), summed over input channels, signed."""
    return guided_input_gradients(model, images, target, batch_size).sum(dim=1, keepdim=True)
