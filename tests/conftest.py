"""What the tests share: one torch thread, the ``dims`` fixture, the tiny networks, random test
images, and the small parameters that keep the slow attribution methods fast.

Fixtures need no import; test modules import the networks and helpers by name
(``from conftest import tiny_cnn``). Files on disk (checkpoints, images in every format) and the
HTTP helpers are in ``server_fixtures.py``. The Slicer module's library (``SaliencyMapsLib``,
which Slicer finds in the module's folder) is importable by name too.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.factory import build_classifier

REPO = Path(__file__).resolve().parents[1]  # the repository: the package, configs/, slicer_module/, pyproject.toml
sys.path.insert(0, str(REPO / "slicer_module" / "SaliencyMaps"))


# Fixtures that make a test one of a kind: the real server, a whole recipe's run.
MARKER_OF_FIXTURE = {"served": "server", "pacs": "server", "smoke_run": "e2e", "smoke_runs": "e2e"}


def pytest_collection_modifyitems(config, items):
    """A test that uses the real server or a recipe's run must carry its marker (``server``,
    ``e2e``), so that ``-m "not e2e and not server and not slow"`` leaves it out: the collection
    fails, naming the tests, when one does not."""
    unmarked = [
        f"{item.nodeid} uses {fixture}: mark it @pytest.mark.{marker}"
        for item in items
        for fixture, marker in MARKER_OF_FIXTURE.items()
        if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None
    ]
    if unmarked:
        raise pytest.UsageError("tests without the marker of what they use:\n" + "\n".join(unmarked))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread for the whole session, restored at the end: the tiny networks run fastest
    on one thread (more OpenMP threads spin against other processes on a small shared machine), and
    the server under test runs with ``OMP_NUM_THREADS=1``, so its numbers and the in-process ones
    compare tightly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def dims(request) -> int:
    """Spatial dims: every test that takes it runs on 2D images and on 3D volumes."""
    return request.param


# ----------------------------------------------------------------------------- test images


def images_for(
    spatial_dims: int, n: int = 4, channels: int = 1, side: int | None = None, seed: int = 1
) -> torch.Tensor:
    """Uniform [0, 1) noise of shape (n, channels, side, ...) with ``spatial_dims`` sides of ``side``
    (default 32 px in 2D, 16 voxels in 3D), from its own generator seeded with ``seed``."""
    side = side or (32 if spatial_dims == 2 else 16)
    return torch.rand((n, channels, *(side,) * spatial_dims), generator=torch.Generator().manual_seed(seed))


def predicted_classes(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class ``model``, put in eval mode, predicts for each of ``images`` (no gradients)."""
    with torch.no_grad():
        return model.eval()(images).argmax(1)


def modules_loaded_by(module: str, candidates: list[str]) -> list[str]:
    """Those of ``candidates`` (module names) that ``import module`` loads, in a fresh Python with
    this repository first on its path (a light module must not pull in a heavy library)."""
    import os
    import subprocess

    code = f"import sys, {module}\nprint(*[name for name in {candidates!r} if name in sys.modules])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


# ----------------------------------------------------------------------------- real-anatomy bases


def not_installed(what: str) -> None:
    """Skip a test that needs ``what``, which the install scripts provide and is missing; under CI
    (``CI`` set) fail instead, so that a broken install cannot turn into a green run of skips."""
    import os

    if os.environ.get("CI"):
        pytest.fail(f"not installed under CI: {what}")
    pytest.skip(f"not installed: {what}")


def missing_base(reason: str) -> None:
    """:func:`not_installed` for a real-anatomy base."""
    not_installed(f"real-anatomy base: {reason}")


def base_or_skip(locate):
    """``locate()`` (a ``data.bases`` locator), or :func:`missing_base` when its base is absent."""
    from monai_sal_app.data import bases

    try:
        return locate()
    except bases.BaseNotInstalled as error:
        missing_base(str(error))


# ----------------------------------------------------------------------------- small method parameters

# The cheapest work of the methods that are slow at their defaults. A method not listed here,
# such as one registered later, runs with its own defaults.
SMALL_PARAMS = {
    "smoothgrad": {"n_samples": 2},
    "integrated_gradients": {"steps": 2},
    "smoothgrad_ig": {"n_samples": 1, "steps": 2},
    "occlusion": {"window": 16, "stride": 16},
    "xrai": {"steps": 2},
    "meaningful_perturbation": {"steps": 1},
}


