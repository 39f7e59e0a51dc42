"""SaliencyMaps.py run as 3D Slicer runs it: the module, its widget and its logic constructed on
Slicer's base classes, the panel driven through its buttons and sliders, against a real MRML scene
(slicer-core) and the real server on 127.0.0.1.

What cannot exist here (Qt and CTK widgets, the application, its module manager and dialogs,
Slicer's ScriptedLoadableModule and parameterNodeWrapper, which ship with the application only)
is stood in for by ``slicer_standins``, which says how each stand-in follows Slicer.
"""

from __future__ import annotations

import csv
import importlib
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import slicer
from conftest import LONG_REQUEST, SLICER_MODULE, box_segmentation, free_port, ijk_to_ras, load_volume, save_scene
from SaliencyMapsLib import scene as scene_logic
from SaliencyMapsLib.trust import trust_lines
from server_fixtures import SERVED, make_studies, save_tiny_checkpoint
from slicer_standins import QFileDialog, QSettings, SlicerStandIns, module_panel

from monai_sal_app.serve import start_background_server

pytestmark = pytest.mark.server  # every test here drives the panel against the real server


@pytest.fixture
def panel(monkeypatch, mrml_scene):
    """The module as Slicer loads it: SaliencyMaps.py imported with Slicer's modules present, the
    module constructed with its parent, the widget with its panel, ``setup()`` run, then entered."""
    standins = SlicerStandIns(mrml_scene, mrml_scene.color_logic, SLICER_MODULE)
    standins.install(monkeypatch)
    monkeypatch.delitem(sys.modules, "SaliencyMaps", raising=False)
    module = importlib.import_module("SaliencyMaps")
    module_parent, parent = module_panel(SLICER_MODULE)
    module.SaliencyMaps(module_parent)
    widget = module.SaliencyMapsWidget(parent)
    widget.setup()
    parent.isEntered = True
    widget.enter()
    try:
        yield types.SimpleNamespace(
            module=module, info=module_parent, widget=widget, ui=widget.ui, app=standins, scene=mrml_scene
        )
    finally:
        widget.cleanup()
        sys.modules.pop("SaliencyMaps", None)


def enabled(ui) -> set[str]:
    names = ("connectButton", "explainButton", "compareButton", "exportCsvButton", "batchVolumesButton")
    return {name for name in (*names, "batchMethodsButton", "cancelButton") if getattr(ui, name).enabled}


def connect(panel, url: str) -> None:
    panel.ui.serverUrlLineEdit.text = url
    panel.ui.connectButton.click()
    panel.app.run_until(lambda: panel.widget.job is None)


def choose(combo, data) -> None:
    combo.setCurrentIndex(combo.findData(data))
    assert combo.currentData == data, f"{combo.objectName} has no {data!r}"


def explain(panel, volume, model: str, method: str) -> None:
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    choose(panel.ui.modelComboBox, model)
    choose(panel.ui.methodComboBox, method)
    panel.ui.explainButton.click()
    panel.app.run_until(lambda: panel.widget.job is None)


