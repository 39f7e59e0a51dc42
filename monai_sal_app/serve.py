"""``monai-sal serve``: prepare the built-in data and default models, then start the MONAI Label server.

Everything goes into one work folder (``--workdir``, default ``./monai-sal-serve``), never into the
installed package. The work folder is the MONAI Label app folder::

    <workdir>/main.py        two lines importing the app class from the installed package
    <workdir>/model/         checkpoints served (<name>.pt + <name>.json); --model-dir moves it
    <workdir>/studies/       the datastore (held-out test images, their masks as labels)
    <workdir>/data/          the generated training and test data
    <workdir>/logs/, lib/, bin/  MONAI Label's own folders (its log is logs/app.log)

1. Data (``--data real``, the default): chest X-rays with opacities (``data.chest_xray``, 2D) and
   lung CT crops with real and inserted lesions (``data.ct_lesions``, 3D), generated from the
   bases ``scripts/install_data.sh`` installs; ``--data shepp-logan`` uses the Shepp-Logan subtype
   phantoms instead (no bases needed); ``--data none`` prepares nothing and serves the checkpoints
   already in the model folder on the given ``--studies``. Eight held-out test images per model go
   to the datastore as ``<model>-000`` ... ``<model>-007``, with their lesion masks as labels.
2. Models: one conv5-fc3 per data set (:data:`DEFAULT_MODELS`, the recipes of
   ``experiments.builtin_models``) is trained into the model folder unless it is already there.
3. Server: MONAI Label's own ``start_server`` (the same as ``monailabel start_server --app
   <workdir> --studies <workdir>/studies``), in the foreground. It needs the ``server`` extra
   (``pip install "monai-sal[server]"``); without it the command stops before any work.

:func:`start_background_server` runs the same app under uvicorn in a subprocess (tests, benchmarks).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from monai_sal_app.access import HOW_TO_SET, OPERATOR, READER, TOKEN_ENVIRONMENT, AccessTokens, check_listen_address
from monai_sal_app.allocator import batch_allocator_for_children, without_batch_allocator
from monai_sal_app.data.bases import BaseNotInstalled, chest_radiograph_file, lung_ct_files
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.evaluation.trust import DEFAULT_TRUST_METHODS, read_trust_card, trust_card_path
from monai_sal_app.experiments.builtin_models import (
    DEFAULT_MODELS,
    DefaultModel,
    generate_model_data,
    train_builtin_model,
)
from monai_sal_app.experiments.trust_report import merge_trust_cards, trust_card_part, write_trust_outputs
from monai_sal_app.processes import end_with_parent

__all__ = [
    "APP_MAIN_PY",
    "DEFAULT_MODELS",
    "SERVER_EXTRA",
    "BackgroundServer",
    "DefaultModel",
    "ServerExtraMissing",
    "add_parser",
    "app_conf",
    "free_port",
    "prepare",
    "require_server_extra",
    "run",
    "start_background_server",
    "start_server",
    "write_app_folder",
]

SERVER_EXTRA = 'pip install "monai-sal[server]"'
# The app folder's main.py: MONAI Label loads it as a module and serves the class in it whose
# direct base is MONAILabelApp, which the import brings in.
APP_MAIN_PY = (
    '"""MONAI Label app folder of monai-sal, written by `monai-sal serve`: the app is in the package."""\n\n'
    "from monai_sal_app.main import MonaiSalApp  # noqa: F401\n"
)
STUDY_IMAGES_PER_CLASS = 4  # held-out test images per class copied into the datastore
TRUST_IMAGES = 32  # held-out test images each default model's trust card is computed on


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``serve`` sub-command on an argparse ``subparsers`` object."""
    p = subparsers.add_parser("serve", help="prepare built-in data and models, then start the MONAI Label server")
    p.add_argument(
        "--data",
        choices=[*sorted(DEFAULT_MODELS), "none"],
        default="real",
        help="real: chest X-ray (2D) + lung CT (3D) models on the installed bases (default); "
        "shepp-logan: phantom models, no bases needed; none: serve the checkpoints already in the model folder",
    )
    p.add_argument(
        "--workdir",
        default="monai-sal-serve",
        help="work folder: the app folder, the generated data, the datastore and the checkpoints (default %(default)s)",
    )
    p.add_argument(
        "--studies",
        default=None,
        help="datastore folder (default <workdir>/studies, filled with held-out test images), or the URL of a "
        "DICOMweb store such as http://127.0.0.1:8042/dicom-web (docs/SERVER.md, 'With your PACS')",
    )
    p.add_argument("--model-dir", default=None, help="checkpoint folder (default <workdir>/model)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default %(default)s: this machine only); any other address, e.g. 0.0.0.0 for "
        f"every interface, needs the access tokens: {HOW_TO_SET}",
    )
    p.add_argument(
        "--tokens-file",
        default=None,
        help="file with the lines reader=<token> and operator=<token>, readable by its owner only "
        f"(instead of {TOKEN_ENVIRONMENT[READER]} and {TOKEN_ENVIRONMENT[OPERATOR]})",
    )
    p.add_argument("--port", type=int, default=8000, help="(default %(default)s)")
    p.add_argument(
        "--conf",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="an app setting, as MONAI Label's start_server takes it, e.g. --conf request_timeout_s 120 "
        "(the settings: docs/SERVER.md)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help=f"epochs for the default models (default: {_per_model('epochs')})"
    )
    p.add_argument(
        "--per-class", type=int, default=None, help=f"training images per class (default: {_per_model('per_class')})"
    )
    p.add_argument(
        "--test-per-class",
        type=int,
        default=None,
        help=f"held-out test images per class (default: {_per_model('test_per_class')})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: CUDA when available)")
    p.add_argument("--retrain", action="store_true", help="train the default models even if their checkpoints exist")
    p.add_argument("--prepare-only", action="store_true", help="prepare data and models, do not start the server")
    p.set_defaults(func=run)
    return p


