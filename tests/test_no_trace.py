"""No attribution method leaves a trace on the model, the input or torch.

Every method in ``available_methods()`` is covered, one registered later included, with no edit
here: it runs with conftest's ``small_params`` (its defaults unless it is listed there) on a model
in an unsettled state (mixed train/eval modes, a frozen parameter, a parameter holding a
gradient), on 2D and on 3D input, and once more made to fail inside, at its first and at its last
forward pass. Afterwards the model, the input and torch's process-wide state are as they were.
A method that explains only some models (``wildcat``) runs on conftest's ``network_for`` model;
its failure case is in its own test module.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn.modules.module as module_globals
from conftest import FailsOnCall, images_for, network_for, small_params, tiny_cnn, tiny_resnet
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from monai_sal_app.saliency import available_methods, explain, get_method

METHODS = sorted(available_methods())
# The methods that explain any classifier without a trained explainer bound to its weights
# (``wildcat`` needs its own head, see test_wildcat.py; ``mask_generator`` a trained generator,
# see test_mask_generator.py).
ANY_MODEL_METHODS = [
    method for method in METHODS if get_method(method).requires is None and get_method(method).explainer is None
]
_ABSENT = object()  # what a removed attribute reads as


def unsettled(model: nn.Module) -> nn.Module:
    """``model`` in a state a method must give back as it found it: train mode but its first child
    in eval mode, its first parameter frozen, its last parameter holding a gradient (0.5 everywhere)."""
    model.train()
    next(model.children()).eval()
    parameters = list(model.parameters())
    parameters[0].requires_grad_(False)
    parameters[-1].grad = torch.full_like(parameters[-1], 0.5)
    return model


class TensorState:
    """What a method may not change on a tensor it is given: the object itself, its value, its
    version counter (bumped by any in-place write, even one undone later), requires_grad, its
    .grad (object and value), its graph node and its hooks."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.value = tensor.detach().clone()
        self.version = tensor._version
        self.requires_grad = tensor.requires_grad
        self.grad = tensor.grad
        self.grad_value = None if tensor.grad is None else tensor.grad.clone()
        self.grad_fn = tensor.grad_fn
        self.hooks = self.hook_counts(tensor)

    @staticmethod
    def hook_counts(tensor: torch.Tensor) -> tuple[int, int]:
        return len(tensor._backward_hooks or {}), len(getattr(tensor, "_post_accumulate_grad_hooks", None) or {})

    def assert_unchanged(self, tensor: torch.Tensor, name: str) -> None:
        assert tensor is self.tensor, f"{name} was replaced by another tensor"
        assert torch.equal(tensor.detach(), self.value), f"{name} changed value"
        assert tensor._version == self.version, f"{name} was written in place"
        assert tensor.requires_grad == self.requires_grad, f"{name}.requires_grad changed"
        assert tensor.grad is self.grad, f"{name}.grad was replaced or removed"
        if self.grad_value is not None:
            assert torch.equal(tensor.grad, self.grad_value), f"{name}.grad changed value"
        assert tensor.grad_fn is self.grad_fn, f"{name} became part of a graph"
        assert self.hook_counts(tensor) == self.hooks, f"{name} kept a tensor hook"


def module_state(model: nn.Module) -> dict[str, dict]:
    """Per submodule (by name): class, train/eval flag, in-place flag, attribute names (an added
    one, such as an instance-level ``forward``, is a trace), every hook dict and hook flag, and its
    children (the objects: a swapped submodule is a trace)."""
    return {
        name: {
            "class": type(m),
            "training": m.training,
            "inplace": getattr(m, "inplace", None),
            "attributes": sorted(vars(m)),
            "hooks": {k: dict(v) if isinstance(v, dict) else v for k, v in vars(m).items() if "hook" in k},
            "children": dict(m._modules),
        }
        for name, m in model.named_modules()
    }


