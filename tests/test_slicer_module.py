"""The SaliencyMaps Slicer module's library against real MRML nodes and the real server.

``slicer-core`` (PyPI) gives the MRML scene, volume, segmentation, table and plot nodes and the
segmentations logic without the Slicer application; the server is the app started on 127.0.0.1.
Positions are compared in RAS (a storage node may order or flip axes differently from the file),
and values voxel for voxel through those positions. What only a running Slicer can check (the
widget, rendered views) is listed in docs/SLICER.md.

slicer-core's ITK has no PNG reader, so "where Slicer puts a PNG" is the PNG read by the ITK
Python package (the library Slicer reads PNG with) and stored as NRRD with that geometry.
"""

from __future__ import annotations

import csv
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import slicer  # slicer-core, in the test extra
from conftest import LONG_REQUEST, REPO, box_segmentation, free_port, ijk_to_ras, load_volume
from SaliencyMapsLib import scene as scene_logic
from SaliencyMapsLib.batch import items_for_methods, items_for_volumes
from SaliencyMapsLib.client import ServerClient, ServerError
from SaliencyMapsLib.colormaps import color_table_node
from SaliencyMapsLib.jobs import BackgroundJob, Step
from SaliencyMapsLib.logic import SaliencyMapsWorkflow
from SaliencyMapsLib.trust import trust_lines, trust_tag
from server_fixtures import SERVED, TIMEOUT_S, smooth_field, write_png

from monai_sal_app.data.io import read_image
from monai_sal_app.inference import explain_array
from monai_sal_app.models.checkpoint import load_classifier

MODELS = {2: "classifier_2d", 3: "classifier_3d"}


@pytest.fixture
def scene(mrml_scene):
    return mrml_scene


@pytest.fixture
def workflow(served, scene):
    flow = SaliencyMapsWorkflow(scene, slicer.vtkSlicerSegmentationsModuleLogic, scene.color_logic)
    flow.connect(served["url"])
    return flow


def voxel_ras(node) -> tuple[np.ndarray, np.ndarray]:
    """Every voxel of a volume node: its (k, j, i) indices (3, n) and RAS centre (3, n)."""
    k, j, i = np.indices(slicer.util.arrayFromVolume(node).shape).reshape(3, -1)
    return np.stack([k, j, i]), (ijk_to_ras(node) @ np.stack([i, j, k, np.ones_like(i)]))[:3]


def voxel_correspondence(heatmap, volume) -> tuple[tuple, tuple]:
    """For every heatmap voxel, the volume voxel at the same RAS position: (heatmap (k, j, i)
    indices, volume (k, j, i) indices) as index tuples; asserts they coincide and cover both grids."""
    (k, j, i), ras = voxel_ras(heatmap)
    ijk = np.linalg.inv(ijk_to_ras(volume)) @ np.vstack([ras, np.ones_like(i)])
    np.testing.assert_allclose(ijk[:3], np.round(ijk[:3]), atol=1e-3)  # on the volume's voxel centres
    vi, vj, vk = np.round(ijk[:3]).astype(int)
    volume_shape = slicer.util.arrayFromVolume(volume).shape
    for index, side in zip((vk, vj, vi), volume_shape):
        assert index.min() >= 0 and index.max() < side  # inside the volume
    assert len(set(zip(vk, vj, vi))) == np.prod(volume_shape)  # one to one, all of the volume
    return (k, j, i), (vk, vj, vi)


def in_process_map(served, model: str, array: np.ndarray, method: str = "gradcam") -> np.ndarray:
    network, card = load_classifier(served["model_dir"] / f"{model}.pt", device="cpu")
    return explain_array(network, card, array, method).saliency


# ------------------------------------------------------------------------------------------------
# connect: menus from /info
# ------------------------------------------------------------------------------------------------


@pytest.mark.server
def test_connect_fills_models_methods_and_parameters_from_info(served, workflow):
    info = requests.get(f"{served['url']}/info/", timeout=30).json()
    assert set(workflow.models) == SERVED
    for name in MODELS.values():
        assert workflow.methods(name) == info["models"][name]["methods"]  # nothing hard-coded
        assert workflow.device(name) == info["models"][name]["device"] == "cpu"
    assert workflow.methods("classifier_2d")["integrated_gradients"]["defaults"]["steps"] > 0


