"""Model sources the tests build: MONAI bundles made with ``monai.bundle.init_bundle`` (a small
MONAI ``Classifier`` and the bundle's own preprocessing: load, channel first, RAS in 3D, resample,
window, resize), the same preprocessing written out by hand, oblique anisotropic NIfTI inputs, the
sidecar of a TorchScript or factory model, and a factory module.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from conftest import INPUT_SIZE, LABELS
from monai.bundle import ConfigParser
from monai.bundle.scripts import init_bundle
from monai.data import MetaTensor
from monai.networks.nets import Classifier
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
)
from server_fixtures import oblique_affine, smooth_field

from monai_sal_app.saliency import explain

BUNDLE_LABELS = ["no lesion", "lesion"]
# (input size, target spacing in mm) of the bundles' networks
AXCODES = {2: "LA", 3: "RAS"}  # the bundles' Orientationd
BUNDLE_GRID = {2: ([32, 32], [1.0, 1.0]), 3: ([16, 16, 16], [2.0, 2.0, 2.0])}


def classifier_def(dims: int, channels=(4, 8)) -> dict:
    """``network_def`` of a small MONAI ``Classifier`` for the bundle's input size."""
    size, _ = BUNDLE_GRID[dims]
    return {
        "_target_": "monai.networks.nets.Classifier",
        "in_shape": [1, *size],
        "classes": 2,
        "channels": list(channels),
        "strides": [2] * len(channels),
        "act": "RELU",  # guided backprop needs ReLUs (MONAI's default is PReLU)
    }


def preprocessing_def(dims: int) -> list[dict]:
    """The bundle's ``preprocessing``: load, channel first, RAS (2D: LA, which flips both axes of
    the test's 2D images), resample, window, resize."""
    size, spacing = BUNDLE_GRID[dims]
    steps = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": AXCODES[dims]},
    ]
    steps += [
        {"_target_": "Spacingd", "keys": "image", "pixdim": spacing, "mode": "bilinear"},
        {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": 0.0,
            "a_max": 1.0,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
        {"_target_": "Resized", "keys": "image", "spatial_size": size},
    ]
    return steps


def hand_built_preprocessing(dims: int) -> Compose:
    """The same steps written out with MONAI's classes, not read from a bundle."""
    size, spacing = BUNDLE_GRID[dims]
    steps = [
        LoadImaged(keys="image"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes=AXCODES[dims]),
    ]
    steps += [
        Spacingd(keys="image", pixdim=spacing, mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        Resized(keys="image", spatial_size=size),
    ]
    return Compose(steps)


def hand_built_explanation(
    bundle: Path, image: Path, dims: int, method: str, target: int
) -> tuple[np.ndarray, np.ndarray]:
    """``explain()`` on the bundle's network built by hand (MONAI's ``Classifier`` with the bundle's
    weights), on the image through :func:`hand_built_preprocessing`, inverted by ``Invertd``:
    ``(map on the image's grid, its affine)``."""
    network = Classifier(**{k: v for k, v in classifier_def(dims).items() if k != "_target_"})
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    preprocessing = hand_built_preprocessing(dims)
    data = preprocessing({"image": str(image)})
    x = data["image"]
    maps = explain(network.eval(), x.as_tensor()[None], method, target=target)
    data["map"] = MetaTensor(maps[0], meta=dict(x.meta), applied_operations=x.applied_operations)
    restored = Invertd(keys="map", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)["map"]
    return np.asarray(restored)[0], np.asarray(restored.affine)


def make_bundle(
    folder: Path,
    dims: int,
    network_def: dict | None = None,
    weights_of: dict | None = None,
    config_format: str = "json",
    **metadata_changes,
) -> Path:
    """A bundle made with ``monai.bundle.init_bundle``: the network of ``network_def`` (default
    :func:`classifier_def`) with seeded weights (of ``weights_of``'s network when given: a mismatch),
    the preprocessing of :func:`preprocessing_def`, metadata naming the classes and input;
    ``config_format`` "yaml": ``configs/inference.yaml`` instead of ``inference.json``."""
    size, _ = BUNDLE_GRID[dims]
    network_def = network_def or classifier_def(dims)
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "network_def": network_def,
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_def(dims)},
    }
    metadata = {
        "version": "0.1.0",
        "name": f"test classifier {dims}D",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": size, "dtype": "float32"}},
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "num_channels": 2,
                    "channel_def": {"0": BUNDLE_LABELS[0], "1": BUNDLE_LABELS[1]},
                }
            },
        },
        **metadata_changes,
    }
    torch.manual_seed(dims)
    network = ConfigParser({"network_def": weights_of or network_def}).get_parsed_content("network_def")
    init_bundle(str(folder), network=network, metadata_str=json.dumps(metadata), inference_str=json.dumps(inference))
    if config_format == "yaml":
        (folder / "configs" / "inference.json").unlink()
        (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(inference))
    return folder


def oblique_image(path: Path, dims: int, seed: int | None = None) -> tuple[Path, np.ndarray]:
    """An oblique (rotated 20 degrees), anisotropic NIfTI of a smooth random field (``seed``): 3D
    (20, 18, 17) at 1.5 x 1.2 x 2.5 mm, or 2D (44, 36) at 0.8 x 0.6 mm."""
    if dims == 3:
        array, affine = (
            smooth_field((20, 18, 17), seed=4 if seed is None else seed),
            oblique_affine((1.5, 1.2, 2.5), (12.0, -30.0, 7.5), degrees=20),
        )
    else:
        array, affine = smooth_field((44, 36), seed=3 if seed is None else seed), np.diag([0.8, 0.6, 1.0, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path, affine


def sidecar(path: Path, dims: int, **fields) -> Path:
    path.write_text(
        json.dumps({"labels": LABELS, "spatial_dims": dims, "in_channels": 1, "input_size": INPUT_SIZE[dims], **fields})
    )
    return path


FACTORY_MODULE = '''
import torch
from torch import nn


class Pair(nn.Module):
    """A classifier that returns (logits, features): not what an explainer can use."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), x


def make(channels=4, pair=False):
    inner = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2)
    )
    return Pair(inner) if pair else inner
'''