def torch_state() -> dict:
    """Process-wide state a method may not leave changed: autograd's modes, torch's settings, the
    stacks of function/dispatch modes and of saved-tensor hooks, the global module hooks, and the
    torch, numpy and Python random generators (a method draws noise from its own generator)."""
    numpy_name, numpy_keys, *numpy_rest = np.random.get_state()
    return {
        "grad mode": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "anomaly detection": torch.is_anomaly_enabled(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "default dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "function modes": len(_get_current_function_mode_stack()),
        "dispatch modes": len(_get_current_dispatch_mode_stack()),
        "saved-tensor hooks": torch._C._autograd._top_saved_tensors_default_hooks(False),
        "global module hooks": {
            k: len(v) if isinstance(v, dict) else v for k, v in vars(module_globals).items() if k.startswith("_global_")
        },
        "torch generator": torch.get_rng_state().numpy().tobytes(),
        "numpy generator": (numpy_name, numpy_keys.tobytes(), *numpy_rest),
        "python generator": random.getstate(),
    }


def patchable(model: nn.Module) -> dict[tuple[object, str], object]:
    """Every attribute, by (namespace, name), of what a method could monkeypatch: torch,
    torch.nn.functional, the tensor classes and the classes of the model's modules with their bases."""
    classes = {cls for m in model.modules() for cls in type(m).__mro__} | set(torch.Tensor.__mro__)
    return {(namespace, name): value for namespace in (torch, F, *classes) for name, value in vars(namespace).items()}


class Snapshot:
    """Everything about ``model``, its input ``x`` and torch that no method may change, taken at
    construction; :meth:`assert_no_trace` compares the present with it."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model, x
        self.modules = module_state(model)
        self.parameters = {name: TensorState(p) for name, p in model.named_parameters()}
        self.buffers = {name: TensorState(b) for name, b in model.named_buffers()}
        self.input = TensorState(x)
        self.torch = torch_state()
        self.attributes = patchable(model)

    def assert_no_trace(self) -> None:
        assert module_state(self.model) == self.modules
        parameters, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        assert parameters.keys() == self.parameters.keys() and buffers.keys() == self.buffers.keys()
        for name, state in self.parameters.items():
            state.assert_unchanged(parameters[name], f"parameter {name}")
        for name, state in self.buffers.items():
            state.assert_unchanged(buffers[name], f"buffer {name}")
        self.input.assert_unchanged(self.x, "the input")
        assert torch_state() == self.torch
        patched = [
            f"{getattr(namespace, '__name__', namespace)}.{name}"
            for (namespace, name), value in self.attributes.items()
            if vars(namespace).get(name, _ABSENT) is not value
        ]
        assert not patched, f"patched or removed: {patched}"
        classes = {namespace for namespace, _ in self.attributes if isinstance(namespace, type)}
        added = [f"{c.__name__}.{name}" for c in classes for name in vars(c) if (c, name) not in self.attributes]
        assert not added, f"added to classes: {added}"


@dataclass(frozen=True)
class Call:
    """How explain() is called: on which network and input, in which grad mode, for which target."""

    network: Callable[[int], nn.Module]
    spatial_dims: int
    leaf_input: bool  # the input requires grad and holds a .grad of its own
    grad_enabled: bool  # torch's grad mode around the call (MONAI Label serves under no_grad)
    target: list[int] | None  # None: the predicted class, which costs explain() one forward pass


CALLS = {
    "2d-cnn-predicted-class": Call(tiny_cnn, 2, leaf_input=False, grad_enabled=True, target=None),
    "3d-resnet-leaf-input-under-no_grad": Call(tiny_resnet, 3, leaf_input=True, grad_enabled=False, target=[1, 0]),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize("method", METHODS)
def test_no_trace_on_the_model_or_the_input(method, call):
    model = unsettled(network_for(method, call.network(call.spatial_dims)))
    x = images_for(call.spatial_dims, n=2)
    if call.leaf_input:
        x.requires_grad_(True)
        x.grad = torch.full_like(x, 0.25)
    with torch.set_grad_enabled(call.grad_enabled):
        snapshot = Snapshot(model, x)
        maps = explain(model, x, method, target=call.target, **small_params(method, model))
        snapshot.assert_no_trace()
    assert maps.shape == (2, 1, *x.shape[2:])


@pytest.mark.parametrize("failing_pass", ["first", "last"])
@pytest.mark.parametrize("method", ANY_MODEL_METHODS)
def test_no_trace_on_the_model_or_the_input_after_a_failure_inside_the_method(method, failing_pass):
    """FailsOnCall raises on the method's first forward pass, or on its last one (counted on a
    run that does not fail). With a given target explain() makes no forward pass of its own."""
    params = small_params(method)
    if "batch_size" in available_methods()[method]["defaults"]:
        params["batch_size"] = 2  # several passes, so that the last one fails after others succeeded
    x = images_for(2, n=2)
    counting = FailsOnCall(fail_at=None)
    explain(counting, x, method, target=0, **params)
    fail_at = 1 if failing_pass == "first" else counting.calls
    model = unsettled(FailsOnCall(fail_at))
    snapshot = Snapshot(model, x)
    with pytest.raises(RuntimeError, match="boom"):
        explain(model, x, method, target=0, **params)
    assert model.calls == fail_at
    snapshot.assert_no_trace()
