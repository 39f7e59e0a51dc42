"""The module's workflow on a scene: connect, explain a volume, show a map, compare maps with a
segment, batch.

:class:`SaliencyMapsWorkflow` holds the server client and what ``/info`` said; everything else
lives in the scene (heatmap nodes carry their answer). Each request is a :class:`~jobs.Step`: the
module runs it in a :class:`~jobs.BackgroundJob` polled by a timer, so Slicer never waits on the
network; :meth:`connect` and :meth:`explain` run one to its end on the calling thread (scripts,
the self-test). The module's Logic holds one, given ``slicer.mrmlScene`` and the segmentations
and colours modules' logics; the tests give it a bare scene and slicer-core's logics.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from SaliencyMapsLib import scene as scene_logic
from SaliencyMapsLib.batch import BatchItem
from SaliencyMapsLib.client import ExplainResult, ServerClient, ServerError, saliency_models
from SaliencyMapsLib.comparison import compare_map, roc_points
from SaliencyMapsLib.jobs import BackgroundJob, Step
from SaliencyMapsLib.scene import SceneError

__all__ = ["SaliencyMapsWorkflow"]


class SaliencyMapsWorkflow:
    """``SaliencyMapsWorkflow(scene, segmentations_logic, color_logic=None)``; ``color_logic``
    (the Colors module's) adds a colour legend to the maps shown."""

    def __init__(self, scene, segmentations_logic, color_logic=None) -> None:
        self.scene = scene
        self.segmentations_logic = segmentations_logic
        self.color_logic = color_logic
        self.client: ServerClient | None = None
        self.info: dict = {}
        self.models: dict[str, dict] = {}

    # ---------------------------------------------------------------- server

    def connect_step(self, url: str, timeout: float = 120.0, token: str = "") -> Step:
        """Read ``/info`` of the server at ``url`` (with ``token`` for a server that asks for one);
        the step's result is its saliency models (name -> entry). ServerError when it cannot be
        reached, refuses the token or serves no saliency model."""

        def start():
            client = ServerClient(url, timeout, token)
            return lambda cancellation: (client, client.info(cancellation))

        def finish(answer) -> dict[str, dict]:
            client, info = answer
            models = saliency_models(info)
            if not models:
                raise ServerError(f"{client.url} serves no saliency model (is it a monai-sal server?)")
            self.client, self.info, self.models = client, info, models
            return models

        return Step(f"connect to {url}", start, finish)

    def connect(self, url: str, timeout: float = 120.0, token: str = "") -> dict[str, dict]:
        """:meth:`connect_step` run to its end."""
        return _run_one(self.connect_step(url, timeout, token))

    def model(self, name: str) -> dict:
        if self.client is None:
            raise ServerError("not connected: connect to a server first")
        if name not in self.models:
            raise ServerError(f"the server has no model {name!r}; it serves {', '.join(self.models)}")
        return self.models[name]

    def methods(self, model: str) -> dict[str, dict]:
        """Method name -> {"defaults", "bounds", "summary", ...} as ``/info`` lists them for ``model``."""
        return dict(self.model(model)["methods"])

    def device(self, model: str) -> str:
        return str(self.model(model).get("device", "unknown"))

    # ---------------------------------------------------------------- explain

    def explain_step(self, volume, model: str, method: str, params: dict | None = None, target=None) -> Step:
        """Explain ``volume`` (a scalar volume node) with ``model`` and ``method``: the step's result
        is the new heatmap node (on the volume's physical geometry, named ``<volume> <method> <target>``).
        The volume is checked and written for upload when the step starts, on the GUI thread."""

        def start():
            entry = self.model(model)
            if method not in entry["methods"]:
                raise ServerError(f"model {model} does not offer {method!r}; it offers {', '.join(entry['methods'])}")
            scene_logic.check_dimension(volume, model, entry["dimension"])
            client = self.client
            folder = Path(tempfile.mkdtemp(prefix="saliencymaps_"))
            try:
                path = scene_logic.upload_file(self.scene, volume, folder, entry.get("input_formats", ("nrrd",)))
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise

            def request(cancellation) -> ExplainResult:
                try:
                    return client.explain(model, path, method, params, target, cancellation=cancellation)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)

            return request

        def finish(answer: ExplainResult):
            name = f"{volume.GetName()} {method} {answer.target_label}".strip()
            return scene_logic.load_heatmap(self.scene, answer.heatmap, name, volume, answer.result)

        return Step(f"{volume.GetName()} / {model} / {method}", start, finish)

    def explain(self, volume, model: str, method: str, params: dict | None = None, target=None):
        """:meth:`explain_step` run to its end: the new heatmap node."""
        return _run_one(self.explain_step(volume, model, method, params, target))

    def batch_job(self, items: Sequence[BatchItem]) -> BackgroundJob:
        """A job of one :meth:`explain_step` per item; a failed item is recorded and the job goes on."""
        return BackgroundJob([self.explain_step(i.volume, i.model, i.method, i.params) for i in items])

    # ---------------------------------------------------------------- show and compare

    def show(self, heatmap, opacity: float, threshold_percentile: float) -> float | None:
        """Show ``heatmap`` over the volume it explains (``scene.show_heatmap``) with values below
        its ``threshold_percentile`` (0-100; 0 shows all) hidden; returns that threshold in map
        units (None for 0)."""
        threshold = scene_logic.threshold_at_percentile(heatmap, threshold_percentile)
        source = self.scene.GetNodeByID(heatmap.GetAttribute(scene_logic.ATTRIBUTE + "SourceVolumeID") or "")
        scene_logic.show_heatmap(self.scene, heatmap, source, opacity, threshold, self.color_logic)
        return threshold

    def compare(self, heatmaps: Sequence, segmentation_node, segment_id: str, threshold_percentile: float = 0.0):
        """Score each heatmap node against the segment brought onto its grid, Dice at each map's
        ``threshold_percentile`` (the viewer's; 0: none); returns ``(scores, table node, ROC chart
        node)`` with scores: heatmap name -> {metric: value}, ``threshold`` (map units) first when
        a percentile is given. The table, chart and series nodes are the same at every call."""
        import slicer

        if not heatmaps:
            raise SceneError("no heatmap to compare: explain a volume first")
        scores, curves = {}, {}
        for heatmap in heatmaps:
            mask = scene_logic.segment_mask(
                self.scene, segmentation_node, segment_id, heatmap, self.segmentations_logic
            )
            saliency = slicer.util.arrayFromVolume(heatmap)
            method = scene_logic.heatmap_result(heatmap).get("method", "")
            threshold = scene_logic.threshold_at_percentile(heatmap, threshold_percentile)
            found = {} if threshold is None else {"threshold": threshold}
            found.update(compare_map(saliency, mask, threshold, method))
            scores[heatmap.GetName()] = found
            curves[heatmap.GetName()] = roc_points(saliency, mask)
        table = scene_logic.metrics_table(self.scene, scores)
        chart = scene_logic.roc_chart(self.scene, curves)
        return scores, table, chart


def _run_one(step: Step):
    """Run one step to its end on this thread: its result, or its error raised."""
    report = BackgroundJob([step]).wait()
    if report.failed:
        raise report.failed[0][1]
    return report.done[0][1]