@pytest.mark.server
def test_the_parameter_form_follows_info_and_sends_only_what_differs(workflow):
    from SaliencyMapsLib.parameters import chosen_parameters, form_fields

    json_fields = []
    for method, spec in workflow.methods("classifier_3d").items():
        fields = form_fields(spec)
        assert [field.name for field in fields] == list(spec["defaults"]), method
        for field in fields:
            if field.kind == "int":
                assert isinstance(field.maximum, int) and field.maximum == spec.get("bounds", {}).get(field.name, 10**9)
            if field.kind == "json":
                json_fields.append((spec, field.name))
        shown = {field.name: field.value for field in fields}  # what the form shows untouched
        assert chosen_parameters(spec["defaults"], shown) == {}, method  # the defaults send nothing
    spec = workflow.methods("classifier_3d")["smoothgrad"]
    fields = {field.name: field for field in form_fields(spec, saved={"n_samples": 3})}
    assert fields["n_samples"].value == 3 and "default" in fields["n_samples"].tooltip
    assert chosen_parameters(spec["defaults"], {name: field.value for name, field in fields.items()}) == {
        "n_samples": 3
    }
    spec, name = json_fields[0]  # a parameter whose default is None (automatic) or a list
    shown = {field.name: field.value for field in form_fields(spec)}
    shown[name] = "[1, 2"
    with pytest.raises(ValueError, match=rf"parameter {name}: '\[1, 2' is not JSON"):
        chosen_parameters(spec["defaults"], shown)


@pytest.mark.server
def test_trust_card_text_per_method_and_without_a_card(workflow):
    trust_2d = workflow.model("classifier_2d")["trust"]
    tag = trust_tag(trust_2d, "gradcam")
    answers = trust_2d["methods"]["gradcam"]["verdicts"]
    assert tag == f"depends on model: {answers['randomization']}, tracks use: {answers['fidelity']}"
    lines = trust_lines(trust_2d, "gradcam")
    assert lines[0].startswith(f"Depends on what the model learned: {answers['randomization']} (")
    assert lines[1].startswith(f"Tracks what the model uses: {answers['fidelity']} (")
    assert lines[-1].startswith("how to read it: 'yes' is a minimum requirement")
    assert not any("pass" in line or "fail" in line for line in lines)
    assert trust_tag(trust_2d, "occlusion") == "no trust card"  # the card covers gradient and gradcam
    assert trust_tag(workflow.model("classifier_3d")["trust"], "gradcam") == "no trust card"
    assert trust_lines(workflow.model("classifier_3d")["trust"], "gradcam")[0].startswith("no trust card: ")


# ------------------------------------------------------------------------------------------------
# explain: heatmaps on the input's physical positions
# ------------------------------------------------------------------------------------------------


@pytest.mark.server
def test_3d_nifti_heatmap_lands_on_the_volume_voxel_for_voxel(served, workflow, scene):
    item = served["items"]["volume_nii"]  # oblique affine, anisotropic voxels
    volume = load_volume(scene, item["path"])
    heatmap = workflow.explain(volume, "classifier_3d", "gradcam")
    assert heatmap.GetName() == f"{volume.GetName()} gradcam {scene_logic.heatmap_result(heatmap)['target']['label']}"
    heat_index, volume_index = voxel_correspondence(heatmap, volume)
    array, _ = read_image(item["path"])  # the server's array: nibabel (i, j, k)
    expected = in_process_map(served, "classifier_3d", array)
    # volume node (k, j, i) <-> nibabel (i, j, k)
    got = slicer.util.arrayFromVolume(heatmap)[heat_index]
    np.testing.assert_allclose(got, expected[volume_index[::-1]], rtol=1e-5, atol=1e-6)


@pytest.mark.server
def test_a_volume_without_a_file_is_sent_as_nrrd_and_comes_back_on_its_geometry(served, workflow, scene):
    field = smooth_field((14, 18, 16), seed=9)  # (k, j, i)
    rotation = np.array([[0.0, -1.0, 0.0], [0.8, 0.0, -0.6], [0.6, 0.0, 0.8]])  # a rotation with a flip of axes
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([1.2, 0.9, 2.0])
    matrix[:3, 3] = [30.0, -12.0, 4.0]
    volume = scene_logic.volume_from_array(scene, field, matrix, "made here")
    heatmap = workflow.explain(volume, "classifier_3d", "gradient")
    heat_index, volume_index = voxel_correspondence(heatmap, volume)
    expected = in_process_map(served, "classifier_3d", field, "gradient")  # NRRD reads as (k, j, i)
    np.testing.assert_allclose(
        slicer.util.arrayFromVolume(heatmap)[heat_index], expected[volume_index], rtol=1e-4, atol=1e-6
    )


