"""The module's workflow on a scene: connect, explain a volume, compare maps with a segment, batch.

:class:`SaliencyMapsWorkflow` holds the server client and what ``/info`` said; everything else
lives in the scene (heatmap nodes carry their answer). The Slicer module's Logic class is this,
given ``slicer.mrmlScene`` and the segmentations module logic; the tests give it a bare scene.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from SaliencyMapsLib import scene as scene_logic
from SaliencyMapsLib.batch import BatchReport, Job, run_batch
from SaliencyMapsLib.client import ExplainResult, ServerClient, ServerError, saliency_models
from SaliencyMapsLib.comparison import compare_map, roc_points
from SaliencyMapsLib.scene import SceneError

__all__ = ["SaliencyMapsWorkflow"]


class SaliencyMapsWorkflow:
    """``SaliencyMapsWorkflow(scene, segmentations_logic)``; then :meth:`connect`, :meth:`explain`,
    :meth:`compare`, :meth:`run_batch`."""

    def __init__(self, scene, segmentations_logic) -> None:
        self.scene = scene
        self.segmentations_logic = segmentations_logic
        self.client: ServerClient | None = None
        self.info: dict = {}
        self.models: dict[str, dict] = {}

    # ---------------------------------------------------------------- server

    def connect(self, url: str, timeout: float = 120.0) -> dict[str, dict]:
        """Read ``/info`` of the server at ``url``; returns its saliency models (name -> entry).
        ServerError when it cannot be reached or serves no saliency model."""
        client = ServerClient(url, timeout)
        info = client.info()
        models = saliency_models(info)
        if not models:
            raise ServerError(f"{client.url} serves no saliency model (is it a monai-sal server?)")
        self.client, self.info, self.models = client, info, models
        return models

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

    def explain(self, volume, model: str, method: str, params: dict | None = None, target=None):
        """Explain ``volume`` (a scalar volume node) with ``model`` and ``method``; returns the new
        heatmap node (on the volume's physical geometry, named ``<volume> <method> <target>``)."""
        entry = self.model(model)
        if method not in entry["methods"]:
            raise ServerError(f"model {model} does not offer {method!r}; it offers {', '.join(entry['methods'])}")
        scene_logic.check_dimension(volume, model, entry["dimension"])
        folder = Path(tempfile.mkdtemp(prefix="saliencymaps_"))
        try:
            path = scene_logic.upload_file(self.scene, volume, folder, entry.get("input_formats", ("nrrd",)))
            answer: ExplainResult = self.client.explain(model, path, method, params, target)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        name = f"{volume.GetName()} {method} {answer.target_label}".strip()
        return scene_logic.load_heatmap(self.scene, answer.heatmap, name, volume, answer.result)

    def run_batch(
        self,
        jobs: Sequence[Job],
        progress: Callable[[int, int, str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> BatchReport:
        """:meth:`explain` for each job, with progress and cancel (``batch.run_batch``)."""
        return run_batch(
            jobs, lambda job: self.explain(job.volume, job.model, job.method, job.params), progress, cancelled
        )

    # ---------------------------------------------------------------- compare

    def compare(self, heatmaps: Sequence, segmentation_node, segment_id: str, threshold: float | None = None):
        """Score each heatmap node against the segment brought onto its grid; returns
        ``(scores, table node, ROC chart node)`` with scores: heatmap name -> {metric: value}."""
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
            scores[heatmap.GetName()] = compare_map(saliency, mask, threshold, method)
            curves[heatmap.GetName()] = roc_points(saliency, mask)
        table = scene_logic.metrics_table(self.scene, scores)
        chart = scene_logic.roc_chart(self.scene, curves)
        return scores, table, chart
