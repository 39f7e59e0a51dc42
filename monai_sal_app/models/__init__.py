"""Classifiers for monai-sal: network factory (2D/3D), losses, augmentations, training, checkpoints."""

from monai_sal_app.models.augment import (
    AUGMENTATIONS,
    CropPad,
    Erasing,
    Flip,
    Noise,
    Smoothing,
    build_augmentation,
    parse_augmentation,
)
from monai_sal_app.models.card import CardError, ModelCard, predict_classes
from monai_sal_app.models.checkpoint import CheckpointError, load_classifier, read_card, save_classifier
from monai_sal_app.models.conv5fc3 import Conv5FC3
from monai_sal_app.models.device import default_device
from monai_sal_app.models.factory import ARCHITECTURES, build_classifier
from monai_sal_app.models.losses import LOSSES, get_loss
from monai_sal_app.models.train import (
    choose_decision_threshold,
    evaluate_classifier,
    predict_probabilities,
    train_classifier,
)

__all__ = [
    "ARCHITECTURES",
    "AUGMENTATIONS",
    "LOSSES",
    "CardError",
    "CheckpointError",
    "Conv5FC3",
    "CropPad",
    "Erasing",
    "Flip",
    "ModelCard",
    "Noise",
    "Smoothing",
    "build_augmentation",
    "build_classifier",
    "choose_decision_threshold",
    "default_device",
    "evaluate_classifier",
    "get_loss",
    "load_classifier",
    "parse_augmentation",
    "predict_classes",
    "predict_probabilities",
    "read_card",
    "save_classifier",
    "train_classifier",
]