@pytest.mark.server
def test_2d_dicom_heatmap_lands_where_slicer_puts_the_image(served, workflow, scene):
    item = served["items"]["xray_dcm"]  # DX, MONOCHROME1, PixelSpacing that ITK does not use for DX
    volume = load_volume(scene, item["path"])
    assert scene_logic.volume_dimension(volume) == 2
    assert scene_logic.upload_file(scene, volume, served["root"]) == item["path"]  # its own file goes up
    heatmap = workflow.explain(volume, "classifier_2d", "gradcam")
    heat_index, volume_index = voxel_correspondence(heatmap, volume)
    array, _ = read_image(item["path"])  # (rows, cols), MONOCHROME1 inverted by the server's reader
    expected = in_process_map(served, "classifier_2d", array)
    # the volume node's (0, row, col) <-> the server's (row, col)
    got = slicer.util.arrayFromVolume(heatmap)[heat_index]
    np.testing.assert_allclose(got, expected[volume_index[1], volume_index[2]], rtol=1e-5, atol=1e-6)


@pytest.mark.server
def test_2d_png_heatmap_lands_where_slicer_puts_the_image(served, workflow, scene, tmp_path):
    import itk

    png = write_png(smooth_field((30, 44), seed=12), tmp_path / "chest.png")
    itk.imwrite(itk.imread(str(png)), str(tmp_path / "chest_as_slicer_reads_it.nrrd"))
    volume = load_volume(scene, tmp_path / "chest_as_slicer_reads_it.nrrd")
    answer = workflow.client.explain("classifier_2d", png, "gradcam")  # the PNG itself, as a REST user sends it
    heatmap = scene_logic.load_heatmap(scene, answer.heatmap, "png map", volume, answer.result)
    heat_index, volume_index = voxel_correspondence(heatmap, volume)
    expected = in_process_map(served, "classifier_2d", read_image(png)[0])
    got = slicer.util.arrayFromVolume(heatmap)[heat_index]
    np.testing.assert_allclose(got, expected[volume_index[1], volume_index[2]], rtol=1e-5, atol=1e-6)


@pytest.mark.server
def test_display_colours_thresholds_and_puts_the_map_in_every_slice_view(workflow, scene, served):
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    first = workflow.explain(volume, "classifier_3d", "gradcam")
    second = workflow.explain(volume, "classifier_3d", "gradient")
    assert scene_logic.heatmap_nodes(scene, volume) == [first, second]  # both kept, to toggle between
    values = slicer.util.arrayFromVolume(second)
    threshold = workflow.show(second, opacity=0.4, threshold_percentile=75.0)
    assert threshold == np.percentile(values.astype(np.float64), 75.0)
    display = second.GetDisplayNode()
    colors = scene.GetNodeByID(display.GetColorNodeID())
    assert colors is color_table_node(scene) and colors.GetNumberOfColors() == 256  # slicer-core has no Inferno file
    first_rgba, last_rgba = [0.0] * 4, [0.0] * 4
    colors.GetColor(0, first_rgba)
    colors.GetColor(255, last_rgba)
    assert sum(first_rgba[:3]) < 0.1 and last_rgba[0] > 0.9 and last_rgba[1] > 0.9  # inferno: black to yellow
    assert display.GetApplyThreshold() == 1 and display.GetLowerThreshold() == threshold
    assert display.GetWindowLevelMin() == pytest.approx(values.min()) and display.GetWindowLevelMax() == pytest.approx(
        values.max()
    )
    legend = scene.color_logic.GetColorLegendDisplayNode(second)
    assert legend.GetVisibility() and legend.GetTitleText() == second.GetName() and legend.GetLabelFormat() == "%.3g"
    composites = scene_logic.nodes_of_class(scene, "vtkMRMLSliceCompositeNode")
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetForegroundVolumeID() == second.GetID()
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    assert workflow.show(first, opacity=0.5, threshold_percentile=0.0) is None  # toggle back, nothing hidden
    assert composites[0].GetForegroundVolumeID() == first.GetID() and first.GetDisplayNode().GetApplyThreshold() == 0


