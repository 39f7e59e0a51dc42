"""``monai-sal`` command line: data, train, train-explainer, explain, evaluate, trust, methods, serve,
experiment, demo, and ``compare-wildcat`` / ``compare-explainers``, aliases of ``experiment run``
for the ``trainable_vs_posthoc`` and ``explainers`` studies.

Every sub-command is a thin adapter over the library; a bad input ends with a one-line
``error: ...`` on stderr and exit code 2 instead of a traceback. ``explain``, ``evaluate``,
``trust`` and ``experiment run`` also run under ``torchrun`` (``python -m monai_sal_app.cli`` as
the module): the images (the methods, for ``trust``) are dealt to the ranks, each on its own
device, and rank 0 writes the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from monai_sal_app import distributed, serve
from monai_sal_app.arguments import keyword_defaults
from monai_sal_app.data.dicom_objects import is_dicom_image, write_maps_as_dicom
from monai_sal_app.data.generators import GENERATORS, get_generator
from monai_sal_app.evaluation.fidelity import BASELINES
from monai_sal_app.evaluation.trust import CHECKS, DEFAULT_TRUST_METHODS
from monai_sal_app.experiments.explainer_training import train_explainer_from_manifest
from monai_sal_app.experiments.runner import SCALES, config_folder, experiment_names, resolve_config, run_experiment
from monai_sal_app.experiments.trust_report import run_trust, summary_rows
from monai_sal_app.experiments.workflows import evaluate_maps, explain_items, failures
from monai_sal_app.explainers.kinds import EXPLAINER_KINDS
from monai_sal_app.metrics.stats import to_markdown
from monai_sal_app.models.augment import AUGMENTATIONS
from monai_sal_app.models.factory import HEADS, get_head
from monai_sal_app.models.inputs import read_items
from monai_sal_app.models.manifest_training import train_from_manifest
from monai_sal_app.models.sources import load_model_source
from monai_sal_app.saliency import available_methods, get_method
from monai_sal_app.saliency.core import check_request
from monai_sal_app.saliency.postprocess import POSTPROCESSING

MODEL_SOURCE_HELP = (
    "the classifier: a checkpoint .pt with its .json card, a MONAI bundle folder, a TorchScript file with its "
    ".json, or a .pt with a .json naming its factory (README, 'Your own model')"
)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _method_params(pairs: list[str], flag: str = "--param") -> dict:
    """``["steps=50", "baseline=zero"]`` -> {"steps": 50, "baseline": "zero"} (values parsed as JSON when they can be)."""
    params = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"{flag} takes key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def cmd_data(args) -> None:
    # options not given keep the generator's own defaults (preset, dim, size, per_class)
    given = {k: getattr(args, k) for k in ("preset", "dim", "size", "per_class") if getattr(args, k) is not None}
    manifest = get_generator(args.generator).generate(args.out, seed=args.seed, progress=not args.quiet, **given)
    print(f"wrote {manifest}")


def cmd_train(args) -> None:
    train_from_manifest(
        args.data,
        args.out,
        arch=args.arch,
        loss=args.loss,
        augmentations=_split(args.aug),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        val_fraction=args.val_fraction,
        labels=_split(args.labels) if args.labels else None,
        test_manifest=args.test,
        seed=args.seed,
        input_size=_input_size(args.input_size),
        head=_head(args),
        device=args.device,
        progress=not args.quiet,
    )


WILDCAT = get_head("wildcat")
WILDCAT_OPTIONS = tuple(WILDCAT.defaults)
_UNSET = object()  # a WILDCAT option not given on the command line (its default is the library's)


def _k(text: str) -> float | int | None:
    """``--kmax``/``--kmin``: "0.2" (a fraction of the positions), "3" (a count) or "none" (kmin only)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a whole count, got {text!r}") from None
    return int(value) if value.is_integer() and "." not in text else value