def _per_model(field: str) -> str:
    """Each default model's ``field``, for the help: "real: chest_xray_2d 40, ct_lesion_3d 30; ..."."""
    return "; ".join(
        f"{data}: " + ", ".join(f"{name} {getattr(spec, field)}" for name, spec in models.items())
        for data, models in DEFAULT_MODELS.items()
    )


def prepare(
    workdir: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    data: str = "real",
    studies: str | os.PathLike | None = None,
    epochs: int | None = None,
    per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    device: str | None = None,
    retrain: bool = False,
    progress: bool = True,
    jobs: int | None = None,
) -> Path:
    """Generate the data and train the default models of ``data`` that are missing; returns the
    studies folder.

    Per model: training data (``per_class`` per class), a held-out test set (``test_per_class``
    per class, scored into the model card; both default to the model's :class:`DefaultModel`), the
    trust card on the first :data:`TRUST_IMAGES` test images (``<name>.trust.json``, report in
    ``<workdir>/trust/<name>``; again after ``retrain``), :data:`STUDY_IMAGES_PER_CLASS` of its images per
    class copied into the datastore, and the checkpoint (``experiments.builtin_models.train_builtin_model``: trained
    again with the next seed while its validation AUC stays too low).
    ``jobs`` models are prepared at once in separate processes sharing the CPU cores (default:
    as many as there are models to prepare and cores), and each trust card is computed in ``jobs``
    parts (its methods dealt out) that whichever process is free takes up, then merged
    (``experiments.trust_report.merge_trust_cards``). The processes run with the batch memory
    allocator (``allocator``; the server that follows does not); progress goes to stdout, one line
    per step.
    A missing base (``--data real`` without ``scripts/install_data.sh``) raises
    ``BaseNotInstalled`` naming the install command, before anything is written.
    """
    if data not in DEFAULT_MODELS:
        raise ValueError(f"unknown data {data!r}; choose one of {', '.join(sorted(DEFAULT_MODELS))}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    for option, value in (("per_class", per_class), ("test_per_class", test_per_class)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if data == "real":
        _check_real_bases()
    workdir, model_dir = Path(workdir).resolve(), Path(model_dir).resolve()
    studies = Path(studies).resolve() if studies else workdir / "studies"
    model_dir.mkdir(parents=True, exist_ok=True)
    tasks = [
        (name, spec, workdir, model_dir, studies, epochs, per_class, test_per_class, seed, device, retrain)
        for name, spec in DEFAULT_MODELS[data].items()
    ]
    cores = os.cpu_count() or 1
    jobs = max(1, min(len(tasks), cores)) if jobs is None else jobs
    if jobs == 1:
        for task in tasks:
            card = _prepare_model(*task, progress=progress)
            if card is not None:
                _write_trust_card(card, [_trust_card_part(card, DEFAULT_TRUST_METHODS)])
        return studies

    # spawn, not fork: the parent may already run torch's thread pools
    context = multiprocessing.get_context("spawn")
    with (
        batch_allocator_for_children(),
        ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_prepare_worker, initargs=(cores // jobs, os.getpid())
        ) as pool,
    ):
        # Each trained model's trust card is dealt out as ``jobs`` parts (methods), queued as soon
        # as the model is trained: a process done with its own model computes part of the other's
        # card instead of waiting for it; the parts are merged and written once all are in.
        trained = [pool.submit(_prepare_model, *task, progress=False) for task in tasks]
        parts = []
        for future in as_completed(trained):
            card = future.result()
            if card is not None:
                groups = [DEFAULT_TRUST_METHODS[k::jobs] for k in range(jobs)]
                parts.append((card, [pool.submit(_trust_card_part, card, group) for group in groups if group]))
        written = [pool.submit(_write_trust_card, card, [f.result() for f in futures]) for card, futures in parts]
        for future in written:
            future.result()
    return studies


def _prepare_worker(threads: int, parent_pid: int) -> None:
    """Worker initializer: this process's share of the cores for torch, and an end with the
    process that prepares (killed, it takes its workers with it)."""
    if not end_with_parent(parent_pid):
        sys.exit(1)
    torch.set_num_threads(max(1, threads))


@dataclass(frozen=True)
class _TrustCardWork:
    """What a default model's trust card is computed from and written to."""

    name: str
    checkpoint: Path
    test_manifest: Path
    train_manifest: Path
    report: Path
    seed: int
    device: str | None


def _prepare_model(
    name: str,
    spec: DefaultModel,
    workdir: Path,
    model_dir: Path,
    studies: Path,
    epochs: int | None,
    per_class: int | None,
    test_per_class: int | None,
    seed: int,
    device: str | None,
    retrain: bool,
    progress: bool,
) -> _TrustCardWork | None:
    """Data, datastore studies and checkpoint of one default model (see :func:`prepare`); returns
    the trust card still to compute, or None when the one on disk is current."""

    def log(message: str) -> None:
        print(f"{name}: {message}", flush=True)

    folder = workdir / "data" / f"{spec.generator}_{spec.dim}d"
    train_manifest, test_manifest = generate_model_data(
        spec, folder, per_class, test_per_class, seed, progress=progress, log=log
    )
    _copy_studies(name, read_manifest(test_manifest), studies)

    checkpoint = model_dir / f"{name}.pt"
    if not retrain and checkpoint.is_file() and checkpoint.with_suffix(".json").is_file():
        log(f"using {checkpoint}")
    else:
        train_builtin_model(
            spec,
            folder,
            checkpoint,
            arch_kwargs=dict(spec.arch_kwargs),
            epochs=epochs,
            seed=seed,
            device=device,
            progress=progress,
            log=log,
        )
    try:
        current = read_trust_card(checkpoint) is not None
    except ValueError as error:  # corrupt, or of another schema version: recomputed, never read
        log(f"recomputing the trust card: {error}")
        current = False
    if current and not retrain:
        return None
    log(f"trust card on {TRUST_IMAGES} held-out test images -> {trust_card_path(checkpoint)}")
    return _TrustCardWork(name, checkpoint, test_manifest, train_manifest, workdir / "trust" / name, seed, device)


def _trust_card_part(card: _TrustCardWork, methods: Sequence[str]) -> dict:
    """The part of ``card`` that explains ``methods``."""
    return trust_card_part(
        card.checkpoint, card.test_manifest, methods, max_images=TRUST_IMAGES, seed=card.seed, device=card.device,
        train_data=card.train_manifest,
    )  # fmt: skip


def _write_trust_card(card: _TrustCardWork, parts: Sequence[dict]) -> None:
    """``card``'s parts merged (methods in :data:`DEFAULT_TRUST_METHODS` order), written beside the
    checkpoint, and its report."""
    merged = merge_trust_cards(parts, order=DEFAULT_TRUST_METHODS)
    write_trust_outputs(merged, card.checkpoint, card.test_manifest, card.report, device=card.device)


def _copy_studies(name: str, items: list[dict], studies: Path) -> None:
    """The first :data:`STUDY_IMAGES_PER_CLASS` test images of each class into the datastore as
    ``<name>-000`` ... (in manifest order), with their masks as ``final`` labels."""
    chosen = []
    for label in sorted({item["label"] for item in items}):
        chosen += [i for i, item in enumerate(items) if item["label"] == label][:STUDY_IMAGES_PER_CLASS]
    for k, index in enumerate(sorted(chosen)):
        item = items[index]
        study = f"{name}-{k:03d}.nii.gz"  # the model it is meant for, readable in curl commands
        if (studies / study).exists():
            continue
        studies.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item["image"], studies / study)
        if item.get("mask"):
            label = studies / "labels" / "final" / study
            label.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item["mask"], label)