def test_a_map_of_order_1e_5_is_thresholded_at_its_own_percentile(scene):
    rng = np.random.default_rng(3)
    tiny = (rng.random((6, 20, 24)) * 3e-5).astype(np.float32)  # a raw gradient map's scale
    heatmap = scene_logic.volume_from_array(scene, tiny, np.eye(4), "tiny map")
    threshold = scene_logic.threshold_at_percentile(heatmap, 90.0)
    assert 1e-5 < threshold < 3e-5 and threshold == np.percentile(tiny.astype(np.float64), 90.0)
    display = scene_logic.show_heatmap(scene, heatmap, None, 0.5, threshold)  # no colour logic: no legend
    assert display.GetLowerThreshold() == threshold  # the value itself, no rounding to a slider's decimals
    assert np.mean(tiny >= display.GetLowerThreshold()) == pytest.approx(0.10, abs=0.002)
    assert scene.color_logic.GetColorLegendDisplayNode(heatmap) is None
    assert scene_logic.threshold_at_percentile(heatmap, 0.0) is None
    with pytest.raises(scene_logic.SceneError, match=r"percentile must be in \[0, 100\], got 101"):
        scene_logic.threshold_at_percentile(heatmap, 101)


def test_slicers_own_inferno_is_used_when_the_scene_has_it(scene):
    heatmap = scene_logic.volume_from_array(scene, np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4), "map")
    # the node the application loads from its ColorFiles/Inferno.txt, with the ID it gets there
    scene.AddNewNodeByClassWithID("vtkMRMLColorTableNode", "Inferno", "vtkMRMLColorTableNodeFileInferno.txt")
    display = scene_logic.show_heatmap(scene, heatmap)
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt"
    assert scene.GetFirstNodeByName("SaliencyMaps inferno") is None  # ours is not made


@pytest.mark.server
def test_image_volumes_are_scalar_volumes_that_are_not_maps_nor_labelmaps(workflow, scene, served):
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    labelmap = load_volume(scene, served["items"]["volume_nii"]["mask"], labelmap=True)
    heatmap = workflow.explain(volume, "classifier_3d", "gradient")
    assert labelmap.IsA("vtkMRMLScalarVolumeNode") and heatmap.IsA("vtkMRMLScalarVolumeNode")
    assert scene_logic.image_volumes(scene) == [volume]
    assert scene_logic.heatmap_nodes(scene) == [heatmap]


@pytest.mark.server
def test_redraws_and_compares_leave_nothing_behind(workflow, scene, served):
    """10 redraws and 10 comparisons: the scene's nodes and the volumes' reference counts stay as
    they were after the first of each (each redraw used to leak a node collection holding every
    volume; each comparison a labelmap colour table, two tables, a chart and a series)."""
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    heatmap = workflow.explain(volume, "classifier_3d", "gradcam")
    corners = ijk_to_ras(heatmap) @ np.array([[2, 4, 3, 1], [9, 11, 8, 1]]).T
    segmentation, segment = box_segmentation(scene, heatmap, corners[:3].min(axis=1), corners[:3].max(axis=1))

    def state():
        return scene.GetNumberOfNodes(), volume.GetReferenceCount(), heatmap.GetReferenceCount()

    workflow.show(heatmap, 0.5, 50.0)
    workflow.compare([heatmap], segmentation, segment, 50.0)
    before = state()
    for index in range(10):
        workflow.show(heatmap, 0.1 * (index % 10), 5.0 * index)
    for index in range(10):
        workflow.compare([heatmap], segmentation, segment, 5.0 * index)
    assert state() == before
    assert len(scene_logic.nodes_of_class(scene, "vtkMRMLTableNode")) == 2  # metrics and ROC points
    assert len(scene_logic.nodes_of_class(scene, "vtkMRMLPlotChartNode")) == 1
    assert not scene_logic.nodes_of_class(scene, "vtkMRMLLabelMapVolumeNode")
    second = workflow.explain(volume, "classifier_3d", "gradient")
    _, _, chart = workflow.compare([heatmap, second], segmentation, segment)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    _, _, chart = workflow.compare([second], segmentation, segment)  # the surplus series is removed
    assert chart.GetNumberOfPlotSeriesNodes() == 1 == len(scene_logic.nodes_of_class(scene, "vtkMRMLPlotSeriesNode"))


def test_the_modules_metrics_are_the_packages_byte_for_byte():
    """The module carries the project's metric code (Slicer needs nothing installed): the same file."""
    from monai_sal_app.metrics import localization

    copy = MODULE / "SaliencyMapsLib" / "localization.py"
    assert copy.read_bytes() == Path(localization.__file__).read_bytes(), (
        "copy monai_sal_app/metrics/localization.py to slicer_module/SaliencyMaps/SaliencyMapsLib/"
    )


