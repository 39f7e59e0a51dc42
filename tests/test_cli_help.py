"""The CLI's help states the library's defaults and names: each expected value is read from the
constant or signature the library uses, so that a default changed in the code shows in the help."""

from __future__ import annotations

import argparse

from monai_sal_app.cli import build_parser
from monai_sal_app.data.generators import GENERATORS
from monai_sal_app.evaluation.fidelity import BASELINES
from monai_sal_app.evaluation.trust import DEFAULT_TRUST_METHODS
from monai_sal_app.experiments.builtin_models import DEFAULT_MODELS
from monai_sal_app.models.augment import AUGMENTATIONS
from monai_sal_app.models.factory import HEADS
from monai_sal_app.models.manifest_training import train_from_manifest
from monai_sal_app.models.wildcat import WILDCAT_DEFAULTS
from monai_sal_app.saliency.postprocess import POSTPROCESSING


def options(command: str) -> dict[str, argparse.Action]:
    """Option string -> its action, for one sub-command of ``monai-sal``."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: action for action in subparsers.choices[command]._actions for name in action.option_strings}


def help_of(command: str, option: str) -> str:
    action = options(command)[option]
    return action.help % {"default": action.default} if action.help else ""


def test_wildcat_option_help_states_the_library_defaults():
    assert f"default {WILDCAT_DEFAULTS['kmax']}" in help_of("train", "--kmax")
    assert f"default {WILDCAT_DEFAULTS['alpha']}" in help_of("train", "--alpha")
    assert f"default {WILDCAT_DEFAULTS['maps']}" in help_of("train", "--maps")
    assert set(options("train")["--head"].choices) == {"none", *HEADS}


def test_train_defaults_are_the_training_function_defaults():
    signature_defaults = train_from_manifest.__kwdefaults__
    for option, name in [("--epochs", "epochs"), ("--batch-size", "batch_size"), ("--lr", "lr"),
                         ("--patience", "patience"), ("--val-fraction", "val_fraction")]:  # fmt: skip
        assert options("train")[option].default == signature_defaults[name]
        assert f"default {signature_defaults[name]}" in help_of("train", option)
    assert ",".join(AUGMENTATIONS) in help_of("train", "--aug")


def test_trust_and_explain_help_name_the_library_choices():
    assert ",".join(DEFAULT_TRUST_METHODS) in help_of("trust", "--methods")
    assert tuple(options("trust")["--fidelity-replacement"].choices) == BASELINES
    assert ",".join(POSTPROCESSING) in help_of("explain", "--postprocess")


def test_data_help_states_each_generators_defaults():
    for name, spec in GENERATORS.items():
        assert f"{name}: {spec.default_dim}D" in help_of("data", "--dim")
        assert f"(default {spec.default_preset})" in help_of("data", "--preset")
        for dim, side in spec.default_size.items():
            assert f"{side} in {dim}D" in help_of("data", "--size")


def test_serve_help_states_each_default_models_numbers():
    for option, field in [("--epochs", "epochs"), ("--per-class", "per_class"), ("--test-per-class", "test_per_class")]:
        text = help_of("serve", option)
        for models in DEFAULT_MODELS.values():
            for name, spec in models.items():
                assert f"{name} {getattr(spec, field)}" in text, (option, name)