def _add_wildcat_options(p: argparse.ArgumentParser) -> None:
    default = WILDCAT.defaults
    p.add_argument(
        "--kmax",
        type=_k,
        default=_UNSET,
        help=f"WILDCAT top positions: fraction (e.g. 0.2) or count (default {default['kmax']})",
    )
    kmin = "as kmax" if default["kmin"] is None else default["kmin"]
    p.add_argument("--kmin", type=_k, default=_UNSET, help=f"WILDCAT bottom positions, 0 for none (default: {kmin})")
    p.add_argument(
        "--alpha", type=float, default=_UNSET, help=f"WILDCAT weight of the bottom term (default {default['alpha']})"
    )
    p.add_argument("--maps", type=int, default=_UNSET, help=f"WILDCAT maps per class, M (default {default['maps']})")


def _add_training_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    """--epochs, --batch-size, --lr, --patience, --val-fraction with the training function's ``defaults``."""
    p.add_argument("--epochs", type=int, default=defaults["epochs"], help="(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="(default %(default)s)")
    p.add_argument("--lr", type=float, default=defaults["lr"], help="Adam's learning rate (default %(default)s)")
    p.add_argument(
        "--patience",
        type=int,
        default=defaults["patience"],
        help="epochs without a better validation score before stopping (default %(default)s)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=defaults["val_fraction"],
        help="share of the manifest held out for validation (default %(default)s)",
    )


def _head(args) -> dict | None:
    """The WILDCAT head from ``--head wildcat`` and its options (the ones not given keep their defaults)."""
    given = {name: getattr(args, name) for name in WILDCAT_OPTIONS if getattr(args, name) is not _UNSET}
    if args.head == "none":
        if given:
            raise ValueError(f"--{', --'.join(given)} need(s) --head wildcat")
        return None
    return {"name": args.head, **given}


def _input_size(text: str | None) -> int | tuple[int, ...] | None:
    """``--input-size``: "128" (every axis) or "96,96,64" (one per axis)."""
    if not text:
        return None
    try:
        sides = tuple(int(v) for v in _split(text))
    except ValueError:
        raise ValueError(f"--input-size takes one int or a comma list of ints, got {text!r}") from None
    return sides[0] if len(sides) == 1 else sides


def cmd_explain(args) -> None:
    methods = _split(args.method)
    for m in methods:
        get_method(m)  # unknown names fail before any work
    params = _method_params(args.param)
    distributed.setup()
    model = load_model_source(args.model, device=args.device or distributed.device())
    for m in methods:
        spec = get_method(m)
        if not spec.applies_to(model.network):
            raise ValueError(f"method {m!r} cannot explain {args.model}: {spec.needs(model.network)}")
        if args.max_cost is not None:  # the server's bounds and budget, only when asked
            check_request(m, params, tuple(model.card.input_size), args.max_cost, budget_name="--max-cost")
    source = args.images[0] if len(args.images) == 1 and args.images[0].endswith(".csv") else args.images
    items = read_items(source)
    if args.dicom_out:
        not_dicom = [item["id"] for item in items if not is_dicom_image(item["image"])]
        if not_dicom:
            raise ValueError(
                f"--dicom-out writes DICOM objects for DICOM images only; not DICOM: {', '.join(not_dicom)}"
            )
    maps_csv = explain_items(
        model,
        items,
        args.out,
        methods=methods,
        params=dict.fromkeys(methods, params),
        target=args.target,
        postprocess_steps=_split(args.postprocess),
        batch_size=args.batch_size,
        overlays=args.overlays,
        workers=args.workers,
        progress=not args.quiet,
        log=print,
    )
    if distributed.is_main():
        print(f"wrote {maps_csv}")
        if args.dicom_out:
            written = write_maps_as_dicom(
                maps_csv, args.dicom_out, model.card.labels, Path(args.model).stem, overlay=args.dicom_overlays
            )
            print(f"wrote {len(written)} DICOM objects under {args.dicom_out}")
        _report_failures(maps_csv, len(items), "images could not be explained")


def cmd_evaluate(args) -> None:
    distributed.setup()
    maps = Path(args.maps)
    rows, summary = evaluate_maps(maps / "maps.csv" if maps.is_dir() else maps, args.out, workers=args.workers)
    if distributed.is_main():
        print(to_markdown(summary))
        _report_failures(Path(args.out) / "per_image.csv", len(rows), "maps could not be scored")


def _report_failures(table: Path, total: int, what: str) -> None:
    """``ValueError`` (one ``error:`` line, exit code 2) when rows of ``table`` have an ``error``:
    how many, the table that lists them, the first one's reason."""
    failed = failures(table)
    if failed:
        count = len({row["id"] for row in failed})
        raise ValueError(f"{count} of {total} {what} (see the error column of {table}); first: {failed[0]['error']}")


def cmd_trust(args) -> None:
    if bool(args.data) == bool(args.images):
        raise ValueError("give the images either as DATA (a manifest, files or a folder) or as --images DIR")
    data = args.data or [args.images]
    distributed.setup()
    source = data[0] if len(data) == 1 and (data[0].endswith(".csv") or Path(data[0]).is_dir()) else data
    card = run_trust(
        args.model,
        source,
        args.out,
        methods=_split(args.methods) or None,
        checks=_split(args.checks),
        compare_with=_split(args.compare_with),
        max_images=args.max_images,
        seed=args.seed,
        device=args.device or distributed.device(),
        progress=not args.quiet,
        train_data=args.train_manifest,
        fidelity_replacement=args.fidelity_replacement,
        workers=args.workers,
    )
    if distributed.is_main():
        print(to_markdown(summary_rows(card)))
        kept = len(card.get("kept_methods", []))
        print(
            f"{len(card['methods'])} method(s): {len(card['methods']) - kept} computed now, {kept} kept from an earlier run"
        )
        print(
            f"wrote {Path(args.model).with_name(Path(args.model).stem + '.trust.json')} and {Path(args.out) / 'trust.md'}"
        )
        unreadable = card["data"].get("unreadable", [])
        if unreadable:
            total = card["data"]["first_images"]
            raise ValueError(
                f"{len(unreadable)} of {total} images could not be read and were left out (see data.unreadable in "
                f"the card); first: {unreadable[0]['id']}: {unreadable[0]['error']}"
            )


def cmd_train_explainer(args) -> None:
    train_explainer_from_manifest(
        args.kind.replace("-", "_"),
        args.classifier,
        args.data,
        args.out,
        settings=_method_params(args.set),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )


def cmd_methods(args) -> None:
    print(json.dumps(available_methods(), indent=2, default=str))


def cmd_experiment_list(args) -> None:
    for name in experiment_names():
        config = resolve_config(name, "smoke")
        print(f"{name:22s} {config['title']}")
    print(f"(recipe files: {config_folder()})")


def cmd_experiment_run(args) -> None:
    run_experiment(
        args.recipe,
        args.out,
        scale=args.scale,
        data=getattr(args, "data", None),
        models=getattr(args, "model", None) or (),
        seed=args.seed,
        overrides=_method_params(args.set, "--set"),
        progress=not args.quiet,
    )


def cmd_demo(args) -> None:
    run_experiment(
        "demo", args.out, scale="smoke" if args.quick else "default", seed=args.seed, progress=not args.quiet
    )


# Older names of two studies' commands, kept as aliases of `experiment run <study>`
STUDY_ALIASES = {"compare-wildcat": "trainable_vs_posthoc", "compare-explainers": "explainers"}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of ``experiment run`` and its aliases: scale, output folder, seed, settings."""
    p.add_argument("--scale", choices=SCALES, default="default")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=None, help="default: the recipe's")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the recipe over its scale's, the value as JSON when it parses "
        "(e.g. --set dataset=ct-lesions --set 'wildcat={\"kmax\": 0.02}'); repeatable",
    )


def _add_workers_option(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=default,
        help="processes that read the files ahead while the images are computed; 0 reads them in turn "
        "(default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-sal", description="Saliency maps for medical image classifiers.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="generate a dataset with known ground truth")
    p.add_argument("generator", choices=sorted(GENERATORS))
    p.add_argument(
        "--preset",
        default=None,
        help="; ".join(f"{g}: {', '.join(s.presets)} (default {s.default_preset})" for g, s in GENERATORS.items()),
    )
    p.add_argument(
        "--dim",
        type=int,
        default=None,
        choices=[2, 3],
        help="; ".join(f"{g}: {s.default_dim}D" for g, s in GENERATORS.items()) + " when not given",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="pixels per side (default: "
        + "; ".join(
            f"{g}: " + ", ".join(f"{side} in {dim}D" for dim, side in sorted(s.default_size.items()))
            for g, s in GENERATORS.items()
        )
        + ")",
    )
    p.add_argument("--per-class", type=int, default=None, help="override the preset's images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_data)

    train = keyword_defaults(train_from_manifest)
    p = sub.add_parser("train", help="train a classifier on a manifest; writes a state_dict and a model card")
    p.add_argument("--data", required=True, help="manifest.csv")
    p.add_argument("--test", default=None, help="optional test manifest.csv scored at the end")
    p.add_argument("--out", required=True, help="checkpoint path, e.g. model.pt (card written as model.json)")
    p.add_argument("--arch", default=train["arch"], help="network (default %(default)s)")
    p.add_argument("--loss", default=train["loss"], help="training loss (default %(default)s)")
    p.add_argument(
        "--aug",
        default=",".join(train["augmentations"]),
        help=f"comma list of {','.join(AUGMENTATIONS)}; name:value sets its parameter, e.g. croppad:3",
    )
    _add_training_options(p, train)
    p.add_argument("--labels", default=None, help="comma list of class names, e.g. control,patient")
    p.add_argument(
        "--input-size",
        default=None,
        help="network input grid: 128 (every axis) or 96,96,64 (default: the first image's shape)",
    )
    p.add_argument(
        "--head",
        choices=("none", *HEADS),
        default="none",
        help="none: the network's own classifier; wildcat: a WILDCAT head on its last feature block, "
        "whose class maps are the saliency maps of method wildcat",
    )
    _add_wildcat_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("explain", help="saliency maps (NIfTI on the input grid) and overlay PNGs")
    p.add_argument(
        "--model",
        required=True,
        help=MODEL_SOURCE_HELP,
    )
    p.add_argument(
        "images", nargs="+", help="a manifest.csv, image files (NIfTI, NRRD, PNG, DICOM) or a folder of them"
    )
    p.add_argument(
        "--method",
        default=",".join(keyword_defaults(explain_items)["methods"]),
        help="method name or comma list (see `monai-sal methods`; default %(default)s)",
    )
    p.add_argument("--param", action="append", default=[], help="method parameter key=value (repeatable)")
    p.add_argument("--target", type=int, default=None, help="class to explain (default: predicted)")
    explain = keyword_defaults(explain_items)
    p.add_argument(
        "--postprocess",
        default=",".join(explain["postprocess_steps"]),
        help=f"comma list of steps applied before writing: {','.join(POSTPROCESSING)}",
    )
    p.add_argument("--batch-size", type=int, default=explain["batch_size"], help="(default %(default)s)")
    p.add_argument(
        "--overlays", type=int, default=explain["overlays"], help="overlay PNGs per method (default %(default)s)"
    )
    p.add_argument(
        "--max-cost",
        type=float,
        default=None,
        help="refuse, before any work, parameters over their bounds or a cost per image (network passes x "
        "input voxels) above this, as the server does (default: no limit)",
    )
    _add_workers_option(p, explain["workers"])
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="output folder; a rerun into it computes only what is missing")
    p.add_argument(
        "--dicom-out",
        default=None,
        help="also write each map of a DICOM image (a file, or a folder holding one series) as a DICOM "
        "Parametric Map in the image's study, into DIR/<id>/<method>/",
    )
    p.add_argument(
        "--dicom-overlays",
        action="store_true",
        help="with --dicom-out, also an RGB Secondary Capture overlay per slice",
    )
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("evaluate", help="localization metrics of maps against masks, with mean and 95%% CI")
    p.add_argument("maps", help="maps.csv written by `explain`, or its folder")
    _add_workers_option(p, keyword_defaults(evaluate_maps)["workers"])
    p.add_argument("--out", required=True, help="output folder; a rerun into it computes only what is missing")
    p.set_defaults(func=cmd_evaluate)

    trust = keyword_defaults(run_trust)
    p = sub.add_parser(
        "trust", help="trust checks of a model's saliency methods; writes <model>.trust.json beside it and a report"
    )
    p.add_argument("--model", required=True, help=MODEL_SOURCE_HELP)
    p.add_argument("data", nargs="*", help="a manifest.csv (labels and masks used), image files or a folder of them")
    p.add_argument("--images", metavar="DIR", default=None, help="a folder of your images, instead of DATA")
    p.add_argument(
        "--methods",
        default="",
        help=f"comma list (default: {','.join(DEFAULT_TRUST_METHODS)})",
    )
    p.add_argument(
        "--checks",
        default=",".join(trust["checks"]),
        help=f"comma list of {','.join(CHECKS)} (default %(default)s)",
    )
    p.add_argument(
        "--compare-with",
        default="",
        help="comma list of other checkpoints (same labels and input size) for repeatability",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=trust["max_images"],
        help="the first N images of the data (default %(default)s)",
    )
    p.add_argument(
        "--train-manifest",
        default=None,
        help="the model's training manifest: localization is judged against its mean mask (else against chance)",
    )
    p.add_argument(
        "--fidelity-replacement",
        default=trust["fidelity_replacement"],
        choices=BASELINES,
        help="what replaces the pixels the fidelity check removes (road: noisy linear imputation; default %(default)s)",
    )
    _add_workers_option(p, trust["workers"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="report folder (trust.md, trust.json, figures/)")
    p.set_defaults(func=cmd_trust)

    p = sub.add_parser(
        "train-explainer",
        help="train an explainer network for a classifier checkpoint; writes a state_dict, its card and loss curves",
    )
    p.add_argument("kind", choices=[kind.replace("_", "-") for kind in EXPLAINER_KINDS], help="which explainer")
    p.add_argument("--classifier", required=True, help="the classifier checkpoint .pt (with its .json card)")
    p.add_argument("--data", required=True, help="manifest.csv of the training images")
    p.add_argument("--out", required=True, help="explainer checkpoint, e.g. model.mask_generator.pt")
    _add_training_options(p, keyword_defaults(train_explainer_from_manifest))
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an explainer setting, e.g. area_weight=8"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_train_explainer)

    p = sub.add_parser("methods", help="list the saliency methods and their default parameters")
    p.set_defaults(func=cmd_methods)

    serve.add_parser(sub)

    p = sub.add_parser("experiment", help="the published studies as recipes: list them, run one into a report")
    experiment = p.add_subparsers(dest="action", required=True)
    q = experiment.add_parser("list", help="the studies' recipe files, with their scales")
    q.set_defaults(func=cmd_experiment_list)
    q = experiment.add_parser("run", help="run a recipe into DIR (results/, figures/, report.html); resumes")
    q.add_argument(
        "recipe", metavar="NAME|CONFIG", help="a study recipe's name (monai-sal experiment list) or a recipe YAML file"
    )
    _add_run_options(q)
    q.add_argument(
        "--data", default=None, metavar="MANIFEST", help="your data instead of the built-in (if the recipe allows)"
    )
    q.add_argument("--model", action="append", metavar="M.pt", help="your checkpoint(s) (if the recipe allows); repeat")
    q.set_defaults(func=cmd_experiment_run)
    for alias, recipe in STUDY_ALIASES.items():
        p = sub.add_parser(alias, help=f"the same as `experiment run {recipe}` (its settings: --set KEY=VALUE)")
        _add_run_options(p)
        p.set_defaults(func=cmd_experiment_run, recipe=recipe)

    p = sub.add_parser(
        "demo", help="a tour on built-in data: classifier, every fast method, localization, trust checks, subtypes"
    )
    p.add_argument("--out", default="demo_report")
    p.add_argument("--quick", action="store_true", help="the smoke scale: seconds, numbers that mean nothing")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; a bad input ends with one ``error: ...`` line on stderr and exit code 2.

    Bad input reaches here as ValueError (bad values, invalid model cards, corrupt images),
    TypeError (parameters of the wrong type), OSError (missing, unreadable or unwritable files)
    or RuntimeError (a network that cannot take the image): the message says what is wrong.
    """
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
