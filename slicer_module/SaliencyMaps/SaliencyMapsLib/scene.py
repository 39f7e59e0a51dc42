"""Scene logic without the Slicer application: every function takes the MRML scene (and the module
logics it needs) as arguments, reads and writes files through storage nodes, and needs no Qt.

- :func:`upload_file`: the file to send for a volume node (its own file, or the node as NRRD);
- :func:`load_heatmap`: the server's NIfTI heatmap as a scalar volume on its physical geometry;
- :func:`heatmap_nodes`, :func:`image_volumes`: the maps, and the images a map can be made of;
- :func:`show_heatmap`: colour map, window, lower threshold, colour legend, and the heatmap as the
  foreground layer of every slice view;
- :func:`segment_mask`: a segment brought onto a heatmap's grid by the segmentations logic (the
  temporary labelmap and its colour table removed);
- :func:`metrics_table`, :func:`roc_chart`, :func:`save_table_csv`: results as table and plot
  nodes, the same nodes reused by every comparison.

Arrays from volume nodes are in (k, j, i) order; both the heatmap and the exported segment are on
the heatmap's own grid, so they compare voxel for voxel. ``scene.GetNodesByClass`` hands its caller
a new collection that holds every node it lists: :func:`nodes_of_class` releases it, as
``slicer.util.getNodesByClass`` does.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import numpy as np

from SaliencyMapsLib.colormaps import color_table_node
from SaliencyMapsLib.trust import trust_lines

__all__ = [
    "ATTRIBUTE",
    "SceneError",
    "heatmap_nodes",
    "heatmap_result",
    "heatmap_summary",
    "image_volumes",
    "load_heatmap",
    "metrics_table",
    "nodes_of_class",
    "roc_chart",
    "save_table_csv",
    "segment_mask",
    "show_heatmap",
    "threshold_at_percentile",
    "upload_file",
    "volume_dimension",
    "volume_from_array",
]

ATTRIBUTE = "SaliencyMaps."  # prefix of the attributes a heatmap node carries
ROLE = ATTRIBUTE + "Role"  # the attribute that marks the module's result nodes (table, chart, series)
# File types the server reads, by suffix (a volume's own file is sent when the model takes its format).
SERVER_FORMATS = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".dcm": "dicom",
}


class SceneError(ValueError):
    """Something in the scene that cannot be used as asked, with a message for the user."""


def _array(node) -> np.ndarray:
    """The voxels of a volume node, (k, j, i); SceneError when it has none (e.g. its file was not loaded)."""
    import slicer

    if node.GetImageData() is None or node.GetImageData().GetPointData().GetScalars() is None:
        raise SceneError(f"{node.GetName()} has no voxels (was its file loaded?)")
    return slicer.util.arrayFromVolume(node)


def nodes_of_class(scene, class_name: str) -> list:
    """The scene's nodes of ``class_name`` (subclasses included), in scene order. The collection
    ``GetNodesByClass`` returns is released here: kept, it would hold a reference to each node."""
    collection = scene.GetNodesByClass(class_name)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(index) for index in range(collection.GetNumberOfItems())]


def volume_from_array(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str, labelmap: bool = False):
    """A new volume node holding ``array`` ((k, j, i); float32, or uint8 for a labelmap) with the
    4x4 IJK-to-RAS matrix ``ijk_to_ras`` (mm), without a file."""
    import slicer
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*reversed(array.shape))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR if labelmap else vtk.VTK_FLOAT, 1)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    slicer.util.arrayFromVolume(node)[:] = array
    slicer.util.arrayFromVolumeModified(node)
    return node


def volume_dimension(volume_node) -> int:
    """2 for a single-slice volume (one of its three sides is 1), else 3."""
    image = volume_node.GetImageData()
    if image is None:
        raise SceneError(f"{volume_node.GetName()} has no image data")
    return 2 if 1 in image.GetDimensions() else 3


def check_dimension(volume_node, model: str, model_dimension: int) -> None:
    """SceneError when the volume's dimension is not the model's."""
    found = volume_dimension(volume_node)
    if found != int(model_dimension):
        sides = " x ".join(str(s) for s in volume_node.GetImageData().GetDimensions())
        what = "a single-slice (2D) image" if found == 2 else "a 3D volume"
        raise SceneError(
            f"{volume_node.GetName()} is {what} ({sides}) but model {model} takes {model_dimension}D images: "
            f"choose a {found}D model"
        )


def _own_file(volume_node, formats) -> Path | None:
    storage = volume_node.GetStorageNode()
    if storage is None or not storage.GetFileName():
        return None
    path = Path(storage.GetFileName())
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()
    if SERVER_FORMATS.get(suffix) not in formats or not path.is_file():
        return None
    if volume_node.GetModifiedSinceRead() or storage.GetNumberOfFileNames() > 1:
        return None
    return path


def upload_file(scene, volume_node, folder: str | Path, formats=("nrrd", "nifti", "png", "jpeg", "dicom")) -> Path:
    """The file to send to the server for ``volume_node``: the file it was read from when it is
    unchanged since and the model takes its format (``formats``, from ``/info``; this keeps what the
    server's reader does for that format, e.g. MONOCHROME1 DICOM inverted), else the node written
    into ``folder`` as uncompressed NRRD with its IJK-to-RAS geometry."""
    own = _own_file(volume_node, formats)
    if own is not None:
        return own
    if "nrrd" not in formats:
        raise SceneError(f"the model does not take NRRD files ({', '.join(formats)}); load the image from such a file")
    path = Path(folder) / f"{uuid.uuid4().hex}.nrrd"
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(str(path))
        storage.SetUseCompression(0)
        if not storage.WriteData(volume_node):
            raise SceneError(f"cannot write {volume_node.GetName()} to {path}")
    finally:
        scene.RemoveNode(storage)
    return path


def load_heatmap(scene, nifti: bytes, name: str, source_volume=None, result: dict | None = None):
    """A new scalar volume node ``name`` from the heatmap NIfTI bytes, on the geometry the file
    gives (the input's, as the server wrote it). It carries ``SaliencyMaps.*`` attributes: model,
    method, target, the source volume's id and the answer's JSON. No storage node is left attached
    (saving the scene writes it as any new volume)."""
    descriptor, name_on_disk = tempfile.mkstemp(suffix=".nii")
    path = Path(name_on_disk)
    try:
        with open(descriptor, "wb") as handle:
            handle.write(nifti)
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(str(path))
            storage.SetSingleFile(1)
            if not storage.ReadData(node):
                scene.RemoveNode(node)
                raise SceneError("the heatmap the server sent cannot be read as a volume")
        finally:
            node.SetAndObserveStorageNodeID(None)
            scene.RemoveNode(storage)
    finally:
        path.unlink(missing_ok=True)
    result = result or {}
    node.SetAttribute(ATTRIBUTE + "Model", str(result.get("model", "")))
    node.SetAttribute(ATTRIBUTE + "Method", str(result.get("method", "")))
    node.SetAttribute(ATTRIBUTE + "Target", str(result.get("target", {}).get("label", "")))
    node.SetAttribute(ATTRIBUTE + "Result", json.dumps(result))
    if source_volume is not None:
        node.SetAttribute(ATTRIBUTE + "SourceVolumeID", source_volume.GetID())
    return node


def heatmap_result(heatmap_node) -> dict:
    """The server's answer stored on a heatmap node ({} for another node)."""
    text = heatmap_node.GetAttribute(ATTRIBUTE + "Result")
    return json.loads(text) if text else {}


def heatmap_summary(heatmap_node) -> str:
    """What the answer behind a map says, in lines: model / method / target, the class
    probabilities, and the method's trust card (:func:`trust.trust_lines`)."""
    result = heatmap_result(heatmap_node)
    probabilities = ", ".join(f"{label} {p:.3f}" for label, p in result.get("probabilities", {}).items())
    target = result.get("target", {}).get("label")
    lines = [f"{result.get('model')} / {result.get('method')} / target {target}", f"probabilities: {probabilities}"]
    return "\n".join(lines + trust_lines(result.get("trust")))


def heatmap_nodes(scene, source_volume=None) -> list:
    """The heatmap nodes in the scene (those :func:`load_heatmap` made), of ``source_volume`` only when given."""
    return [
        node
        for node in nodes_of_class(scene, "vtkMRMLScalarVolumeNode")
        if node.GetAttribute(ATTRIBUTE + "Method") is not None
        and (source_volume is None or node.GetAttribute(ATTRIBUTE + "SourceVolumeID") == source_volume.GetID())
    ]


def image_volumes(scene) -> list:
    """The volumes a map can be made of: scalar volumes that are neither heatmaps nor of a subclass
    (labelmaps, vector, tensor volumes)."""
    return [
        node
        for node in nodes_of_class(scene, "vtkMRMLScalarVolumeNode")
        if node.GetClassName() == "vtkMRMLScalarVolumeNode" and node.GetAttribute(ATTRIBUTE + "Method") is None
    ]


def threshold_at_percentile(heatmap_node, percentile: float) -> float | None:
    """The map value at ``percentile`` (0-100) of the heatmap's values, in the map's own unit (any
    scale: a gradient map of order 1e-5 as well as a probability); None for 0 (nothing hidden)."""
    if not 0.0 <= percentile <= 100.0:
        raise SceneError(f"the threshold percentile must be in [0, 100], got {percentile}")
    if percentile == 0.0:
        return None
    return float(np.percentile(_array(heatmap_node).astype(np.float64), percentile))


def heatmap_colors(scene):
    """Slicer's built-in Inferno colour table when the scene has it (the application loads it),
    else the module's own copy of it."""
    return scene.GetNodeByID("vtkMRMLColorTableNodeFileInferno.txt") or color_table_node(scene, "inferno")


def show_heatmap(
    scene,
    heatmap_node,
    background=None,
    opacity: float = 0.5,
    lower_threshold: float | None = None,
    color_logic=None,
):
    """Colour the heatmap (:func:`heatmap_colors`, window = its min..max), hide values below
    ``lower_threshold`` (map units; None: show all), add a colour legend when ``color_logic`` (the
    Colors module's logic) can make one, and put the map as the foreground layer of every slice
    view, over ``background`` when given, at ``opacity`` in [0, 1]. Returns the display node.
    Showing a map again reuses its display and legend nodes."""
    if not 0.0 <= opacity <= 1.0:
        raise SceneError(f"opacity must be in [0, 1], got {opacity}")
    display = heatmap_node.GetDisplayNode()
    if display is None:
        heatmap_node.CreateDefaultDisplayNodes()
        display = heatmap_node.GetDisplayNode()
    values = _array(heatmap_node)
    low, high = float(values.min()), float(values.max())
    display.SetAndObserveColorNodeID(heatmap_colors(scene).GetID())
    display.SetAutoWindowLevel(0)
    display.SetWindowLevelMinMax(low, high if high > low else low + 1.0)
    if lower_threshold is None:
        display.SetApplyThreshold(0)
    else:
        display.SetAutoThreshold(0)
        display.SetThreshold(float(lower_threshold), max(high, float(lower_threshold)))
        display.SetApplyThreshold(1)
    _show_legend(heatmap_node, color_logic)
    for composite in nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(heatmap_node.GetID())
        composite.SetForegroundOpacity(float(opacity))
    return display


def _show_legend(heatmap_node, color_logic) -> None:
    """The heatmap's colour legend (``vtkMRMLColorLegendDisplayNode``, Slicer >= 5.0), labelled in
    the map's own unit with 3 significant digits; nothing without a Colors logic that makes legends."""
    if color_logic is None or not hasattr(color_logic, "AddDefaultColorLegendDisplayNode"):
        return
    legend = color_logic.GetColorLegendDisplayNode(heatmap_node) or color_logic.AddDefaultColorLegendDisplayNode(
        heatmap_node
    )
    if legend is None:  # the scene does not know the legend node class
        return
    legend.SetTitleText(heatmap_node.GetName())
    legend.SetLabelFormat("%.3g")
    legend.SetVisibility(1)


def segment_mask(scene, segmentation_node, segment_id: str, reference_volume, segmentations_logic) -> np.ndarray:
    """The segment as a boolean (k, j, i) array on ``reference_volume``'s grid, through the
    segmentations logic's export to a labelmap with that volume as reference geometry (any grid:
    finer, shifted, rotated). SceneError for an unknown segment or one that is empty there."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSegment(segment_id) is None:
        raise SceneError(f"{segmentation_node.GetName()} has no segment {segment_id!r}")
    import vtk

    name = segmentation.GetSegment(segment_id).GetName() or segment_id
    if _drawn_nothing(segmentation.GetSegment(segment_id)):  # exporting an empty labelmap can crash VTK
        raise SceneError(f"segment {name!r} is empty: draw it first")
    colour_tables = {node.GetID() for node in nodes_of_class(scene, "vtkMRMLColorNode")}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_volume):
            raise SceneError(f"segment {name!r} could not be exported onto {reference_volume.GetName()}'s grid")
        mask = _array(labelmap) > 0
        if mask.shape != _array(reference_volume).shape:
            raise SceneError(f"segment {name!r} did not land on {reference_volume.GetName()}'s grid")
    finally:
        display = labelmap.GetDisplayNode()
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(labelmap)
        for node in nodes_of_class(scene, "vtkMRMLColorNode"):  # the export's `<segmentation>_ColorTable`
            if node.GetID() not in colour_tables:
                scene.RemoveNode(node)
    if not mask.any():
        raise SceneError(
            f"segment {name!r} is empty on {reference_volume.GetName()}'s grid: it is empty, or lies outside the image"
        )
    if mask.all():
        raise SceneError(f"segment {name!r} covers the whole of {reference_volume.GetName()}: nothing to compare")
    return mask


def _drawn_nothing(segment) -> bool:
    """True when the segment's binary labelmap holds none of its voxels (an empty extent, or no voxel
    with the segment's label value in a labelmap shared with other segments)."""
    labelmap = segment.GetRepresentation("Binary labelmap")
    if labelmap is None:  # another source representation (e.g. a closed surface): the export decides
        return False
    if labelmap.IsEmpty() or labelmap.GetPointData().GetScalars() is None:
        return True
    from vtk.util.numpy_support import vtk_to_numpy

    return not (vtk_to_numpy(labelmap.GetPointData().GetScalars()) == segment.GetLabelValue()).any()


def _result_node(scene, class_name: str, role: str, name: str):
    """The module's result node with ``role`` (its ``SaliencyMaps.Role`` attribute), made on first use."""
    for node in nodes_of_class(scene, class_name):
        if node.GetAttribute(ROLE) == role:
            return node
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAttribute(ROLE, role)
    return node


def metrics_table(scene, columns: dict[str, dict[str, float]], name: str = "Saliency metrics"):
    """The module's metrics table node, filled with a ``metric`` column and one column per compared
    map (``columns``: map name -> {metric: value}); rows in the order the metrics first appear.
    Every comparison refills the same node."""
    import vtk

    table_node = _result_node(scene, "vtkMRMLTableNode", "metrics", name)
    table = table_node.GetTable()
    table.Initialize()
    metrics = list(dict.fromkeys(metric for values in columns.values() for metric in values))
    names = vtk.vtkStringArray()
    names.SetName("metric")
    for metric in metrics:
        names.InsertNextValue(metric)
    table.AddColumn(names)
    for title, values in columns.items():
        column = vtk.vtkDoubleArray()
        column.SetName(title)
        for metric in metrics:
            column.InsertNextValue(float(values.get(metric, float("nan"))))
        table.AddColumn(column)
    table_node.Modified()
    return table_node


def roc_chart(scene, curves: dict[str, tuple[np.ndarray, np.ndarray]], name: str = "Saliency ROC"):
    """The module's ROC chart node with one line per map (``curves``: map name -> (fpr, tpr)), its
    points in the table node ``<name> points`` (columns ``<map> FPR`` and ``<map> TPR``). Every
    comparison reuses the chart, the table and the series nodes (one per line; the surplus of an
    earlier comparison with more maps is removed). Returns the chart node."""
    import vtk

    table_node = _result_node(scene, "vtkMRMLTableNode", "roc points", f"{name} points")
    table = table_node.GetTable()
    table.Initialize()
    length = max(len(fpr) for fpr, _ in curves.values())
    for title, (fpr, tpr) in curves.items():
        for suffix, values in (("FPR", fpr), ("TPR", tpr)):
            column = vtk.vtkDoubleArray()
            column.SetName(f"{title} {suffix}")
            padded = np.full(length, np.nan)
            padded[: len(values)] = values
            for value in padded:
                column.InsertNextValue(float(value))
            table.AddColumn(column)
    table_node.Modified()
    chart = _result_node(scene, "vtkMRMLPlotChartNode", "roc chart", name)
    chart.SetTitle("ROC of the map against the segment")
    chart.SetXAxisTitle("false positive rate")
    chart.SetYAxisTitle("true positive rate")
    chart.RemoveAllPlotSeriesNodeIDs()
    series_nodes = [node for node in nodes_of_class(scene, "vtkMRMLPlotSeriesNode") if node.GetAttribute(ROLE) == "roc"]
    for surplus in series_nodes[len(curves) :]:
        scene.RemoveNode(surplus)
    for index, title in enumerate(curves):
        if index < len(series_nodes):
            series = series_nodes[index]
            series.SetName(title)
        else:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", title)
            series.SetAttribute(ROLE, "roc")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName(f"{title} FPR")
        series.SetYColumnName(f"{title} TPR")
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart


def save_table_csv(scene, table_node, path: str | Path) -> Path:
    """Write a table node as CSV through a table storage node; returns the path."""
    path = Path(path)
    storage = scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
    try:
        storage.SetFileName(str(path))
        if not storage.WriteData(table_node):
            raise SceneError(f"cannot write the table to {path}")
    finally:
        scene.RemoveNode(storage)
    return path