def test_the_roc_curve_drawn_is_a_thinned_copy_of_the_full_one():
    from SaliencyMapsLib.comparison import MAX_ROC_POINTS, roc_points

    from monai_sal_app.metrics import roc_curve

    rng = np.random.default_rng(0)
    mask = np.zeros((20, 30, 30), dtype=bool)
    mask[5:12, 8:20, 10:22] = True
    saliency = rng.random(mask.shape) + mask
    fpr, tpr, _ = roc_curve(saliency, mask)
    drawn_fpr, drawn_tpr = roc_points(saliency, mask)
    assert len(fpr) > 10_000 and len(drawn_fpr) == MAX_ROC_POINTS
    assert (drawn_fpr[0], drawn_tpr[0], drawn_fpr[-1], drawn_tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    on_curve = {(a, b) for a, b in zip(fpr, tpr)}
    assert all((a, b) in on_curve for a, b in zip(drawn_fpr, drawn_tpr))
    assert np.all(np.diff(drawn_fpr) >= 0) and np.all(np.diff(drawn_tpr) >= 0)


# ------------------------------------------------------------------------------------------------
# compare with a segmentation
# ------------------------------------------------------------------------------------------------


def heatmap_box_mask(heatmap, low_ras, high_ras) -> np.ndarray:
    """The heatmap voxels whose centres lie in the RAS box, (k, j, i)."""
    shape = slicer.util.arrayFromVolume(heatmap).shape
    _, ras = voxel_ras(heatmap)
    inside = np.all((ras >= np.asarray(low_ras)[:, None]) & (ras < np.asarray(high_ras)[:, None]), axis=0)
    return inside.reshape(shape)


@pytest.mark.server
def test_a_segment_on_a_finer_shifted_grid_lands_on_the_heatmap_grid(workflow, scene, served):
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    heatmap = workflow.explain(volume, "classifier_3d", "gradcam")
    corners = ijk_to_ras(heatmap) @ np.array([[3, 3, 2, 1], [10, 12, 9, 1]]).T  # a box inside the volume
    low, high = corners[:3].min(axis=1), corners[:3].max(axis=1)
    segmentation, segment = box_segmentation(scene, heatmap, low, high)
    mask = scene_logic.segment_mask(scene, segmentation, segment, heatmap, slicer.vtkSlicerSegmentationsModuleLogic)
    expected = heatmap_box_mask(heatmap, low, high)
    assert mask.shape == expected.shape and expected.sum() > 20
    disagree = np.count_nonzero(mask != expected)
    assert disagree <= 0.35 * expected.sum()  # only voxels cut by the box's faces differ
    assert np.count_nonzero(mask & expected) >= 0.8 * expected.sum()


@pytest.mark.server
def test_module_numbers_equal_the_servers_and_the_clis(workflow, scene, served, tmp_path):
    from monai_sal_app.cli import main as cli_main
    from monai_sal_app.metrics import hard_dice

    item = served["items"]["volume_nii"]
    volume = load_volume(scene, item["path"])
    heatmaps = [workflow.explain(volume, "classifier_3d", method) for method in ("gradcam", "xrai")]
    corners = ijk_to_ras(heatmaps[0]) @ np.array([[2, 4, 3, 1], [9, 11, 8, 1]]).T
    segmentation, segment = box_segmentation(scene, heatmaps[0], corners[:3].min(axis=1), corners[:3].max(axis=1))
    scores, table, chart = workflow.compare(heatmaps, segmentation, segment, threshold_percentile=50.0)

    # the same mask, on the image's grid, scored by the server and by `monai-sal evaluate`
    mask = scene_logic.segment_mask(scene, segmentation, segment, heatmaps[0], slicer.vtkSlicerSegmentationsModuleLogic)
    mask_node = scene_logic.volume_from_array(
        scene, mask.astype(np.uint8), ijk_to_ras(heatmaps[0]), "mask", labelmap=True
    )
    mask_path = tmp_path / "mask.nii"
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(mask_path))
    assert storage.WriteData(mask_node)
    maps_csv = tmp_path / "maps.csv"
    with open(maps_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["id", "map", "mask", "method"])
        writer.writeheader()
        for heatmap in heatmaps:
            method = scene_logic.heatmap_result(heatmap)["method"]
            answer = workflow.client.explain("classifier_3d", item["path"], method, label=mask_path)
            server_metrics = answer.result["metrics"]
            (tmp_path / f"{method}.nii").write_bytes(answer.heatmap)
            writer.writerow({"id": method, "map": tmp_path / f"{method}.nii", "mask": mask_path, "method": method})
            mine = scores[heatmap.GetName()]
            assert set(server_metrics) <= set(mine)
            for key, value in server_metrics.items():
                assert mine[key] == pytest.approx(value, abs=1e-12), key
            if method == "xrai":
                assert "xrai_dice_p5" in server_metrics
    assert cli_main(["evaluate", str(maps_csv), "--out", str(tmp_path / "evaluated")]) in (None, 0)
    with open(tmp_path / "evaluated" / "per_image.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            mine = scores[next(h.GetName() for h in heatmaps if h.GetName().split()[-2] == row["method"])]
            for key in ("roc_auc", "auprc", "soft_dice", "iou_p90"):
                assert mine[key] == pytest.approx(float(row[key]), abs=1e-12), key
    for heatmap in heatmaps:  # Dice at each map's own median, the value the viewer hides below
        values = slicer.util.arrayFromVolume(heatmap).astype(np.float64)
        found = scores[heatmap.GetName()]
        assert found["threshold"] == np.median(values)
        assert found["dice_threshold"] == hard_dice(values, mask, threshold=np.median(values))

    # the table node, its CSV, and the ROC chart
    assert table.GetNumberOfColumns() == 1 + len(heatmaps)
    metrics = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
    assert metrics[:4] == ["threshold", "dice_threshold", "roc_auc", "auprc"]
    csv_path = scene_logic.save_table_csv(scene, table, tmp_path / "metrics.csv")
    with open(csv_path, newline="") as handle:
        rows = {row["metric"]: row for row in csv.DictReader(handle)}
    for heatmap in heatmaps:
        assert float(rows["roc_auc"][heatmap.GetName()]) == pytest.approx(
            scores[heatmap.GetName()]["roc_auc"], rel=1e-6
        )
    assert chart.GetNumberOfPlotSeriesNodes() == len(heatmaps)
    series = chart.GetNthPlotSeriesNode(0)
    points = slicer.util.arrayFromTableColumn(series.GetTableNode(), series.GetYColumnName())
    assert points[0] == 0.0 and np.nanmax(points) == 1.0


@pytest.mark.server
def test_segment_errors_are_clear(workflow, scene, served):
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    heatmap = workflow.explain(volume, "classifier_3d", "gradcam")
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    far = ijk_to_ras(heatmap) @ np.array([400, 400, 400, 1])  # a segment far outside the image
    segmentation, segment = box_segmentation(scene, heatmap, far[:3] - 5, far[:3] + 5)
    with pytest.raises(scene_logic.SceneError, match="is empty on .* grid"):
        scene_logic.segment_mask(scene, segmentation, segment, heatmap, logic)
    empty = slicer.vtkSegment()  # a segment with nothing drawn in it (an empty labelmap, as Slicer adds one)
    empty.AddRepresentation("Binary labelmap", slicer.vtkOrientedImageData())
    untouched = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "untouched")
    untouched.GetSegmentation().AddSegment(empty, "empty")
    with pytest.raises(scene_logic.SceneError, match="segment 'empty' is empty: draw it first"):
        scene_logic.segment_mask(scene, untouched, "empty", heatmap, logic)
    with pytest.raises(scene_logic.SceneError, match="no segment 'nope'"):
        scene_logic.segment_mask(scene, segmentation, "nope", heatmap, logic)
    with pytest.raises(scene_logic.SceneError, match="no heatmap"):
        workflow.compare([], segmentation, segment)


