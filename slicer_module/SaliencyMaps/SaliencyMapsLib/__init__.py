"""The SaliencyMaps module's code that needs neither Qt nor a running 3D Slicer application, and
nothing that Slicer does not bundle (numpy; the rest is the standard library).

- ``client``: REST calls to a monai-sal MONAI Label server, cancellable from another thread;
- ``jobs``: requests on a worker thread, polled from the GUI thread, with progress and cancel;
- ``scene``: volumes, heatmaps, display, segments, tables and plots in an MRML scene;
- ``comparison``: a heatmap against a segment with ``localization`` (the project's metrics,
  a byte-for-byte copy of ``monai_sal_app/metrics/localization.py``);
- ``trust``: a method's trust card verdicts as text;
- ``colormaps``: colour table nodes; ``batch``: what a batch explains;
- ``logic``: the workflow that ties them together (held by the module's Logic).
"""