def _check_real_bases() -> None:
    """Raise ``BaseNotInstalled`` (with the install command) if the chest or CT base is missing."""
    try:
        chest_radiograph_file()
        lung_ct_files()
    except BaseNotInstalled as err:
        raise BaseNotInstalled(f"{err}; or serve the phantom models: monai-sal serve --data shepp-logan") from None


def require_server_extra() -> None:
    """Raise :class:`ServerExtraMissing` (naming the install command) if MONAI Label is not installed."""
    try:
        import monailabel  # noqa: F401  (the optional server extra: imported here to see whether it is installed)
    except ImportError:
        raise ServerExtraMissing(f"serving needs MONAI Label, which is not installed: {SERVER_EXTRA}") from None


class ServerExtraMissing(RuntimeError):
    """MONAI Label (the ``server`` extra) is not installed."""


def write_app_folder(folder: str | os.PathLike) -> Path:
    """Make ``folder`` a MONAI Label app folder serving monai-sal (its ``main.py``); returns it resolved."""
    folder = Path(folder).resolve()
    main_py = folder / "main.py"
    if not main_py.is_file() or main_py.read_text() != APP_MAIN_PY:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = main_py.with_name(".main.py.tmp")
        temporary.write_text(APP_MAIN_PY)
        temporary.replace(main_py)
    return folder


