"""SaliencyMaps (Slicer 5.6 to 5.10, Python 3.9 and 3.12): the widget wires Resources/UI/SaliencyMaps.ui to
``SaliencyMapsLib`` (no Qt, tested headless); each request runs in a ``jobs.BackgroundJob`` polled by a
``qt.QTimer``, so Slicer stays responsive and Cancel aborts the request in flight."""

import contextlib
import json
import os

import qt
import slicer
from SaliencyMapsLib import batch, client, jobs, logic, parameters, selftest, trust
from SaliencyMapsLib import scene as scene_logic
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # an application built without translations
    _ = str


DEFAULT_URL = "http://127.0.0.1:8000"
SETTINGS_URL = "SaliencyMaps/ServerURL"  # the last server connected to, for a new scene
POLL_MS = 100  # how often the GUI thread looks at the request in flight
EXPECTED_ERRORS = (client.ServerError, ValueError)  # scene_logic.SceneError is a ValueError
DOCUMENTATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "SLICER.md")


class SaliencyMaps(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Saliency Maps")
        self.parent.categories = [_("Explainability")]
        self.parent.dependencies = ["Segmentations", "Colors", "Plots"]
        self.parent.contributors = ["monai-sal maintainers (monai-sal project)"]
        link = f'<a href="{qt.QUrl.fromLocalFile(os.path.normpath(DOCUMENTATION)).toString()}">docs/SLICER.md</a>'
        self.parent.helpText = _(
            "Saliency maps of a classifier served by a monai-sal MONAI Label server, over the image, measured "
            "against a segment, with each method's trust card. See {link} in the monai-sal repository."
        ).format(link=link)
        self.parent.acknowledgementText = _("Built on MONAI, MONAI Label and 3D Slicer.")


@parameterNodeWrapper
class SaliencyMapsParameterNode:
    """Saved with the scene: server URL, timeout (s), model, method, its non-default parameters (JSON),
    lower threshold (percentile of the map's values, 0-100; 0 shows all), the map's opacity (0-1)."""

    serverUrl: str = DEFAULT_URL
    timeout: int = 120
    model: str = ""
    method: str = ""
    parameters: str = "{}"
    thresholdPercentile: float = 0.0
    opacity: float = 0.5


class SaliencyMapsLogic(ScriptedLoadableModuleLogic):
    """Holds (not inherits: Slicer's base calls a cooperative ``super().__init__()``) the Lib's workflow."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        segmentations, colors = slicer.modules.segmentations.logic(), slicer.modules.colors.logic()
        self.workflow = logic.SaliencyMapsWorkflow(slicer.mrmlScene, segmentations, colors)

    def getParameterNode(self):
        return SaliencyMapsParameterNode(super().getParameterNode())


class SaliencyMapsWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._parameterNode, self.parameter_widgets, self.table_node = None, {}, None
        self.job, self.job_what, self.job_done = None, "", None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/SaliencyMaps.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = ui = slicer.util.childWidgetVariables(ui_widget)
        for widget in (ui.inputVolumeSelector, ui.segmentSelector, ui.metricsTableView):
            widget.setMRMLScene(slicer.mrmlScene)
        self.logic = SaliencyMapsLogic()
        self.workflow = self.logic.workflow
        self.timer = qt.QTimer()
        self.timer.timeout.connect(self.on_poll)
        scene = slicer.mrmlScene
        for event in (scene.EndCloseEvent, scene.EndImportEvent):
            self.addObserver(scene, event, self.on_scene_end)
        for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent):
            self.addObserver(scene, event, self.on_nodes_changed)
        for signal, slot in (
            (ui.connectButton.clicked, self.on_connect),
            (ui.modelComboBox.currentIndexChanged, self.on_model),
            (ui.methodComboBox.currentIndexChanged, self.on_method),
            (ui.inputVolumeSelector.currentNodeChanged, self.update_buttons),
            (ui.segmentSelector.currentSegmentChanged, self.update_buttons),
            (ui.explainButton.clicked, self.on_explain),
            (ui.heatmapComboBox.currentIndexChanged, self.on_heatmap),
            (ui.opacitySlider.valueChanged, self.on_display_settings),
            (ui.thresholdSlider.valueChanged, self.on_display_settings),
            (ui.compareButton.clicked, self.on_compare),
            (ui.exportCsvButton.clicked, self.on_export),
            (ui.batchVolumesButton.clicked, lambda: self.on_batch(all_volumes=True)),
            (ui.batchMethodsButton.clicked, lambda: self.on_batch(all_volumes=False)),
            (ui.cancelButton.clicked, self.on_cancel),
        ):
            signal.connect(slot)
        self.enter()
        self.say(_("Not connected."))

    def cleanup(self):
        self.removeObservers()
        self.on_cancel()
        self.timer.stop()

    def enter(self):
        self.initialize_parameter_node()
        self.refresh_heatmaps()

    def initialize_parameter_node(self):
        self._parameterNode = node = self.logic.getParameterNode()
        if node.serverUrl == DEFAULT_URL:  # a new scene starts with the server last connected to
            node.serverUrl = str(qt.QSettings().value(SETTINGS_URL, DEFAULT_URL))
        self.ui.serverUrlLineEdit.text, self.ui.timeoutSpinBox.value = node.serverUrl, node.timeout
        self.ui.opacitySlider.value, self.ui.thresholdSlider.value = node.opacity, node.thresholdPercentile
        if self.ui.modelComboBox.count:  # the saved model and method, when connected
            names = [(name, name) for name in self.workflow.models]
            self.fill(self.ui.modelComboBox, names, node.model)
            self.on_model()

    def on_scene_end(self, caller, event):
        self.on_cancel()  # after Close Scene or a load; the timer has not run since: nothing of it landed
        self.table_node = None
        self.ui.metricsTableView.setMRMLTableNode(None)
        if self.parent.isEntered:
            self.initialize_parameter_node()
        self.refresh_heatmaps()

    def on_nodes_changed(self, caller, event):
        if not (caller.IsImporting() or caller.IsClosing()):  # else on_scene_end lists them
            self.refresh_heatmaps()

    def say(self, text):
        self.ui.statusLabel.text = text

    def show_errors(self, what, failed):
        """The first error in the status line and a dialog, every (title, error) in its details."""
        self.say(f"{what}: {failed[0][1]}")
        details = "\n".join(f"{title}: {error}" if title else str(error) for title, error in failed)
        slicer.util.errorDisplay(f"{what}:\n{failed[0][1]}", detailedText=details)

    def run(self, what, action):
        """``action()``; an expected error shown with details (None returned), a bug by tryWithErrorDisplay."""
        with slicer.util.tryWithErrorDisplay(_("{what}: unexpected error.").format(what=what), waitCursor=True):
            try:
                return action()
            except EXPECTED_ERRORS as error:
                self.show_errors(what, [("", error)])
        return None

    def model(self):
        return self.ui.modelComboBox.currentText

    def method(self):
        return self.ui.methodComboBox.currentData

    def connected(self):
        return self.workflow.client is not None and bool(self.model())

    def current_heatmap(self):
        node_id = self.ui.heatmapComboBox.currentData
        return slicer.mrmlScene.GetNodeByID(node_id) if node_id else None

    def update_buttons(self):
        idle, volume, ui = self.job is None, self.ui.inputVolumeSelector.currentNode(), self.ui
        segment = ui.segmentSelector.currentNode() is not None and bool(ui.segmentSelector.currentSegmentID())
        method = self.connected() and bool(self.method())
        ui.connectButton.enabled = idle
        ui.explainButton.enabled = idle and method and volume is not None
        ui.batchVolumesButton.enabled = idle and method
        ui.batchMethodsButton.enabled = idle and self.connected() and volume is not None
        ui.compareButton.enabled = idle and segment and self.current_heatmap() is not None
        ui.exportCsvButton.enabled = idle and self.table_node is not None
        ui.cancelButton.enabled = not idle

    def params(self):
        shown = {}
        for name, (widget, kind) in self.parameter_widgets.items():
            shown[name] = (
                widget.checked if kind == "bool" else widget.text if kind in ("text", "json") else widget.value
            )
        return parameters.chosen_parameters(self.workflow.methods(self.model())[self.method()]["defaults"], shown)

    @staticmethod
    def fill(combo, items, selected=None):
        """Set (text, data) items silently, select ``selected`` data (or the first); True if it changed."""
        before = combo.currentData
        combo.blockSignals(True)
        combo.clear()
        for text, data in items:
            combo.addItem(text, data)
        combo.setCurrentIndex(max(combo.findData(selected), 0) if combo.count else -1)
        combo.blockSignals(False)
        return combo.currentData != before

    def start_job(self, job, what, done):
        self.job, self.job_what, self.job_done = job, what, done
        self.ui.progressBar.value = 0
        self.ui.progressBar.maximum = len(job.steps) if len(job.steps) > 1 else 0  # 0: a busy bar
        self.update_buttons()
        self.timer.start(POLL_MS)
        self.on_poll()

    def on_poll(self):
        finished = True  # an unexpected error ends the job too
        try:
            with slicer.util.tryWithErrorDisplay(_("{what}: unexpected error.").format(what=self.job_what)):
                finished = self.job.poll()
                if not finished:
                    self.ui.progressBar.value, _total, title, seconds = self.job.progress()
                    self.say(f"{self.job_what}: {title} ({seconds:.0f} s)")
        finally:
            if finished:
                self.end_job()

    def end_job(self):
        job, self.job = self.job, None
        self.timer.stop()
        self.ui.progressBar.maximum = self.ui.progressBar.value = max(len(job.steps), 1)
        self.update_buttons()
        if job.report.failed:
            self.show_errors(self.job_what, job.report.failed)
        elif job.report.cancelled:
            self.say(_("{what}: cancelled.").format(what=self.job_what))
        self.job_done(job.report)

    def on_cancel(self):
        if self.job is not None:
            self.job.cancel()
            self.say(_("Cancelling..."))

    def on_connect(self):
        self._parameterNode.serverUrl = url = self.ui.serverUrlLineEdit.text.strip()
        self._parameterNode.timeout = timeout = int(self.ui.timeoutSpinBox.value)
        token = self.ui.tokenLineEdit.text  # never put in the parameter node or the settings
        self.start_job(
            jobs.BackgroundJob([self.workflow.connect_step(url, timeout, token)]), _("Connecting"), self.on_connected
        )

    def on_connected(self, report):
        if report.done:
            qt.QSettings().setValue(SETTINGS_URL, self.workflow.client.url)
            self.fill(self.ui.modelComboBox, [(name, name) for name in self.workflow.models], self._parameterNode.model)
            self.on_model()
            url, count = self.workflow.client.url, len(self.workflow.models)
            self.say(_("Connected to {url}: {count} models.").format(url=url, count=count))

    def on_model(self):
        if not self.connected():
            return
        entry = self.workflow.model(self.model())
        self._parameterNode.model = self.model()
        card = entry.get("trust")
        methods = [(f"{method}  [{trust.trust_tag(card, method)}]", method) for method in entry["methods"]]
        self.fill(self.ui.methodComboBox, methods, self._parameterNode.method)
        targets = [(_("predicted class"), None)] + [(label, index) for index, label in enumerate(entry["labels"])]
        self.fill(self.ui.targetComboBox, targets)
        self.on_method()

    def on_method(self):
        form = self.ui.parametersWidget.layout()
        while form.rowCount():
            form.removeRow(0)
        self.parameter_widgets = {}
        if not self.method():
            return self.update_buttons()
        node = self._parameterNode
        saved = json.loads(node.parameters or "{}") if node.method == self.method() else {}
        node.method = self.method()
        for field in parameters.form_fields(self.workflow.methods(self.model())[self.method()], saved):
            if field.kind == "bool":
                widget = qt.QCheckBox()
                widget.checked, signal = field.value, widget.toggled
            elif field.kind in ("int", "float"):
                widget = qt.QSpinBox() if field.kind == "int" else qt.QDoubleSpinBox()
                if field.kind == "float":
                    widget.setDecimals(6)
                widget.setRange(-field.maximum, field.maximum)
                widget.value, signal = field.value, widget.valueChanged
            else:
                widget = qt.QLineEdit(field.value)
                signal = widget.textChanged
            widget.toolTip = field.tooltip
            signal.connect(self.on_parameters)
            form.addRow(field.name, widget)
            self.parameter_widgets[field.name] = (widget, field.kind)
        card = self.workflow.model(self.model()).get("trust")
        self.ui.methodTrustLabel.text = "\n".join(trust.trust_lines(card, self.method()))
        self.on_parameters()

    def on_parameters(self):
        with contextlib.suppress(ValueError):  # half-typed JSON: Explain says what is wrong
            self._parameterNode.parameters = json.dumps(self.params())
        self.update_buttons()

    def on_explain(self):
        params = self.run(_("Explaining"), self.params)
        if params is not None:
            volume, target = self.ui.inputVolumeSelector.currentNode(), self.ui.targetComboBox.currentData
            step = self.workflow.explain_step(volume, self.model(), self.method(), params, target)
            self.start_job(jobs.BackgroundJob([step]), _("Explaining"), self.on_explained)

    def on_explained(self, report):
        if report.done:
            self.refresh_heatmaps(select=report.done[0][1])

    def on_batch(self, all_volumes):
        model, method, volume = self.model(), self.method(), self.ui.inputVolumeSelector.currentNode()
        params = self.run(_("Batch"), self.params) if all_volumes else {}
        if params is None:
            return
        if all_volumes:
            items = batch.items_for_volumes(scene_logic.image_volumes(slicer.mrmlScene), model, method, params)
        else:
            items = batch.items_for_methods(volume, model, list(self.workflow.methods(model)))
        self.start_job(self.workflow.batch_job(items), _("Batch"), lambda report: self.say(report.summary()))

    def refresh_heatmaps(self, select=None):
        """List the maps (keep the one shown, or show ``select``); hide them from the volume selector."""
        nodes = scene_logic.heatmap_nodes(slicer.mrmlScene)
        self.ui.inputVolumeSelector.sortFilterProxyModel().hiddenNodeIDs = [node.GetID() for node in nodes]
        combo = self.ui.heatmapComboBox
        wanted = select.GetID() if select is not None else combo.currentData
        if self.fill(combo, [(node.GetName(), node.GetID()) for node in nodes], wanted) or select is not None:
            self.on_heatmap()
        self.update_buttons()

    def on_heatmap(self):
        heatmap = self.current_heatmap()
        self.ui.resultLabel.text = scene_logic.heatmap_summary(heatmap) if heatmap is not None else ""
        self.on_display()

    def on_display_settings(self):
        if self._parameterNode is not None:
            self._parameterNode.opacity = self.ui.opacitySlider.value
            self._parameterNode.thresholdPercentile = self.ui.thresholdSlider.value
        self.on_display()

    def on_display(self):
        opacity, percentile = self.ui.opacitySlider.value, self.ui.thresholdSlider.value
        heatmap = self.current_heatmap()
        if heatmap is not None:
            threshold = self.run(_("Showing the map"), lambda: self.workflow.show(heatmap, opacity, percentile))
            self.ui.thresholdValueLabel.text = (
                _("shows all values")
                if threshold is None
                else _("hides values below {value:.3g}").format(value=threshold)
            )
        self.update_buttons()

    def on_compare(self):
        segmentation, segment_id = self.ui.segmentSelector.currentNode(), self.ui.segmentSelector.currentSegmentID()
        if self.ui.compareAllCheckBox.checked:  # every map of the selected volume
            heatmaps = scene_logic.heatmap_nodes(slicer.mrmlScene, self.ui.inputVolumeSelector.currentNode())
        else:
            heatmaps = [self.current_heatmap()]
        percentile = self.ui.thresholdSlider.value
        found = self.run(_("Comparing"), lambda: self.workflow.compare(heatmaps, segmentation, segment_id, percentile))
        if found is not None:
            _scores, self.table_node, chart = found
            self.ui.metricsTableView.setMRMLTableNode(self.table_node)
            slicer.modules.plots.logic().ShowChartInLayout(chart)
            self.say(_("Compared {count} maps with the segment.").format(count=len(heatmaps)))
        self.update_buttons()

    def on_export(self):
        path = qt.QFileDialog.getSaveFileName(None, _("Export metrics"), "saliency_metrics.csv", "CSV (*.csv)")
        if path:
            self.run(_("Exporting"), lambda: scene_logic.save_table_csv(slicer.mrmlScene, self.table_node, path))


class SaliencyMapsTest(ScriptedLoadableModuleTest):
    """``SaliencyMapsLib.selftest`` against the server at SALIENCYMAPS_SERVER_URL (else the last one used)."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        url = os.environ.get("SALIENCYMAPS_SERVER_URL") or qt.QSettings().value(SETTINGS_URL, DEFAULT_URL)
        for check in selftest.run_self_test(SaliencyMapsLogic().workflow, url):
            self.delayDisplay(check)
        self.delayDisplay(_("SaliencyMaps self-test passed"))
