"""Infer tasks: :class:`~monai_sal_app.lib.infers.saliency.SaliencyInfer` (probabilities + heatmap)."""