# ------------------------------------------------------------------------------------------------
# batch, and errors
# ------------------------------------------------------------------------------------------------


def poll_until_done(job, on_turn=None, timeout: float = 120.0) -> list:
    """Poll ``job`` as the module's timer does (every 20 ms) until it ends; returns the progress seen
    at each turn. ``on_turn(job)`` runs after each turn."""
    seen, deadline = [], time.monotonic() + timeout
    while not job.poll():
        seen.append(job.progress())
        if on_turn is not None:
            on_turn(job)
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.02)
    return seen


@pytest.mark.server
def test_batch_over_volumes_and_methods_with_progress_cancel_and_failures(workflow, scene, served):
    volumes = [load_volume(scene, served["items"][name]["path"]) for name in ("volume_nii", "volume_nrrd")]
    slice_2d = load_volume(scene, served["items"]["xray_dcm"]["path"])
    job = workflow.batch_job(items_for_volumes([*volumes, slice_2d], "classifier_3d", "gradient"))
    seen = poll_until_done(job)
    report = job.report
    assert len(report.done) == 2 and len(report.failed) == 1 and not report.cancelled
    title, error = report.failed[0]
    assert title == f"{slice_2d.GetName()} / classifier_3d / gradient"
    assert isinstance(error, scene_logic.SceneError) and "single-slice (2D) image" in str(error)
    assert [node for _, node in report.done] == scene_logic.heatmap_nodes(scene)
    assert seen[0][:3] == (0, 3, f"{volumes[0].GetName()} / classifier_3d / gradient")  # in flight while polled
    assert job.progress()[:3] == (3, 3, None)

    methods = ["gradcam", "gradient", "smoothgrad"]
    job = workflow.batch_job(items_for_methods(volumes[0], "classifier_3d", methods, {"smoothgrad": {"n_samples": 2}}))
    poll_until_done(job, on_turn=lambda running: running.cancel() if len(running.report.done) == 2 else None)
    assert job.report.cancelled and [title.split(" / ")[-1] for title, _ in job.report.done] == methods[:2]
    assert not job.report.failed and "2 done, 0 failed, cancelled" in job.report.summary()


