"""Pictures of the SaliencyMaps module made without 3D Slicer, for the tests and the README.

- :func:`render_panel`: the module's panel, ``Resources/UI/SaliencyMaps.ui`` loaded by PySide6's
  ``QUiLoader`` on Qt's offscreen platform. CTK and MRML widgets (collapsible sections, sliders,
  node selectors, the table view) do not exist outside Slicer: the loader falls back to the Qt
  base class the ``.ui`` file names for each (``QWidget``, ``QTableView``), so they are drawn
  empty; the Qt widgets are drawn as in Slicer, in the state ``setup()`` leaves them.
- :func:`render_slice_view`: a slice view composited by slicer-core's ``vtkMRMLSliceLogic`` (the
  same reslice and blend pipeline as Slicer's slice views, without OpenGL): a map of order 1e-5
  over a Shepp-Logan phantom, shown by the module's ``show_heatmap`` at a threshold and opacity.

``python tests/slicer_pictures.py docs/images`` writes both into docs/images.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
UI_FILE = REPOSITORY / "slicer_module" / "SaliencyMaps" / "Resources" / "UI" / "SaliencyMaps.ui"
PANEL_SIZE = (440, 950)  # pixels, about a Slicer module panel
sys.path.insert(0, str(UI_FILE.parents[2]))  # SaliencyMapsLib, as Slicer finds it beside the module


def load_panel():
    """(QApplication, the panel's top widget) from the .ui file, on Qt's offscreen platform."""
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    ui_file = QFile(str(UI_FILE))
    assert ui_file.open(QFile.ReadOnly), f"cannot open {UI_FILE}"
    try:
        panel = QUiLoader().load(ui_file)
    finally:
        ui_file.close()
    assert panel is not None, f"QUiLoader could not load {UI_FILE}"
    return app, panel


def render_panel(out: Path) -> Path:
    """The panel after ``setup()`` (server URL from a new scene's parameter node, "Not connected.")
    as a PNG of :data:`PANEL_SIZE`."""
    from PySide6.QtCore import QObject

    app, panel = load_panel()
    panel.findChild(QObject, "serverUrlLineEdit").setText("http://127.0.0.1:8000")
    panel.findChild(QObject, "statusLabel").setText("Not connected.")
    panel.resize(*PANEL_SIZE)
    panel.show()
    app.processEvents()
    assert panel.grab().save(str(out)), f"cannot write {out}"
    panel.close()
    return out


@dataclass
class SliceView:
    """A composited slice view and what it shows. ``rgba``: (y, x, 4) uint8 as the blend gives it
    (row 0 at the bottom); ``image``, ``heat``: the (j, i) voxels of the background and the map;
    ``xy_to_ras``: the slice's 4x4 pixel-to-RAS matrix (mm); ``threshold`` (map units),
    ``opacity``; ``colors``: the map's colour table as (n, 3) floats in [0, 1]; ``window``: the
    map's displayed range (map units); ``image_window``: the background's."""

    rgba: np.ndarray
    image: np.ndarray
    heat: np.ndarray
    xy_to_ras: np.ndarray
    threshold: float
    opacity: float
    colors: np.ndarray
    window: tuple[float, float]
    image_window: tuple[float, float]


def render_slice_view(side: int = 128, pixels: int = 384, percentile: float = 90.0, opacity: float = 0.6):
    """A ``side``^2 Shepp-Logan phantom (1 mm voxels) under a Gaussian map of peak 2e-5 over its lower
    region, the map hidden below its ``percentile`` and blended at ``opacity``, composited into a
    ``pixels``^2 axial slice view fitted to the image (nearest-neighbour sampling)."""
    import slicer
    from SaliencyMapsLib import scene as scene_logic
    from vtk.util.numpy_support import vtk_to_numpy

    from monai_sal_app.data.shepp_logan import shepp_logan_phantom

    image, masks = shepp_logan_phantom("control", size=side, rng=np.random.default_rng(0))
    image, lower_region = image[::-1].copy(), masks["bottom"][::-1]  # row j at A = j mm: the view shows it upright
    rows, cols = np.mgrid[:side, :side]
    centre_row, centre_col = (c.mean() for c in np.nonzero(lower_region))
    heat = 2e-5 * np.exp(-((rows - centre_row) ** 2 + (cols - centre_col) ** 2) / (2 * (side / 10) ** 2))
    heat = heat.astype(np.float32)

    scene = slicer.vtkMRMLScene()
    colour_logic = slicer.vtkSlicerColorLogic()  # the default grey table for the background
    colour_logic.SetMRMLScene(scene)
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLScene(scene)
    slice_node = slice_logic.AddSliceNode("Red")
    background = scene_logic.volume_from_array(scene, image[None], np.eye(4), "phantom")
    heatmap = scene_logic.volume_from_array(scene, heat[None], np.eye(4), "map")
    background.CreateDefaultDisplayNodes()
    image_display = background.GetDisplayNode()
    image_display.SetAutoWindowLevel(0)
    image_display.SetWindowLevelMinMax(0.0, 1.0)
    image_display.SetInterpolate(0)
    threshold = scene_logic.threshold_at_percentile(heatmap, percentile)
    display = scene_logic.show_heatmap(scene, heatmap, background, opacity, threshold)
    display.SetInterpolate(0)
    slice_node.SetDimensions(pixels, pixels, 1)
    slice_logic.FitSliceToAll()
    blend = slice_logic.GetBlend()
    blend.Update()
    output = blend.GetOutput()
    width, height, _ = output.GetDimensions()
    rgba = vtk_to_numpy(output.GetPointData().GetScalars()).reshape(height, width, -1).copy()
    table = scene.GetNodeByID(display.GetColorNodeID())
    colors = np.array([table.GetLookupTable().GetTableValue(i)[:3] for i in range(table.GetNumberOfColors())])
    return SliceView(
        rgba=rgba,
        image=image,
        heat=heat,
        xy_to_ras=slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS()),
        threshold=threshold,
        opacity=opacity,
        colors=colors,
        window=(display.GetWindowLevelMin(), display.GetWindowLevelMax()),
        image_window=(image_display.GetWindowLevelMin(), image_display.GetWindowLevelMax()),
    )


def write_rgba_png(rgba: np.ndarray, out: Path) -> Path:
    """``rgba`` (y, x, 4, row 0 at the bottom, as VTK gives it) as an RGB PNG (row 0 at the top)."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(rgba[::-1, :, :3])).save(out)
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else REPOSITORY / "docs" / "images")
    print(render_panel(folder / "slicer_panel.png"))
    print(write_rgba_png(render_slice_view().rgba, folder / "slicer_slice_view.png"))