def small_params(method: str, model: nn.Module | None = None) -> dict:
    """A new dict of the parameters that make ``method`` cheap: its entry in :data:`SMALL_PARAMS`, or {};
    for a method that takes a trained explainer, with ``model`` given, an untrained one bound to
    ``model``'s weights (:func:`untrained_explainer`)."""
    from monai_sal_app.saliency import get_method

    params = dict(SMALL_PARAMS.get(method, {}))
    kind = get_method(method).explainer
    if kind is not None and model is not None:
        params["explainer"] = untrained_explainer(kind, model)
    return params


def _num_classes_and_dims(model: nn.Module) -> tuple[int, int]:
    """(classes, spatial dims) of ``model``, from one forward pass on zeros (its modes restored)."""
    from monai_sal_app.saliency.core import model_input_spec

    spatial_dims, _ = model_input_spec(model)
    modes = [(module, module.training) for module in model.modules()]
    with torch.no_grad():
        outputs = model.eval()(torch.zeros((2, 1, *[32 if spatial_dims == 2 else 16] * spatial_dims)))
    for module, training in modes:
        module.training = training
    return outputs.shape[1], spatial_dims


def untrained_explainer(kind: str, model: nn.Module) -> nn.Module:
    """A seeded, untrained ``kind`` explainer (4 channels a stage) whose card binds it to ``model``'s
    weights, in eval mode: what a method that takes ``explainer=`` needs to run on ``model``."""
    from monai_sal_app.explainers import ExplainerCard, build_explainer, explainer_settings
    from monai_sal_app.models.checkpoint import weights_fingerprint

    num_classes, spatial_dims = _num_classes_and_dims(model)
    card = ExplainerCard(
        kind=kind,
        spatial_dims=spatial_dims,
        in_channels=1,
        num_classes=num_classes,
        input_size=(32,) * spatial_dims if spatial_dims == 2 else (16,) * spatial_dims,
        classifier={"fingerprint": weights_fingerprint(model), "file": "", "labels": []},
        settings=explainer_settings(kind, {"channels": [4, 4, 4, 4]}),
    )
    with torch.random.fork_rng():  # seeded without touching the caller's random state
        torch.manual_seed(0)
        explainer = build_explainer(card).eval()
    explainer.card = card
    return explainer


# ----------------------------------------------------------------------------- tiny networks