def test_the_module_runs_as_slicer_runs_it_against_the_real_server(panel, served, tmp_path):
    """Setup, connect, explain, compare, batch, cancel and cleanup through the panel. Before the
    Logic held its workflow, Slicer's cooperative ``super().__init__()`` made setup() raise
    TypeError here, after the panel was added and before any button was connected."""
    ui, app, scene, widget = panel.ui, panel.app, panel.scene, panel.widget
    assert panel.info.title == "Saliency Maps" and "Saliency Maps" in app.translated  # through slicer.i18n
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", name) for name in panel.info.contributors)  # Name (Organization)
    link = re.search(r'href="([^"]+)"', panel.info.helpText).group(1)
    assert link.startswith("file://") and Path(link[len("file://") :]).resolve() == (
        SLICER_MODULE.parents[2] / "docs" / "SLICER.md"
    )
    assert Path(panel.info.icon).is_file() and widget.logic.moduleName == "SaliencyMaps"
    assert enabled(ui) == {"connectButton"}  # nothing else makes sense before connecting

    # connect: the request runs on a worker thread, Connect is disabled until it ends
    ui.serverUrlLineEdit.text = served["url"]
    ui.connectButton.click()
    assert widget.job is not None and enabled(ui) == {"cancelButton"}
    app.run_until(lambda: widget.job is None)
    assert [ui.modelComboBox.itemText(i) for i in range(ui.modelComboBox.count)] == sorted(SERVED)
    assert ui.methodComboBox.count > 5 and "[" in ui.methodComboBox.currentText  # each method with its trust tag
    assert ui.parametersWidget.layout().rowCount() > 0 and "Connected to" in ui.statusLabel.text
    assert QSettings.store["SaliencyMaps/ServerURL"] == served["url"]

    # explain: only images are offered; the click returns at once, the map arrives later
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    labelmap = load_volume(scene, served["items"]["volume_nii"]["mask"], labelmap=True)
    assert volume in ui.inputVolumeSelector.offered() and labelmap not in ui.inputVolumeSelector.offered()
    ui.inputVolumeSelector.setCurrentNode(volume)
    choose(ui.modelComboBox, "classifier_3d")
    choose(ui.methodComboBox, "gradcam")
    assert enabled(ui) == {"connectButton", "explainButton", "batchVolumesButton", "batchMethodsButton"}
    ui.explainButton.click()
    assert widget.job is not None and ui.heatmapComboBox.count == 0 and enabled(ui) == {"cancelButton"}
    app.run_until(lambda: widget.job is None)
    heatmap = scene.GetNodeByID(ui.heatmapComboBox.currentData)
    assert scene_logic.heatmap_nodes(scene) == [heatmap] and heatmap not in ui.inputVolumeSelector.offered()
    card = scene_logic.heatmap_result(heatmap).get(
        "trust"
    )  # the answer's trust card text is shown, as the Lib words it
    assert "gradcam" in ui.resultLabel.text and all(line in ui.resultLabel.text for line in trust_lines(card))
    assert ui.methodTrustLabel.text == "\n".join(
        trust_lines(widget.workflow.model("classifier_3d").get("trust"), "gradcam")
    )
    composite = scene_logic.nodes_of_class(scene, "vtkMRMLSliceCompositeNode")[0]
    assert composite.GetForegroundVolumeID() == heatmap.GetID() and composite.GetBackgroundVolumeID() == volume.GetID()

    # display: the threshold is a percentile of the map's own values, the opacity the layer's
    ui.thresholdSlider.value = 90.0
    ui.opacitySlider.value = 0.3
    expected = np.percentile(slicer.util.arrayFromVolume(heatmap).astype(np.float64), 90.0)
    assert heatmap.GetDisplayNode().GetLowerThreshold() == expected
    assert f"{expected:.3g}" in ui.thresholdValueLabel.text and composite.GetForegroundOpacity() == pytest.approx(0.3)

    # compare with a segment: table in the view, ROC chart in the layout, CSV export
    corners = ijk_to_ras(heatmap) @ np.array([[2, 4, 3, 1], [9, 11, 8, 1]]).T
    segmentation, segment = box_segmentation(scene, heatmap, corners[:3].min(axis=1), corners[:3].max(axis=1))
    assert "compareButton" not in enabled(ui)
    ui.segmentSelector.setCurrentNode(segmentation)
    ui.segmentSelector.setCurrentSegmentID(segment)
    ui.compareButton.click()
    table = ui.metricsTableView.mrmlTableNode()
    assert table is not None and table.GetCellText(0, 0) == "threshold" and app.plots.shown
    assert "exportCsvButton" in enabled(ui) and not app.errors
    QFileDialog.answer = str(tmp_path / "metrics.csv")
    ui.exportCsvButton.click()
    with open(tmp_path / "metrics.csv", newline="") as handle:
        assert {row["metric"] for row in csv.DictReader(handle)} >= {"threshold", "dice_threshold", "roc_auc"}

    # batch: this method on every image volume (not the labelmap, not the map), with progress
    second = load_volume(scene, served["items"]["volume_nrrd"]["path"])
    ui.batchVolumesButton.click()
    assert ui.progressBar.maximum == 2 and enabled(ui) == {"cancelButton"}
    app.run_until(lambda: widget.job is None)
    assert ui.statusLabel.text.startswith("2 done, 0 failed")
    assert len(scene_logic.heatmap_nodes(scene, volume)) == 2 and len(scene_logic.heatmap_nodes(scene, second)) == 1

    # cancel: a request of minutes is aborted in flight, nothing lands, every button comes back
    choose(ui.methodComboBox, "meaningful_perturbation")
    for name, (field, _kind) in widget.parameter_widgets.items():
        if name in LONG_REQUEST:
            field.value = LONG_REQUEST[name]
    maps_before = scene_logic.heatmap_nodes(scene)
    ui.explainButton.click()
    for _ in range(10):  # the event loop turns; the panel stays responsive while the server works
        app.app.process_events()
        time.sleep(0.05)
    assert widget.job is not None and "meaningful_perturbation" in ui.statusLabel.text
    clicked = time.monotonic()
    ui.cancelButton.click()
    app.run_until(lambda: widget.job is None, timeout=5)
    assert time.monotonic() - clicked < 2.0 and ui.statusLabel.text == "Explaining: cancelled."
    assert scene_logic.heatmap_nodes(scene) == maps_before and "explainButton" in enabled(ui)

    # cleanup: no observer, no timer left
    widget.cleanup()
    assert not widget.Observations and not widget.timer.isActive()
    scene.RemoveNode(heatmap)  # the scene no longer reaches the widget
    assert ui.heatmapComboBox.findData(heatmap.GetID()) >= 0