@pytest.mark.server
def test_a_request_runs_off_the_calling_thread_and_cancel_aborts_it_in_flight(workflow, scene, served):
    """The GUI thread only polls: it is never blocked by a request, and Cancel closes the connection
    of the request in flight, which stops the server's work on it."""
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    step = workflow.explain_step(volume, "classifier_3d", "meaningful_perturbation", LONG_REQUEST)
    threads = {}
    start = step.start

    def start_here():
        threads["start"] = threading.get_ident()
        request = start()

        def request_there(cancellation):
            threads["request"] = threading.get_ident()
            return request(cancellation)

        return request_there

    job = BackgroundJob([Step(step.title, start_here, step.finish)])
    longest_poll = 0.0
    begun = time.monotonic()
    while time.monotonic() - begun < 3.0:  # the request runs until stopped; the GUI thread polls on
        tick = time.monotonic()
        assert job.poll() is False
        longest_poll = max(longest_poll, time.monotonic() - tick)
        time.sleep(0.02)
    assert longest_poll < 0.5  # the first poll writes the upload file; then each poll returns at once
    assert threads["start"] == threading.get_ident() != threads["request"]
    assert job.running == step.title and job.progress()[3] > 2.5
    cancelled_at = time.monotonic()
    job.cancel()
    poll_until_done(job, timeout=5.0)
    assert time.monotonic() - cancelled_at < 2.0
    assert job.report.cancelled and not job.report.done and not job.report.failed
    assert not scene_logic.heatmap_nodes(scene)  # nothing half-loaded
    # the next request on the model waits for the model's lock: it is served within seconds because
    # the server stopped the abandoned work, which would have run for minutes; the shared server's
    # time limit would have stopped it TIMEOUT_S after it began, itself after `begun`
    quick = time.monotonic()
    workflow.explain(volume, "classifier_3d", "gradient")
    assert time.monotonic() - quick < 10 and time.monotonic() - begun < TIMEOUT_S


def test_an_unexpected_error_in_a_request_reaches_the_polling_thread():
    def broken(cancellation):
        raise RuntimeError("a bug in a request")

    job = BackgroundJob([Step("broken", lambda: broken), Step("never", lambda: broken)])
    with pytest.raises(RuntimeError, match="a bug in a request"):
        poll_until_done(job)
    assert job.finished and not job.report.done


@pytest.mark.server
def test_a_3d_volume_sent_to_a_2d_model_is_refused_before_upload(workflow, scene, served):
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    with pytest.raises(scene_logic.SceneError, match=r"is a 3D volume \(20 x 18 x 17\) but model classifier_2d"):
        workflow.explain(volume, "classifier_2d", "gradcam")


@pytest.mark.server
def test_server_refusals_carry_the_servers_message(workflow, scene, served):
    volume = load_volume(scene, served["items"]["volume_nii"]["path"])
    with pytest.raises(ServerError, match=r"refused the request \(400\): .*steps") as raised:
        workflow.explain(volume, "classifier_3d", "integrated_gradients", {"steps": 10**7})
    assert raised.value.status == 400
    with pytest.raises(ServerError, match="does not offer 'nonsense'"):
        workflow.explain(volume, "classifier_3d", "nonsense")
    with pytest.raises(ServerError, match="has no model 'other'"):
        workflow.explain(volume, "other", "gradcam")