def tiny_cnn(spatial_dims: int, in_channels: int = 1, num_classes: int = 3) -> nn.Module:
    """Two 3x3 convolutions (6 and 8 channels, the second with stride 2) with batch norm and
    in-place ReLUs, global average pooling, dropout and a linear layer: all things an attribution
    method must leave as it found them. Seeded weights, train mode."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
    torch.manual_seed(0)
    return nn.Sequential(
        conv(in_channels, 6, 3, padding=1), norm(6), nn.ReLU(inplace=True),
        conv(6, 8, 3, padding=1, stride=2), norm(8), nn.ReLU(inplace=True),
        pool(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(8, num_classes),
    )  # fmt: skip


def tiny_resnet(spatial_dims: int) -> nn.Module:
    """MONAI's ResNet with one basic block per stage and widths (4, 4, 8, 8): 1 channel in, 2
    classes, the grid divided by 16 (``layer4`` is a single voxel of a 16^3 volume). Seeded, eval mode."""
    torch.manual_seed(0)
    model = ResNet("basic", [1, 1, 1, 1], [4, 4, 8, 8], spatial_dims=spatial_dims, n_input_channels=1, num_classes=2)
    return model.eval()


def tiny_densenet(spatial_dims: int) -> nn.Module:
    """MONAI's DenseNet121 with 4 initial features and growth rate 4: 1 channel in, 2 classes, the
    grid divided by 32 (inputs of 64 px leave a 2x2 final feature map). Seeded, eval mode."""
    torch.manual_seed(0)
    return DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=2, init_features=4, growth_rate=4).eval()


TINY_CHANNELS = (4, 4, 8, 8, 8)  # conv5-fc3 widths small enough for a CPU test
# build_classifier arguments that make every architecture small enough for a CPU test
TINY_BACKBONES = {
    "densenet121": {"init_features": 4, "growth_rate": 4, "bn_size": 2},
    "densenet169": {"init_features": 4, "growth_rate": 4, "bn_size": 2},
    "resnet18": {"block_inplanes": [4, 4, 8, 8]},
    "resnet34": {"block_inplanes": [4, 4, 8, 8]},
    "resnet50": {"block_inplanes": [4, 4, 8, 8]},
    "resnet101": {"block_inplanes": [2, 2, 2, 2]},
    "resnet152": {"block_inplanes": [2, 2, 2, 2]},
    "conv5fc3": {"channels": TINY_CHANNELS},
}
LABELS = ["control", "patient"]  # the classes of tiny_card, as its JSON lists them
INPUT_SIZE = {2: [32, 32], 3: [16, 16, 16]}


def tiny_conv5fc3(spatial_dims: int = 2, seed: int = 0, **kwargs) -> nn.Module:
    """The project's conv5-fc3 with :data:`TINY_CHANNELS`, weights seeded with ``seed``; ``kwargs``
    go to ``build_classifier`` (e.g. ``num_classes``, ``dropout``). Inputs from 16 px a side."""
    torch.manual_seed(seed)
    return build_classifier("conv5fc3", spatial_dims, channels=TINY_CHANNELS, **kwargs)


def trained_small_resnet(widths, num_classes: int, train, val, epochs: int, seed: int) -> nn.Module:
    """MONAI's ResNet18 (2D, block widths ``widths``, a stride-2 first convolution and no max pool:
    a 4x4 ``layer4`` for Grad-CAM on 64 px), weights seeded with ``seed``, trained ``epochs`` epochs
    (as many of patience, lr 3e-3, on the CPU) on ``train`` = (images, labels) and validated on
    ``val``; its best validation AUC must pass 0.95. The caller's random state is left alone."""
    from monai_sal_app.models.train import train_classifier

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_classifier(
            "resnet18", 2, num_classes=num_classes, block_inplanes=list(widths), conv1_t_stride=2, no_max_pool=True
        )
        model, history = train_classifier(
            model, *train, *val, epochs=epochs, patience=epochs, lr=3e-3, device="cpu", progress=False, log=None
        )
    assert max(h["val_auc"] for h in history) > 0.95
    return model


TINY_WILDCAT_HEAD = {"name": "wildcat", "kmax": 0.25, "kmin": None, "alpha": 0.7, "maps": 2}


def tiny_wildcat(spatial_dims: int = 2, seed: int = 0, num_classes: int = 2, **head) -> nn.Module:
    """:func:`tiny_conv5fc3`'s feature blocks with a WILDCAT head (:data:`TINY_WILDCAT_HEAD`, updated
    with ``head``): class maps on a grid 16 times coarser than the input (2x2 for 32 px). Train mode."""
    return tiny_conv5fc3(spatial_dims, seed, num_classes=num_classes, head={**TINY_WILDCAT_HEAD, **head})


def network_for(method: str, network: nn.Module) -> nn.Module:
    """``network`` if ``method`` can explain it; otherwise a seeded :func:`tiny_wildcat` with the same
    spatial dims and number of classes (the methods that need a WILDCAT head), in the same mode."""
    from monai_sal_app.saliency import get_method

    if get_method(method).applies_to(network):
        return network
    num_classes, spatial_dims = _num_classes_and_dims(network)
    return tiny_wildcat(spatial_dims, num_classes=num_classes).train(network.training)


def tiny_card(spatial_dims: int = 2, **fields) -> ModelCard:
    """The card of :func:`tiny_conv5fc3` (1 channel in, :data:`LABELS`, :data:`INPUT_SIZE` images);
    ``fields`` replace or add ModelCard fields (another architecture needs its ``arch_kwargs``)."""
    card = {
        "architecture": "conv5fc3",
        "spatial_dims": spatial_dims,
        "in_channels": 1,
        "num_classes": len(LABELS),
        "labels": LABELS,
        "input_size": INPUT_SIZE[spatial_dims],
        "arch_kwargs": {"channels": list(TINY_CHANNELS)},
    }
    return ModelCard(**{**card, **fields})