def test_slider_moves_and_compares_add_nothing_to_the_scene(panel, served):
    """10 redraws (threshold and opacity moves) and 10 compares through the panel: the scene's node
    count and the volumes' reference counts are those after the first of each."""
    ui, scene = panel.ui, panel.scene
    connect(panel, served["url"])
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    explain(panel, volume, "classifier_3d", "gradient")
    heatmap = scene.GetNodeByID(ui.heatmapComboBox.currentData)
    corners = ijk_to_ras(heatmap) @ np.array([[2, 4, 3, 1], [9, 11, 8, 1]]).T
    segmentation, segment = box_segmentation(scene, heatmap, corners[:3].min(axis=1), corners[:3].max(axis=1))
    ui.segmentSelector.setCurrentNode(segmentation)
    ui.segmentSelector.setCurrentSegmentID(segment)
    ui.thresholdSlider.value = 50.0
    ui.compareButton.click()

    def state():
        return scene.GetNumberOfNodes(), volume.GetReferenceCount(), heatmap.GetReferenceCount()

    before = state()
    for index in range(10):
        ui.thresholdSlider.value = 5.0 * index
        ui.opacitySlider.value = 0.05 * index
    for _ in range(10):
        ui.compareButton.click()
    assert state() == before and not panel.app.errors


def test_the_parameter_node_is_saved_with_the_scene_and_close_scene_resets_the_panel(panel, served, tmp_path):
    ui, scene, widget = panel.ui, panel.scene, panel.widget
    ui.timeoutSpinBox.value = 45  # kept with the server URL when connecting
    connect(panel, served["url"])
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    choose(ui.modelComboBox, "classifier_3d")
    choose(ui.methodComboBox, "smoothgrad")
    field, _kind = widget.parameter_widgets["n_samples"]
    field.value = 3
    explain(panel, volume, "classifier_3d", "smoothgrad")
    ui.thresholdSlider.value, ui.opacitySlider.value = 80.0, 0.25
    node = widget.logic.getParameterNode().parameterNode  # the real vtkMRMLScriptedModuleNode
    saved = {name: node.GetParameter(name) for name in ("serverUrl", "model", "method", "parameters")}
    assert saved == {
        "serverUrl": served["url"],
        "model": "classifier_3d",
        "method": "smoothgrad",
        "parameters": '{"n_samples": 3}',
    }
    assert (node.GetParameter("thresholdPercentile"), node.GetParameter("opacity")) == ("80.0", "0.25")
    assert ui.heatmapComboBox.count == 1
    saved_scene = save_scene(scene, tmp_path)

    scene.Clear(0)  # Close Scene: the map list, table and result are reset, the parameters are defaults
    assert ui.heatmapComboBox.count == 0 and ui.metricsTableView.mrmlTableNode() is None
    assert ui.resultLabel.text == "" and ui.thresholdSlider.value == 0.0 and ui.opacitySlider.value == 0.5
    assert enabled(ui) == {"connectButton", "batchVolumesButton"}  # still connected; no volume to explain

    scene.SetURL(str(saved_scene))
    assert scene.Import()  # a saved scene reopens with its maps and parameters, the model and method chosen again
    assert (ui.thresholdSlider.value, ui.opacitySlider.value, ui.timeoutSpinBox.value) == (80.0, 0.25, 45)
    assert (ui.modelComboBox.currentText, ui.methodComboBox.currentData) == ("classifier_3d", "smoothgrad")
    assert widget.parameter_widgets["n_samples"][0].value == 3
    assert ui.heatmapComboBox.count == 1 and "smoothgrad" in ui.resultLabel.text and not panel.app.errors


