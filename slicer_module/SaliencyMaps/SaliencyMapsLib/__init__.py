"""The SaliencyMaps module's code that needs neither Qt nor a running 3D Slicer application.

- ``client``: REST calls to a monai-sal MONAI Label server (standard library only);
- ``scene``: volumes, heatmaps, display, segments, tables and plots in an MRML scene;
- ``comparison``: a heatmap against a segment with ``monai_sal_app.metrics``;
- ``trust``: a method's trust card verdicts as text;
- ``colormaps``: colour table nodes; ``batch``: many explanations with progress and cancel;
- ``logic``: the workflow that ties them together (the module's Logic).
"""