class FunctionalReluNet(nn.Module):
    """Three convolutions (6, 6 and 8 channels, the second with stride 2), ReLUs called as
    torch.relu, F.relu(inplace=True) and Tensor.relu_ inside forward (no ReLU module anywhere),
    spatial mean and a linear layer to 3 classes; or, with ``relu`` given, that function at the
    same three places (for a hand-written reference). Seeded."""

    def __init__(self, spatial_dims: int, in_channels: int = 1, relu=None):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        torch.manual_seed(0)
        self.conv1 = conv(in_channels, 6, 3, padding=1)
        self.conv2 = conv(6, 6, 3, padding=1, stride=2)
        self.conv3 = conv(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)
        self.relu = relu

    def forward(self, x):
        if self.relu is None:
            x = torch.relu(self.conv1(x))
            x = F.relu(self.conv2(x), inplace=True)
            x = self.conv3(x)
            x.relu_()
        else:
            x = self.relu(self.conv3(self.relu(self.conv2(self.relu(self.conv1(x))))))
        return self.fc(x.flatten(2).mean(2))


class SmoothNet(nn.Module):
    """Softplus/tanh network pooled by mean and mean square (so a blur changes its output), 2
    classes, logits scaled by 10: IG's trapezoid rule converges smoothly on it. Seeded."""

    def __init__(self, spatial_dims: int):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        torch.manual_seed(0)
        self.conv1 = conv(1, 4, 3, padding=1)
        self.conv2 = conv(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.conv2(F.softplus(self.conv1(x)))).flatten(2)
        return 10 * self.fc(torch.cat([h.mean(2), (h * h).mean(2)], 1))