def test_errors_are_shown_with_their_details_and_the_panel_goes_on(panel, served):
    ui, app = panel.ui, panel.app
    dead_url = f"http://127.0.0.1:{free_port()}"
    connect(panel, dead_url)
    assert "cannot reach the server" in ui.statusLabel.text and enabled(ui) == {"connectButton"}
    text, details = app.errors[-1]
    assert text.startswith("Connecting:\ncannot reach the server") and dead_url in details
    connect(panel, served["url"])
    volume = load_volume(panel.scene, served["items"]["volume_nii"]["path"])
    ui.inputVolumeSelector.setCurrentNode(volume)
    choose(ui.modelComboBox, "classifier_2d")  # a 3D volume to a 2D model: refused before upload
    ui.explainButton.click()
    panel.app.run_until(lambda: panel.widget.job is None)
    assert "3D volume" in app.errors[-1][0] and "classifier_2d" in app.errors[-1][0] and not ui.heatmapComboBox.count
    choose(ui.modelComboBox, "classifier_3d")
    choose(ui.methodComboBox, "integrated_gradients")
    json_field = next(field for field, kind in panel.widget.parameter_widgets.values() if kind == "json")
    json_field.text = "[1, 2"
    ui.explainButton.click()
    assert "is not JSON" in app.errors[-1][0] and panel.widget.job is None
    assert "Traceback" not in "".join(text + details for text, details in app.errors)


def test_a_server_with_tokens_is_used_with_the_token_typed_in_the_panel(panel, tmp_path):
    """A server of its own on 127.0.0.1 with the reader and operator tokens set: without the
    token the panel says what the server wants, with it the panel connects and explains; the token
    is kept neither in the scene's parameter node nor in the settings."""
    reader, operator = "reader-" + "r" * 24, "operator-" + "o" * 24
    save_tiny_checkpoint(tmp_path / "model" / "classifier_3d.pt", 3, seed=1)
    items = make_studies(tmp_path / "studies")
    server = start_background_server(
        tmp_path / "studies",
        conf={"model_dir": str(tmp_path / "model")},
        workdir=tmp_path / "run",
        extra_env={"MONAI_SAL_READER_TOKEN": reader, "MONAI_SAL_OPERATOR_TOKEN": operator, "OMP_NUM_THREADS": "1"},
    )
    ui, app = panel.ui, panel.app
    try:
        connect(panel, server.url)
        assert "(401)" in ui.statusLabel.text and "Bearer" in ui.statusLabel.text
        ui.tokenLineEdit.text = reader
        connect(panel, server.url)
        assert "Connected to" in ui.statusLabel.text and ui.modelComboBox.count == 1
        explain(panel, load_volume(panel.scene, items["volume_nii"]["path"]), "classifier_3d", "gradient")
        assert ui.heatmapComboBox.count == 1, app.errors[-1:]
    finally:
        server.stop()
    saved = save_scene(panel.scene, tmp_path).read_text()
    assert reader not in saved and reader not in str(QSettings.store)


def test_the_modules_self_test_passes_against_the_real_server(panel, served, monkeypatch):
    monkeypatch.setenv("SALIENCYMAPS_SERVER_URL", served["url"])
    test = panel.module.SaliencyMapsTest()
    test.runTest()  # what Slicer's "Reload and Test" runs
    assert test.messages[-1] == "SaliencyMaps self-test passed" and len(test.messages) == 5
