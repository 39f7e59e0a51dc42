"""SaliencyMaps: saliency maps of a monai-sal server over the patient's images in 3D Slicer.

The widget only wires the UI to ``SaliencyMapsLib`` (REST client, scene logic, metrics, trust text,
batch), which needs neither Qt nor the application and is tested headless with pytest.
"""

import json
import os

import qt
import slicer
from SaliencyMapsLib import scene as scene_logic
from SaliencyMapsLib.batch import jobs_for_methods, jobs_for_volumes
from SaliencyMapsLib.client import ServerError
from SaliencyMapsLib.comparison import metrics_available
from SaliencyMapsLib.logic import SaliencyMapsWorkflow
from SaliencyMapsLib.trust import trust_lines, trust_tag
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

SETTINGS_URL = "SaliencyMaps/ServerURL"
DEFAULT_URL = "http://127.0.0.1:8000"
EXPECTED_ERRORS = (ServerError, scene_logic.SceneError, ValueError)


class SaliencyMaps(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Saliency Maps"
        self.parent.categories = ["Explainability"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["monai-sal developers"]
        self.parent.helpText = (
            "Saliency maps of a classifier served by a monai-sal MONAI Label server, shown over the image, "
            "measured against a segment, with each method's trust card."
        )
        self.parent.acknowledgementText = "Built on MONAI, MONAI Label and 3D Slicer."


class SaliencyMapsLogic(ScriptedLoadableModuleLogic, SaliencyMapsWorkflow):
    """The library's workflow on Slicer's scene with the segmentations module's logic."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        SaliencyMapsWorkflow.__init__(self, slicer.mrmlScene, slicer.modules.segmentations.logic())


class SaliencyMapsWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/SaliencyMaps.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        for widget in (self.ui.inputVolumeSelector, self.ui.segmentSelector, self.ui.metricsTableView):
            widget.setMRMLScene(slicer.mrmlScene)
        self.logic = SaliencyMapsLogic()
        self.parameter_widgets = {}
        self.cancel_requested = False
        self.ui.serverUrlLineEdit.text = qt.QSettings().value(SETTINGS_URL, DEFAULT_URL)
        self.ui.connectButton.clicked.connect(self.on_connect)
        self.ui.modelComboBox.currentIndexChanged.connect(self.on_model)
        self.ui.methodComboBox.currentIndexChanged.connect(self.on_method)
        self.ui.explainButton.clicked.connect(self.on_explain)
        self.ui.heatmapComboBox.currentIndexChanged.connect(self.on_show)
        self.ui.opacitySlider.valueChanged.connect(self.on_show)
        self.ui.thresholdSlider.valueChanged.connect(self.on_show)
        self.ui.compareButton.clicked.connect(self.on_compare)
        self.ui.exportCsvButton.clicked.connect(self.on_export)
        self.ui.batchVolumesButton.clicked.connect(lambda: self.on_batch(all_volumes=True))
        self.ui.batchMethodsButton.clicked.connect(lambda: self.on_batch(all_volumes=False))
        self.ui.cancelButton.clicked.connect(self.on_cancel)
        self.table_node = None
        missing = metrics_available()
        self.say(missing or "Not connected.")

    # ------------------------------------------------------------------ helpers

    def say(self, text):
        self.ui.statusLabel.text = text

    def run(self, action, what):
        """Run ``action``; an expected error is shown in the module and in a dialog, never only in
        the console."""
        try:
            with slicer.util.WaitCursor():
                return action()
        except EXPECTED_ERRORS as error:
            self.say(f"{what} failed: {error}")
            slicer.util.errorDisplay(f"{what} failed:\n{error}")
        except Exception as error:  # a bug: say so in the module too, with the traceback in the console
            self.say(f"{what} failed unexpectedly: {type(error).__name__}: {error}")
            slicer.util.errorDisplay(f"{what} failed unexpectedly:\n{error}", detailedText=str(error))
            raise
        return None

    def model(self):
        return self.ui.modelComboBox.currentText

    def method(self):
        return self.ui.methodComboBox.currentData

    def params(self):
        """The parameters as set in the form (only those that differ from the defaults)."""
        defaults = self.logic.methods(self.model())[self.method()]["defaults"]
        chosen = {}
        for name, widget in self.parameter_widgets.items():
            if isinstance(widget, qt.QCheckBox):
                value = widget.checked
            elif isinstance(widget, (qt.QSpinBox, qt.QDoubleSpinBox)):
                value = widget.value
            elif isinstance(defaults[name], str):
                value = widget.text
            else:  # None or a list: JSON
                value = json.loads(widget.text) if widget.text.strip() else None
            if value != defaults[name]:
                chosen[name] = value
        return chosen

    # ------------------------------------------------------------------ slots

    def on_connect(self):
        url = self.ui.serverUrlLineEdit.text.strip()
        models = self.run(lambda: self.logic.connect(url, timeout=self.ui.timeoutSpinBox.value), "Connecting")
        if models is None:
            return
        qt.QSettings().setValue(SETTINGS_URL, url)
        self.ui.modelComboBox.clear()
        for name in models:
            self.ui.modelComboBox.addItem(name)
        self.say(f"Connected to {url}: {len(models)} models.")

    def on_model(self):
        if not self.model():
            return
        entry = self.logic.model(self.model())
        self.ui.methodComboBox.clear()
        for method in entry["methods"]:
            self.ui.methodComboBox.addItem(f"{method}  [{trust_tag(entry.get('trust'), method)}]", method)
        self.ui.targetComboBox.clear()
        self.ui.targetComboBox.addItem("predicted class", None)
        for index, label in enumerate(entry["labels"]):
            self.ui.targetComboBox.addItem(label, index)
        self.say(f"{self.model()}: {entry['dimension']}D, device {entry.get('device', '?')}.")

    def on_method(self):
        form = self.ui.parametersWidget.layout()
        while form.rowCount():
            form.removeRow(0)
        self.parameter_widgets = {}
        if not self.method():
            return
        spec = self.logic.methods(self.model())[self.method()]
        bounds = spec.get("bounds", {})
        for name, value in spec["defaults"].items():
            if isinstance(value, bool):
                widget = qt.QCheckBox()
                widget.checked = value
            elif isinstance(value, int):
                widget = qt.QSpinBox()
                widget.setRange(-(10**9), int(bounds.get(name, 10**9)))
                widget.value = value
            elif isinstance(value, float):
                widget = qt.QDoubleSpinBox()
                widget.setDecimals(6)
                widget.setRange(-1e9, float(bounds.get(name, 1e9)))
                widget.value = value
            elif isinstance(value, str):
                widget = qt.QLineEdit(value)
            else:  # None (automatic) or a list, as JSON
                widget = qt.QLineEdit(json.dumps(value))
            widget.toolTip = f"default {value!r}" + (f", at most {bounds[name]}" if name in bounds else "")
            form.addRow(name, widget)
            self.parameter_widgets[name] = widget
        self.ui.methodTrustLabel.text = "\n".join(
            trust_lines(self.logic.model(self.model()).get("trust"), self.method())
        )

    def on_explain(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is None:
            self.say("Choose a volume first.")
            return
        target = self.ui.targetComboBox.currentData
        heatmap = self.run(
            lambda: self.logic.explain(volume, self.model(), self.method(), self.params(), target), "Explaining"
        )
        if heatmap is not None:
            self.refresh_heatmaps(select=heatmap)

    def refresh_heatmaps(self, select=None):
        self.ui.heatmapComboBox.blockSignals(True)
        self.ui.heatmapComboBox.clear()
        for node in scene_logic.heatmap_nodes(slicer.mrmlScene):
            self.ui.heatmapComboBox.addItem(node.GetName(), node.GetID())
        self.ui.heatmapComboBox.blockSignals(False)
        if select is not None:
            self.ui.heatmapComboBox.setCurrentIndex(self.ui.heatmapComboBox.findData(select.GetID()))
        self.on_show()

    def current_heatmap(self):
        node_id = self.ui.heatmapComboBox.currentData
        return slicer.mrmlScene.GetNodeByID(node_id) if node_id else None

    def on_show(self):
        heatmap = self.current_heatmap()
        if heatmap is None:
            return
        values = slicer.util.arrayFromVolume(heatmap)
        low, high = float(values.min()), float(values.max())
        slider = self.ui.thresholdSlider
        slider.blockSignals(True)
        slider.minimum, slider.maximum, slider.singleStep = low, high, (high - low) / 100 or 1.0
        slider.blockSignals(False)
        result = scene_logic.heatmap_result(heatmap)
        source = slicer.mrmlScene.GetNodeByID(heatmap.GetAttribute(scene_logic.ATTRIBUTE + "SourceVolumeID") or "")
        self.run(
            lambda: scene_logic.show_heatmap(
                slicer.mrmlScene,
                heatmap,
                source,
                self.ui.opacitySlider.value,
                slider.value if slider.value > low else None,
            ),
            "Showing the map",
        )
        probabilities = ", ".join(f"{label} {p:.3f}" for label, p in result.get("probabilities", {}).items())
        self.ui.resultLabel.text = (
            f"{result.get('model')} / {result.get('method')} / target {result.get('target', {}).get('label')}\n"
            f"probabilities: {probabilities}\n" + "\n".join(trust_lines(result.get("trust")))
        )

    def on_compare(self):
        segmentation = self.ui.segmentSelector.currentNode()
        segment_id = self.ui.segmentSelector.currentSegmentID()
        if segmentation is None or not segment_id:
            self.say("Choose a segmentation and a segment first.")
            return
        if self.ui.compareAllCheckBox.checked:  # every map of the selected volume
            heatmaps = scene_logic.heatmap_nodes(slicer.mrmlScene, self.ui.inputVolumeSelector.currentNode())
        else:
            heatmaps = [node for node in [self.current_heatmap()] if node is not None]
        slider = self.ui.thresholdSlider
        threshold = slider.value if slider.value > slider.minimum else None
        found = self.run(lambda: self.logic.compare(heatmaps, segmentation, segment_id, threshold), "Comparing")
        if found is None:
            return
        _, self.table_node, chart = found
        self.ui.metricsTableView.setMRMLTableNode(self.table_node)
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        self.say(f"Compared {self.table_node.GetNumberOfColumns() - 1} maps with the segment.")

    def on_export(self):
        if self.table_node is None:
            self.say("Compare a map with a segment first.")
            return
        path = qt.QFileDialog.getSaveFileName(None, "Export metrics", "saliency_metrics.csv", "CSV (*.csv)")
        if path:
            self.run(lambda: scene_logic.save_table_csv(slicer.mrmlScene, self.table_node, path), "Exporting")

    def on_cancel(self):
        self.cancel_requested = True

    def on_batch(self, all_volumes):
        volume = self.ui.inputVolumeSelector.currentNode()
        if all_volumes:
            volumes = [  # the images: no heatmap, no labelmap
                node
                for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if node.GetAttribute(scene_logic.ATTRIBUTE + "Method") is None
                and not node.IsA("vtkMRMLLabelMapVolumeNode")
            ]
            jobs = jobs_for_volumes(volumes, self.model(), self.method(), self.params())
        elif volume is not None:
            jobs = jobs_for_methods(volume, self.model(), list(self.logic.methods(self.model())))
        else:
            self.say("Choose a volume first.")
            return
        self.cancel_requested = False
        bar = self.ui.batchProgressBar

        def progress(done, total, title):
            bar.maximum, bar.value = total, done
            self.say(f"{done}/{total}: {title}")
            slicer.app.processEvents()  # lets Cancel be clicked between jobs

        report = self.run(lambda: self.logic.run_batch(jobs, progress, lambda: self.cancel_requested), "Batch")
        if report is not None:
            self.say(report.summary())
            self.refresh_heatmaps()


class SaliencyMapsTest(ScriptedLoadableModuleTest):
    """The whole workflow against a running server: SALIENCYMAPS_SERVER_URL, else the module's URL."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_workflow()

    def test_workflow(self):
        import numpy as np

        url = os.environ.get("SALIENCYMAPS_SERVER_URL") or qt.QSettings().value(SETTINGS_URL, DEFAULT_URL)
        logic = SaliencyMapsLogic()
        models = logic.connect(url)
        model = next(name for name, entry in models.items() if entry["dimension"] == 3)
        field = np.random.default_rng(0).random((24, 32, 32)).astype(np.float32)
        volume = slicer.util.addVolumeFromArray(field, ijkToRAS=np.diag([1.5, 1.2, 2.0, 1.0]), name="test volume")
        heatmap = logic.explain(volume, model, "gradcam")
        self.assertEqual(slicer.util.arrayFromVolume(heatmap).shape, field.shape)
        scene_logic.show_heatmap(slicer.mrmlScene, heatmap, volume, 0.5, None)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segment_id = segmentation.GetSegmentation().AddEmptySegment("lesion")
        mask = np.zeros(field.shape, dtype=np.uint8)
        mask[8:16, 10:20, 12:22] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, volume)
        scores, table, _ = logic.compare([heatmap], segmentation, segment_id, threshold=None)
        self.assertIn("roc_auc", scores[heatmap.GetName()])
        self.assertGreater(table.GetNumberOfRows(), 5)
        report = logic.run_batch(jobs_for_methods(volume, model, ["gradient", "gradcam"]))
        self.assertEqual(len(report.done), 2)
        flat = slicer.util.addVolumeFromArray(field[:1], name="single slice")
        with self.assertRaises(scene_logic.SceneError):
            logic.explain(flat, model, "gradcam")
        self.delayDisplay("SaliencyMaps workflow passed")
