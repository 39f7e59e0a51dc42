"""The module's self-test: the whole workflow against a running server, on the workflow's scene.
Slicer runs it as ``SaliencyMapsTest``; the tests run the same function headless."""

from __future__ import annotations

import numpy as np

from SaliencyMapsLib import scene as scene_logic
from SaliencyMapsLib.batch import items_for_methods

__all__ = ["run_self_test"]


def run_self_test(workflow, url: str) -> list[str]:
    """Connect to ``url`` (a server with a 3D model), explain a volume made here, show the map,
    compare it with a box segment, run a batch of two methods, and check that a single slice is
    refused by the 3D model. AssertionError at the first check that fails; returns the checks done."""
    scene, done = workflow.scene, []
    models = workflow.connect(url)
    model = next(name for name, entry in models.items() if entry["dimension"] == 3)
    field = np.random.default_rng(0).random((24, 32, 32)).astype(np.float32)
    volume = scene_logic.volume_from_array(scene, field, np.diag([1.5, 1.2, 2.0, 1.0]), "self-test volume")
    heatmap = workflow.explain(volume, model, "gradcam")
    assert scene_logic.heatmap_nodes(scene, volume) == [heatmap], "the map is not listed"
    map_bounds, volume_bounds = [0.0] * 6, [0.0] * 6
    heatmap.GetRASBounds(map_bounds)
    volume.GetRASBounds(volume_bounds)
    assert np.allclose(map_bounds, volume_bounds, atol=1e-3), f"the map covers {map_bounds}, not {volume_bounds}"
    assert workflow.show(heatmap, 0.5, 90.0) is not None, "no threshold at the 90th percentile"
    done.append(f"explained and shown with {model}")
    mask = np.zeros(field.shape, dtype=np.uint8)
    mask[8:16, 10:20, 12:22] = 1
    labelmap = scene_logic.volume_from_array(scene, mask, np.diag([1.5, 1.2, 2.0, 1.0]), "lesion", labelmap=True)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "self-test segmentation")
    assert workflow.segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, segmentation), "no segment"
    scene.RemoveNode(labelmap)
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    scores, table, _chart = workflow.compare([heatmap], segmentation, segment_id, 90.0)
    assert 0.0 <= scores[heatmap.GetName()]["roc_auc"] <= 1.0 and table.GetNumberOfRows() > 5, "no metrics"
    done.append("compared with a segment")
    report = workflow.batch_job(items_for_methods(volume, model, ["gradient", "gradcam"])).wait()
    assert len(report.done) == 2 and not report.failed, report.summary()
    done.append("batch of two methods")
    flat = scene_logic.volume_from_array(scene, field[:1], np.eye(4), "self-test single slice")
    try:
        workflow.explain(flat, model, "gradcam")
    except scene_logic.SceneError as error:
        assert "single-slice (2D) image" in str(error), str(error)
    else:
        raise AssertionError("a single slice was not refused by a 3D model")
    done.append("a single slice refused by the 3D model")
    return done