def app_conf(
    app_dir: Path, model_dir: Path, device: str | None, tokens_file: str | os.PathLike | None = None
) -> dict[str, str]:
    """The ``--conf`` settings of the app: ``model_dir`` when it is not ``<app>/model``, ``device``,
    ``tokens_file``."""
    conf = {}
    if model_dir.resolve() != (app_dir / "model").resolve():
        conf["model_dir"] = str(model_dir.resolve())
    if device:
        conf["device"] = device
    if tokens_file:
        conf["tokens_file"] = str(Path(tokens_file).resolve())
    return conf


def is_store_url(studies: str | os.PathLike | None) -> bool:
    """True when ``studies`` is the URL of a DICOMweb store (``http://`` or ``https://``), not a folder."""
    return isinstance(studies, str) and studies.startswith(("http://", "https://"))


def start_server(
    app_dir: str | os.PathLike, studies: str | os.PathLike, host: str, port: int, conf: dict[str, str]
) -> None:
    """Run MONAI Label's ``start_server`` (blocks until the server stops)."""
    from monailabel.main import Main  # the optional server extra: require_server_extra has checked it

    main = Main()
    parser = argparse.ArgumentParser()
    main.args_start_server(parser)
    argv = ["--app", str(app_dir), "--studies", str(studies), "--host", host, "--port", str(port)]
    for key, value in conf.items():
        argv += ["--conf", key, value]
    main.action_start_server(parser.parse_args(argv))


