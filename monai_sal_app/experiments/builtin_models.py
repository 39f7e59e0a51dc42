"""The built-in models: which data to generate and how to train a classifier on it (a study's recipe
is something else: ``experiments.studies``).

``monai-sal serve`` trains its default models with them, and the studies that need a classifier
with pathology masks (``trainable_vs_posthoc``, ``explainers``, ``ct_importance``) train theirs
from one. A built-in model names a generator of
``data.generators`` with its train and test presets and sizes, the network's input side, and the
training settings (conv5-fc3 backbone, Adam, patience = epochs so that the best validation epoch
of the whole run is kept).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_sal_app.data.generators import get_generator
from monai_sal_app.models.manifest_training import train_from_manifest

__all__ = [
    "DEFAULT_MODELS",
    "MIN_VAL_AUC",
    "TRAIN_ATTEMPTS",
    "DefaultModel",
    "builtin_model_for",
    "generate_explainer_data",
    "generate_model_data",
    "scaled_augmentations",
    "train_builtin_model",
]

MIN_VAL_AUC = 0.75  # a model below this validation AUC is trained again with the next seed
TRAIN_ATTEMPTS = 3


@dataclass(frozen=True)
class DefaultModel:
    """A built-in model: the data and training of one classifier.

    ``generator``/``dim``/``train_preset``/``test_preset``: the data (``data.generators``);
    ``per_class``/``test_per_class``: training and held-out test images per class;
    ``input_size``: the network's input side in pixels/voxels (images are resized to it);
    ``epochs``/``lr``/``augmentations``: training (patience = epochs: the best validation epoch of
    the whole run is kept); ``labels``: class names served in ``/info``; ``arch_kwargs``: the
    conv5-fc3 network's options for the served model (``models.factory.build_classifier``; the
    studies that train from a built-in model choose their own).
    """

    generator: str
    dim: int
    train_preset: str
    test_preset: str
    per_class: int
    test_per_class: int
    input_size: int
    labels: tuple[str, ...]
    epochs: int
    lr: float
    augmentations: tuple[str, ...] = ()
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)


# name -> model, per `monai-sal serve --data` choice. Real: a PA chest radiograph classifier
# (opacity vs normal, 256^2 images seen at 128^2, Grad-CAM on 8^2) and a 3D CT classifier (lung
# lesion vs none, 64^3 crops at 1.5 mm seen whole: the first convolution at stride 2, two pools and
# 64 channels in the last two blocks, Grad-CAM on 8^3). Translations of up to ~10 % of the input side (croppad:12 at 128 px, croppad:6
# at 64 voxels). The models and what they reach are in docs/SERVER.md, "Start it".
DEFAULT_MODELS: dict[str, dict[str, DefaultModel]] = {
    "real": {
        "chest_xray_2d": DefaultModel(
            "chest-xray", 2, "train", "test", 300, 50, 128, ("normal", "opacity"), 40, 1e-3, ("croppad:12", "noise")
        ),
        "ct_lesion_3d": DefaultModel(
            "ct-lesions",
            3,
            "train",
            "test",
            200,
            50,
            64,
            ("no lesion", "lesion"),
            40,
            3e-4,
            ("flip", "croppad:6"),
            arch_kwargs={"first_stride": 2, "pools": 2, "channels": (8, 16, 32, 64, 64)},
        ),
    },
    "shepp-logan": {
        "classifier_2d": DefaultModel(
            "shepp-logan", 2, "homogeneous", "test", 150, 50, 64, ("control", "patient"), 10, 1e-3
        ),
        "classifier_3d": DefaultModel(
            "shepp-logan", 3, "homogeneous", "test", 60, 20, 32, ("control", "patient"), 10, 1e-3
        ),
    },
}


def builtin_model_for(generator: str) -> DefaultModel:
    """The built-in model of a generator with pathology masks: ``chest-xray`` or ``ct-lesions``."""
    models = {spec.generator: spec for spec in DEFAULT_MODELS["real"].values()}
    if generator not in models:
        raise ValueError(f"no built-in model for {generator!r}; choose one of {', '.join(sorted(models))}")
    return models[generator]


def generate_model_data(
    spec: DefaultModel,
    folder: str | os.PathLike,
    per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    *,
    size: int | None = None,
    train: bool = True,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> tuple[Path | None, Path]:
    """The built-in model's training and test data under ``folder/train`` and ``folder/test`` (each generated
    unless its manifest is there; the test set from seed + 1); returns their manifests. ``size``:
    the images' side in pixels/voxels (None: the generator's default); ``train=False``: the test set
    only (for a model trained elsewhere), returned as ``(None, test)``."""
    folder = Path(folder)
    train_manifest = (
        _generate_split(
            spec, folder, "train", spec.train_preset, per_class or spec.per_class, seed, progress, log, size
        )
        if train
        else None
    )
    test = _generate_split(
        spec, folder, "test", spec.test_preset, test_per_class or spec.test_per_class, seed + 1, progress, log, size
    )
    return train_manifest, test


def generate_explainer_data(
    spec: DefaultModel,
    folder: str | os.PathLike,
    per_class: int,
    seed: int = 0,
    *,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> Path:
    """More images like the built-in model's training data, under ``folder/explainer`` (from seed + 2, so none
    is a training or test image; generated unless its manifest is there), for training explainers:
    they need images, not labels, and overfit the built-in model's few hundred. Returns the manifest."""
    return _generate_split(spec, Path(folder), "explainer", spec.train_preset, per_class, seed + 2, progress, log)


