"""What the module looks like, without 3D Slicer: its panel from the .ui file (PySide6, offscreen)
and a slice view composited by slicer-core, checked pixel by pixel; both as the README shows them.
How each picture is made, and what it cannot show, is in ``slicer_pictures``."""

from __future__ import annotations

import re

import numpy as np
from conftest import SLICER_MODULE
from PIL import Image
from slicer_pictures import PANEL_SIZE, REPOSITORY, load_panel, render_panel, render_slice_view, write_rgba_png

IMAGES = REPOSITORY / "docs" / "images"


def test_the_panel_loads_from_its_ui_file_with_every_widget_the_module_uses(tmp_path):
    from PySide6.QtCore import QObject

    _app, panel = load_panel()
    used = set(re.findall(r"\bui\.(\w+)", SLICER_MODULE.read_text()))
    assert len(used) > 20
    missing = sorted(name for name in used if panel.findChild(QObject, name) is None)
    assert not missing, f"SaliencyMaps.py uses widgets the .ui file lacks: {missing}"
    # the properties the module relies on, as Slicer's loader will set them on the real widgets
    selector = panel.findChild(QObject, "inputVolumeSelector")
    assert selector.property("nodeTypes") == ["vtkMRMLScalarVolumeNode"]
    assert selector.property("showChildNodeTypes") is False  # no labelmaps
    threshold = panel.findChild(QObject, "thresholdSlider")
    assert (threshold.property("minimum"), threshold.property("maximum"), threshold.property("value")) == (0, 100, 0)
    picture = render_panel(tmp_path / "panel.png")
    assert Image.open(picture).size == PANEL_SIZE == Image.open(IMAGES / "slicer_panel.png").size


def test_a_slice_view_shows_the_map_over_the_image_at_its_threshold_and_opacity(tmp_path):
    view = render_slice_view()
    side = view.image.shape[0]
    height, width, _ = view.rgba.shape
    # the pixels well inside a voxel (nearest-neighbour sampling is unambiguous there); the image's and
    # the map's voxels are the same: 1 mm, at RAS = IJK
    y, x = np.mgrid[:height, :width]
    ras = view.xy_to_ras @ np.stack([x.ravel(), y.ravel(), np.zeros(x.size), np.ones(x.size)])
    i, j = ras[0], ras[1]
    inside = (np.abs(i - np.round(i)) < 0.25) & (np.abs(j - np.round(j)) < 0.25)
    inside &= (i > -0.5) & (i < side - 0.5) & (j > -0.5) & (j < side - 0.5)
    pixels_per_voxel = (width // side - 1) ** 2  # 3 x 3 pixels a voxel; the middle 2 x 2 of them
    assert inside.sum() == side * side * pixels_per_voxel  # every voxel is drawn
    i, j = np.round(i[inside]).astype(int), np.round(j[inside]).astype(int)
    drawn = view.rgba.reshape(-1, 4)[inside, :3].astype(float)

    low, high = view.image_window
    grey = np.clip((view.image[j, i] - low) / (high - low), 0, 1)[:, None] * 255
    heat = view.heat[j, i]
    shown = heat >= view.threshold
    assert 0.09 < shown.mean() < 0.11  # the 90th percentile hides 90 % of the map
    lowest, highest = view.window
    assert np.allclose((lowest, highest), (view.heat.min(), view.heat.max()), rtol=1e-6, atol=1e-12)
    assert 1e-5 < highest < 3e-5  # a raw gradient map's scale
    index = (heat[shown] - lowest) / (highest - lowest) * (len(view.colors) - 1)
    best = np.full(shown.sum(), np.inf)
    for step in (-1, 0, 1):  # the colour table's entry, give or take one (rounding of the window mapping)
        entry = np.clip(np.round(index) + step, 0, len(view.colors) - 1).astype(int)
        expected = (1 - view.opacity) * grey[shown] + view.opacity * 255 * view.colors[entry]
        best = np.minimum(best, np.abs(drawn[shown] - expected).max(axis=1))
    assert best.max() <= 3, "a pixel of the map does not have the map's colour blended at the opacity"
    assert np.abs(drawn[~shown] - grey[~shown]).max() <= 1, "the image is not shown as it is below the threshold"
    assert view.colors[-1][0] > 0.9 and view.colors[0].sum() < 0.1  # inferno: black to yellow

    picture = write_rgba_png(view.rgba, tmp_path / "slice_view.png")
    committed = IMAGES / "slicer_slice_view.png"
    assert np.array_equal(np.asarray(Image.open(picture)), np.asarray(Image.open(committed))), (
        f"{committed} is not this view: run `python tests/slicer_pictures.py docs/images`"
    )