def run(args) -> None:
    """The ``serve`` sub-command."""
    require_server_extra()
    settings = dict(args.conf)
    if args.tokens_file:
        settings["tokens_file"] = args.tokens_file
    check_listen_address(args.host, AccessTokens.from_settings(settings))  # before any work
    app_dir = Path(args.workdir).resolve()
    model_dir = Path(args.model_dir).resolve() if args.model_dir else app_dir / "model"
    remote = is_store_url(args.studies)
    if args.data == "none":
        studies = args.studies if remote else Path(args.studies or app_dir / "studies").resolve()
        if not remote and not studies.is_dir():
            raise FileNotFoundError(f"studies folder not found: {studies}")
    else:
        studies = prepare(
            app_dir,
            model_dir,
            data=args.data,
            studies=None if remote else args.studies,
            epochs=args.epochs,
            per_class=args.per_class,
            test_per_class=args.test_per_class,
            seed=args.seed,
            device=args.device,
            retrain=args.retrain,
            progress=not getattr(args, "quiet", False),
        )
        studies = args.studies if remote else studies  # the models are ready; the store holds the images
    write_app_folder(app_dir)
    conf = {**settings, **app_conf(app_dir, model_dir, args.device, settings.get("tokens_file"))}
    if args.prepare_only:
        print(
            f"ready: monailabel start_server --app {app_dir} --studies {studies} --host {args.host} --port {args.port}"
            + "".join(f" --conf {k} {v}" for k, v in conf.items())
        )
        return
    start_server(app_dir, studies, args.host, args.port, conf)


# ------------------------------------------------------------------------------------------------
# background server (tests, benchmarks)
# ------------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """A MONAI Label server running this app in a subprocess; ``url``, ``pid``, :meth:`stop`."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path) -> None:
        self.process, self.url, self.log_path = process, url, log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT (uvicorn's graceful shutdown), then kill after ``timeout`` seconds; also ends its children."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _answers_info(server: BackgroundServer) -> bool:
    """Whether ``/info/`` answers 200, or 401/403 (a server that wants a token)."""
    try:
        with urllib.request.urlopen(f"{server.url}/info/", timeout=5) as response:
            return response.status == 200
    except urllib.error.HTTPError as error:
        return error.code in (401, 403)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def start_background_server(
    studies: str | os.PathLike,
    *,
    conf: dict[str, str] | None = None,
    workdir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = 120.0,
    extra_env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
    answers: Callable[[BackgroundServer], bool] | None = None,
) -> BackgroundServer:
    """Start ``uvicorn monailabel.app:app`` serving this app and wait until ``/info/`` answers
    (200, or 401/403 from a server that wants a token).

    ``studies``: a folder or a DICOMweb store's URL. ``workdir`` becomes the app folder
    (:func:`write_app_folder`). Settings go through the
    environment as ``monailabel start_server`` passes them (so MONAI Label's train subprocesses see
    them too); sessions are kept in ``<workdir>/sessions`` and the server's output goes to
    ``<workdir>/server.log``. Raises RuntimeError (with the log) if it does not start.
    """
    require_server_extra()
    workdir = write_app_folder(workdir)
    port = port or free_port(host)
    env = {
        **without_batch_allocator(os.environ),
        "MONAI_LABEL_APP_DIR": str(workdir),
        "MONAI_LABEL_STUDIES": str(studies) if is_store_url(studies) else str(Path(studies).resolve()),
        "MONAI_LABEL_APP_CONF": json.dumps(conf or {}),
        "MONAI_LABEL_SERVER_PORT": str(port),
        "MONAI_LABEL_SESSION_PATH": str((workdir / "sessions").resolve()),
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
        # start_server exports PYTHONPATH (+ the app dir); MONAI Label's train runner fails without it.
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(workdir)) if p),
        **(extra_env or {}),
    }
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                *wrapper,
                sys.executable,
                "-m",
                "uvicorn",
                "monailabel.app:app",
                "--host",
                host,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(workdir),
        )
    server = BackgroundServer(process, f"http://{host}:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}:\n{server.log()}")
        if (answers or _answers_info)(server):
            return server
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"server did not answer within {timeout} s:\n{server.log()}")