def _generate_split(
    spec, folder: Path, split: str, preset: str, per_class: int, seed: int, progress, log, size: int | None = None
) -> Path:

    manifest = folder / split / "manifest.csv"
    if not manifest.is_file():
        log(f"generating {spec.dim}D {spec.generator} {split} data ({per_class} per class) in {folder / split}")
        get_generator(spec.generator).generate(
            folder / split, preset=preset, dim=spec.dim, size=size, per_class=per_class, seed=seed, progress=progress
        )
    return manifest


def scaled_augmentations(augmentations: tuple[str, ...], scale: float) -> tuple[str, ...]:
    """The augmentation specs with every ``croppad:<max_shift>`` shift (pixels/voxels) multiplied by
    ``scale`` and rounded (at least 1); the others as they are."""
    scaled = []
    for spec in augmentations:
        name, _, value = spec.partition(":")
        scaled.append(f"croppad:{max(1, round(int(value) * scale))}" if name == "croppad" and value else spec)
    return tuple(scaled)


def train_builtin_model(
    spec: DefaultModel,
    folder: str | os.PathLike,
    checkpoint: str | os.PathLike,
    *,
    arch: str = "conv5fc3",
    arch_kwargs: dict | None = None,
    head: dict | None = None,
    epochs: int | None = None,
    input_size: int | None = None,
    train_manifest: str | os.PathLike | None = None,
    attempts: int = TRAIN_ATTEMPTS,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], object] = print,
):
    """Train the built-in model's classifier on ``folder/train`` (scored on ``folder/test``) into ``checkpoint``,
    again with the next seed while its validation AUC stays below :data:`MIN_VAL_AUC` (at most
    ``attempts`` runs; 1: no second run). ``arch``, ``arch_kwargs``: the network, a name of
    ``models.factory.ARCHITECTURES`` and its options; ``head``: a WILDCAT head (see
    ``models.factory.build_classifier``); ``epochs``, ``input_size``: override the built-in model's (a
    ``croppad`` shift is scaled with the input side, so that it stays the same fraction of the
    image); ``train_manifest``: another manifest of the training images (with permuted labels, say)
    instead of ``folder/train/manifest.csv``. Returns (model, card)."""

    folder = Path(folder)
    n_epochs = epochs or spec.epochs
    side = input_size or spec.input_size
    augmentations = scaled_augmentations(spec.augmentations, side / spec.input_size)
    for attempt in range(attempts):
        log(f"training ({spec.dim}D, input {side} px, {n_epochs} epochs, seed {seed + attempt}) -> {checkpoint}")
        model, card = train_from_manifest(
            train_manifest or folder / "train" / "manifest.csv",
            checkpoint,
            arch=arch,
            arch_kwargs=arch_kwargs,
            head=head,
            augmentations=augmentations,
            epochs=n_epochs,
            lr=spec.lr,
            patience=n_epochs,
            labels=spec.labels,
            test_manifest=folder / "test" / "manifest.csv",
            input_size=side,
            seed=seed + attempt,
            device=device,
            progress=progress,
            log=log,
        )
        if card.metrics["val_auc"] >= MIN_VAL_AUC or attempt + 1 == attempts:
            break
        log(f"validation AUC {card.metrics['val_auc']:.3f} < {MIN_VAL_AUC}: the training did not take; again")
    return model, card