def test_server_down_and_timeouts_are_clear(scene):
    flow = SaliencyMapsWorkflow(scene, slicer.vtkSlicerSegmentationsModuleLogic)
    with pytest.raises(ServerError, match="cannot reach the server at http://127.0.0.1"):
        flow.connect(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServerError, match="server URL must look like"):
        flow.connect("127.0.0.1:8000")
    with pytest.raises(ServerError, match="not connected"):
        flow.explain(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"), "classifier_2d", "gradcam")
    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    try:
        with pytest.raises(ServerError, match=r"no answer from .* within 0.5 s"):
            ServerClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5).info()
    finally:
        silent.close()


# ------------------------------------------------------------------------------------------------
# the extension's layout (what Slicer's build and loader expect), and a thin widget
# ------------------------------------------------------------------------------------------------

EXTENSION = REPO / "slicer_module"
MODULE = EXTENSION / "SaliencyMaps"


def test_extension_layout_lists_every_file_slicer_needs():

    assert re.search(r"add_subdirectory\(SaliencyMaps\)", (EXTENSION / "CMakeLists.txt").read_text())
    cmake = (MODULE / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", cmake.replace("${MODULE_NAME}", "SaliencyMaps"), re.M))
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*") if p.suffix in (".py", ".png", ".ui")}
    assert listed == on_disk
    assert "slicerMacroBuildScriptedModule" in cmake


def test_the_extension_metadata_points_at_files_of_this_repository(tmp_path):
    """The metadata block of the extension's CMakeLists.txt, run by CMake in a clone whose remote is
    a GitHub address: the homepage, icon and screenshots are files of this repository there."""
    import subprocess

    cmake = (EXTENSION / "CMakeLists.txt").read_text()
    block = cmake[cmake.index("# Extension meta-information") : cmake.index("# Extension dependencies")]
    script = tmp_path / "metadata.cmake"
    names = ("HOMEPAGE", "CONTRIBUTORS", "ICONURL", "SCREENSHOTURLS", "DEPENDS")
    script.write_text(block + "".join(f'message("{name}=${{EXTENSION_{name}}}")\n' for name in names))
    clone = tmp_path / "clone"
    clone.mkdir()
    for remote in ("git@github.com:someone/monai-sal.git", "https://github.com/someone/monai-sal.git"):
        subprocess.run(["git", "init", "-q", str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "remote", "remove", "origin"], capture_output=True)
        subprocess.run(["git", "-C", str(clone), "remote", "add", "origin", remote], check=True)
        done = subprocess.run(["cmake", "-P", str(script)], cwd=clone, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        found = dict(line.split("=", 1) for line in done.stderr.splitlines() if "=" in line)
        base = "https://github.com/someone/monai-sal"
        assert found["HOMEPAGE"] == f"{base}/blob/main/docs/SLICER.md"
        urls = [found["ICONURL"], *found["SCREENSHOTURLS"].split()]
        assert len(urls) == 3 and all(url.startswith(f"{base}/raw/main/") for url in urls)
        for url in urls:
            assert (REPO / url[len(f"{base}/raw/main/") :]).is_file(), url
        assert re.fullmatch(r"[^()]+ \([^()]+\)", found["CONTRIBUTORS"]) and found["DEPENDS"] == "NA"
    assert (REPO / "docs" / "SLICER.md").is_file()
    no_remote = tmp_path / "no remote"
    no_remote.mkdir()
    done = subprocess.run(["cmake", "-P", str(script)], cwd=no_remote, capture_output=True, text=True)
    assert done.returncode != 0 and "-DSALIENCYMAPS_REPOSITORY_URL=" in done.stderr


def test_widget_names_exist_in_the_ui_file_and_the_widget_stays_thin():
    import ast
    import xml.etree.ElementTree as ElementTree

    source = (MODULE / "SaliencyMaps.py").read_text()
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes >= {"SaliencyMaps", "SaliencyMapsWidget", "SaliencyMapsLogic", "SaliencyMapsTest"}
    ui = ElementTree.parse(MODULE / "Resources" / "UI" / "SaliencyMaps.ui")
    names = {element.get("name") for element in ui.iter("widget")}
    used = set(re.findall(r"\bui\.(\w+)", source))
    assert used and used <= names, f"not in the .ui: {sorted(used - names)}"
    assert len(source.splitlines()) < 400


def test_the_library_needs_neither_qt_nor_the_application():
    import ast

    for path in (MODULE / "SaliencyMapsLib").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"qt", "ctk", "slicer.ScriptedLoadableModule", "PythonQt"}, path.name
        attributes = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer"
        }
        assert not attributes & {"app", "modules", "mrmlScene"}, path.name