class FailsOnCall(nn.Module):
    """2D, 1 channel in, 2 classes: a 3x3 convolution, a ReLU module (in place) and torch.relu,
    then the spatial mean. Counts its forward calls in ``calls`` and raises ``RuntimeError("boom")``
    on call number ``fail_at`` (never when None). A given target costs explain() no forward call,
    so call 1 is already inside the method. Seeded."""

    def __init__(self, fail_at: int | None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.ReLU(inplace=True)
        self.fail_at, self.calls = fail_at, 0

    def forward(self, x):
        self.calls += 1
        x = torch.relu(self.act(self.conv(x)))
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("boom")
        return x.mean((2, 3))


class MeanIntensity(nn.Module):
    """logits = (0, w * mean + b) from the mean intensity of each image (any shape): one linear
    unit, no batch norm, so with lr=0 nothing at all changes between training epochs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        score = self.linear(x.mean(dim=tuple(range(1, x.ndim)))[:, None])
        return torch.cat([torch.zeros_like(score), score], dim=1)


# ----------------------------------------------------------------------------- models with known evidence


class HandWritten(nn.Module):
    """Base of the models whose logits are written by hand from the pixels, so that the evidence
    for each class is known. Its only layer, the 1x1 convolution ``probe``, is never called: it is
    there because explain() reads a model's spatial dims (2 or 3) from its first convolution."""

    def __init__(self, spatial_dims: int = 2):
        super().__init__()
        self.probe = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(1, 1, 1)


class QuadrantFeatures(nn.Module):
    """(N, 1, 32, 32) -> (N, 2, 32, 32): channel 0 is the image inside the top-left 16x16 quadrant
    (zero elsewhere), channel 1 the image inside the bottom-right one."""

    def forward(self, x):
        top_left, bottom_right = torch.zeros_like(x), torch.zeros_like(x)
        top_left[..., :16, :16] = 1
        bottom_right[..., 16:, 16:] = 1
        return torch.cat([x * top_left, x * bottom_right], 1)


class QuadrantModel(HandWritten):
    """2D, 32x32 images. Logit of class 1 = mean of :class:`QuadrantFeatures` channel 0 (the
    top-left quadrant), of class 0 = mean of channel 1 (the bottom-right one); ``features`` is the
    layer Grad-CAM finds by default."""

    def __init__(self):
        super().__init__()
        self.features = QuadrantFeatures()

    def forward(self, x):
        a = self.features(x)
        return torch.stack([a[:, 1].mean((1, 2)), a[:, 0].mean((1, 2))], 1)


class TopLeftEvidence(HandWritten):
    """2D. Logit of class 0 is 0; of class 1, 4 x the mean of the top-left 8x8 block: nothing else
    in the image changes the output."""

    def forward(self, x):
        evidence = x[:, 0, :8, :8].mean((1, 2))
        return torch.stack([torch.zeros_like(evidence), 4 * evidence], 1)


def blob_mask(spatial_dims: int, side: int, centre, radius: float) -> torch.Tensor:
    """A float {0, 1} disk (2D) or ball (3D) of ``radius`` px around ``centre`` on a grid of
    ``side`` px a side."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(side))] * spatial_dims, indexing="ij"))
    offset = grid - torch.tensor(centre, dtype=torch.float32).view(-1, *[1] * spatial_dims)
    return ((offset**2).sum(0) <= radius**2).float()


def blob_images(spatial_dims: int, side: int, centres, seed: int = 0) -> torch.Tensor:
    """(len(centres), 1, side, ...): image i is noise in [0, 0.2) with a bright (1.0) disk/ball of
    radius 3 px around ``centres[i]``."""
    g = torch.Generator().manual_seed(seed)
    images = [
        torch.maximum(0.2 * torch.rand((side,) * spatial_dims, generator=g), blob_mask(spatial_dims, side, c, 3.0))
        for c in centres
    ]
    return torch.stack(images).unsqueeze(1)


# BlobModel on 64 px images: class 1 fires on a blob at BLOB_CENTRES[0], class 2 at BLOB_CENTRES[1].
BLOB_SIDE, BLOB_CENTRES = 64, [(20, 40), (44, 18)]


def trained_blob_explainer(kind: str, settings: dict, epochs: int):
    """A small ``kind`` explainer trained for a few seconds against :class:`BlobModel` (2D,
    :data:`BLOB_SIDE`, :data:`BLOB_CENTRES`) on 48 blob images (40 train, 8 validation).
    Returns (BlobModel in eval mode, explainer, its card)."""
    from monai_sal_app.explainers.train import train_explainer

    model = BlobModel(2, BLOB_SIDE, BLOB_CENTRES).eval()
    x = torch.cat([blob_images(2, BLOB_SIDE, BLOB_CENTRES, seed=s) for s in range(24)])
    card = tiny_card(2, input_size=[BLOB_SIDE, BLOB_SIDE], labels=["none", "blob a", "blob b"], num_classes=3)
    explainer, explainer_card = train_explainer(
        kind, model, card, x[:40], x[40:], settings=settings, epochs=epochs, patience=epochs, batch_size=8,
        lr=3e-3, progress=False, log=None,
    )  # fmt: skip
    return model, explainer, explainer_card


class BlobModel(HandWritten):
    """Class k (k >= 1) fires on a bright blob inside window k, a disk/ball of ``radius`` around
    ``centres[k - 1]`` on images of ``side`` px: centre-surround filter (3-px minus 9-px box
    means), ReLU, mean over the window; class 0 is a constant logit. 2D or 3D. A blurred blob (the
    perturbation's deleted content) scores below the threshold."""

    def __init__(self, spatial_dims: int, side: int, centres, radius: float = 4.0):
        super().__init__(spatial_dims)
        self.pool = F.avg_pool2d if spatial_dims == 2 else F.avg_pool3d
        self.register_buffer("windows", torch.stack([blob_mask(spatial_dims, side, c, radius) for c in centres]))

    def box_mean(self, x, width):
        """Mean over a box of side ``width`` (valid pixels only), one axis at a time."""
        dims = x.ndim - 2
        for axis in range(dims):
            kernel = [1] * dims
            kernel[axis] = width
            x = self.pool(x, tuple(kernel), 1, tuple(k // 2 for k in kernel), count_include_pad=False)
        return x

    def forward(self, x):
        response = F.relu(self.box_mean(x, 3) - self.box_mean(x, 9))
        score = 10 * (response * self.windows).flatten(2).sum(2) / self.windows.flatten(1).sum(1)
        return torch.cat([torch.zeros_like(score[:, :1]), 4.0 * (score - 1.6)], 1)


# ----------------------------------------------------------------------------- headless browser

# Injected into a copy of a page before Chromium loads it: after the load it writes, into the DOM
# that ``--dump-dom`` prints, how many tables and images the page has and which of them are shown
# (an image decoded with a size, a table laid out with a height).
_PAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const shown = (e) => e.getBoundingClientRect().width > 0 && e.getBoundingClientRect().height > 0;
  const images = [...document.images];
  const tables = [...document.querySelectorAll("table")];
  const result = {
    images: images.length,
    images_shown: images.filter((i) => i.complete && i.naturalWidth > 0 && shown(i)).length,
    tables: tables.length,
    tables_shown: tables.filter(shown).length,
    external: [...document.querySelectorAll("[src],[href]")].map((e) => e.getAttribute("src") || e.getAttribute("href"))
      .filter((u) => !u.startsWith("data:") && !u.startsWith("#")),
  };
  const out = document.createElement("pre");
  out.id = "page-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    """The headless browser the report tests use (Debian's ``chromium``; ``scripts/test.sh`` installs it)."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no chromium on PATH: install it (apt-get install chromium), as scripts/test.sh does")


def _chromium_run(*args: str) -> str:
    import subprocess

    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def open_in_chromium(page: Path, tmp_path: Path) -> dict:
    """Load ``page`` in headless Chromium; returns the page check (counts of tables and images and
    how many are shown, links to anything outside the page)."""
    import json
    import re

    probe = tmp_path / f"{page.stem}.probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PAGE_CHECK + "</body>"), encoding="utf-8")
    dom = _chromium_run("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="page-check">(.*?)</pre>', dom, re.S)
    assert found, "the page check did not run: the page did not finish loading"
    return json.loads(found.group(1).replace("&quot;", '"'))


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 1600) -> Path:
    """A PNG of ``page`` as headless Chromium draws it."""
    _chromium_run(f"--window-size={width},{height}", "--hide-scrollbars", f"--screenshot={out}", page.as_uri())
    assert out.is_file(), f"chromium wrote no screenshot {out}"
    return out


# ----------------------------------------------------------------------------- experiment recipes


def run_smoke(recipe: str, out: Path, **kwargs) -> Path:
    """Run the built-in ``recipe`` at its smoke scale into ``out``, quietly; ``kwargs`` go to
    ``run_experiment`` (``data``, ``models``). A real-anatomy base it needs that is not installed:
    :func:`missing_base`. Returns ``out``."""
    from monai_sal_app.data.bases import BaseNotInstalled
    from monai_sal_app.experiments.runner import run_experiment

    try:
        run_experiment(recipe, out, scale="smoke", progress=False, log=lambda _: None, **kwargs)
    except BaseNotInstalled as error:
        missing_base(str(error))
    return out


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """``smoke_runs(recipe)``: the folder of ``recipe``'s run at the smoke scale, run once for the
    session and shared by the recipe's own tests and the determinism test (``test_determinism.py``),
    which reads it and never writes into it."""
    runs: dict[str, Path] = {}

    def smoke_run(recipe: str) -> Path:
        if recipe not in runs:
            runs[recipe] = run_smoke(recipe, tmp_path_factory.mktemp(recipe) / "run")
        return runs[recipe]

    return smoke_run


@pytest.fixture(scope="module")
def smoke_run(request, smoke_runs) -> Path:
    """The session's smoke run (:func:`smoke_runs`) of the recipe the test module names in ``RECIPE``."""
    return smoke_runs(request.module.RECIPE)


@pytest.fixture(scope="module")
def smoke_settings(request) -> dict:
    """The settings of the module's ``RECIPE`` at the smoke scale, as the recipe file gives them."""
    from monai_sal_app.experiments.runner import resolve_config

    return resolve_config(request.module.RECIPE, "smoke")["settings"]


def results_text(out: Path) -> dict[str, str]:
    """{file name: text} of every CSV in a run's ``results/``."""
    return {p.name: p.read_text() for p in sorted((out / "results").glob("*.csv"))}


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV file (a recipe's ``results/*.csv``, a ``maps.csv``) as dicts of strings."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def smoke_refusal(recipe: str, changes: dict, tmp_path: Path) -> str:
    """Run the built-in ``recipe`` with ``changes`` made to its smoke scale; the run must raise
    ExperimentError before writing anything. Returns the error's message."""
    import yaml

    from monai_sal_app.experiments.runner import ExperimentError, config_folder, run_experiment

    raw = yaml.safe_load((config_folder() / f"{recipe}.yaml").read_text())
    raw["scales"]["smoke"].update(changes)
    path = tmp_path / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ExperimentError) as refused:
        run_experiment(path, tmp_path / "out", scale="smoke", progress=False, log=lambda _: None)
    assert not (tmp_path / "out").exists()
    return str(refused.value)


# ----------------------------------------------------------------------------- the real server


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """The real server on 127.0.0.1, started once for the session and shared by the server, limits
    and Slicer tests (``server_fixtures.start_shared_server`` says what it serves and with which
    limits); stopped at the end. A test that changes a model works on a copy of its own
    (``server_fixtures.COPIES``). Yields {"url", "items", "model_dir", "studies", "root", "server"}
    (``server``: the BackgroundServer)."""
    from server_fixtures import start_shared_server

    server, folders = start_shared_server(tmp_path_factory.mktemp("served"))
    try:
        yield {"url": server.url, "server": server, **folders}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pacs(tmp_path_factory):
    """A real Orthanc holding DICOM images of four modalities, and the real server on 127.0.0.1
    using it as its datastore (``pacs_fixtures.start_pacs_server`` says what and with which
    settings); both stopped at the end. Yields {"orthanc", "server", "url", "images", "model_dir"}."""
    from pacs_fixtures import start_pacs_server

    orthanc, server, folders = start_pacs_server(tmp_path_factory.mktemp("pacs"))
    try:
        yield {"orthanc": orthanc, "server": server, "url": server.url, **folders}
    finally:
        server.stop()
        orthanc.stop()


# ----------------------------------------------------------------------------- the Slicer module

SLICER_MODULE = REPO / "slicer_module" / "SaliencyMaps" / "SaliencyMaps.py"


@pytest.fixture
def mrml_scene():
    """A fresh MRML scene (slicer-core) as the application sets it up: the three slice views'
    composite nodes, and the Colors logic on it (which registers the colour legend node class)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    for view in ("Red", "Yellow", "Green"):
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(view)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    scene.color_logic = colors  # kept alive with the scene
    return scene


def load_volume(scene, path: Path, labelmap: bool = False):
    """A volume node read from ``path`` by an archetype storage node, which stays attached (as when
    Slicer loads a file)."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", path.stem)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"MRML cannot read {path}"
    return node


def ijk_to_ras(node):
    """A volume node's 4x4 IJK-to-RAS matrix as a numpy array."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def box_segmentation(scene, reference, low_ras, high_ras, spacing=0.5, shift=(0.25, 0.1, 0.3)):
    """A segmentation node whose one segment is the RAS box [low, high), drawn on an axis-aligned grid
    finer than ``reference``'s and shifted from it; returns (node, segment id)."""
    import numpy as np
    import slicer
    from SaliencyMapsLib import scene as scene_logic

    low, high = np.asarray(low_ras, dtype=float), np.asarray(high_ras, dtype=float)
    origin = low - 3.0 + np.asarray(shift)
    size = np.ceil((high - low + 6.0) / spacing).astype(int)  # (i, j, k) along R, A, S
    i, j, k = np.meshgrid(*[origin[a] + spacing * np.arange(size[a]) for a in range(3)], indexing="ij")
    inside = (i >= low[0]) & (i < high[0]) & (j >= low[1]) & (j < high[1]) & (k >= low[2]) & (k < high[2])
    matrix = np.diag([spacing, spacing, spacing, 1.0])
    matrix[:3, 3] = origin
    labelmap = scene_logic.volume_from_array(scene, inside.transpose(2, 1, 0).astype(np.uint8), matrix, "box", True)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lesion")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    return segmentation, segmentation.GetSegmentation().GetNthSegmentID(0)


def save_scene(scene, folder: Path) -> Path:
    """Save ``scene`` into ``folder`` as Slicer's Save dialog does, without the application: each
    volume written by its (default) storage node to ``<node ID>.nrrd``, then ``scene.mrml``."""
    from SaliencyMapsLib import scene as scene_logic

    for node in scene_logic.nodes_of_class(scene, "vtkMRMLVolumeNode"):
        if node.GetStorageNode() is None:
            node.AddDefaultStorageNode()
        node.GetStorageNode().SetFileName(str(folder / f"{node.GetID()}.nrrd"))
        assert node.GetStorageNode().WriteData(node), f"cannot write {node.GetName()}"
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit(), "cannot write the scene"
    return folder / "scene.mrml"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A long legitimate request on the tiny 3D model (minutes of work unless stopped): meaningful
# perturbation at its bounds, 80000 passes of 16^3 voxels (3.3e8), within the default cost budget
# and the shared server's (server_fixtures.BUDGET).
LONG_REQUEST = {"steps": 5000, "jitter_copies": 16}


def monai_sal_executable() -> str:
    """The installed ``monai-sal`` console script (on PATH, else beside this Python)."""
    return shutil.which("monai-sal") or str(Path(sys.executable).parent / "monai-sal")
