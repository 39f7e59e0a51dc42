"""TaskConfig of one served classifier: whatever model source sits in the model folder.

The app makes one :class:`ClassifierConfig` per source found there (``served_model.find_model_sources``:
our checkpoint and card, a MONAI bundle, TorchScript, a factory), so serving another model is
only a matter of putting it there. Everything about the network (dimension, labels, input size)
comes from its card or metadata; nothing is hard-coded per model. Only our own checkpoints have
a train task (the others are trained where they were made).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from monailabel.interfaces.config import TaskConfig

from monai_sal_app.lib.infers.saliency import SaliencyInfer
from monai_sal_app.lib.limits import ServerLimits
from monai_sal_app.lib.served_model import ServedModel
from monai_sal_app.lib.trainers.classifier import ClassifierTrainer

__all__ = ["ClassifierConfig"]


class ClassifierConfig(TaskConfig):
    """Infer task (:class:`SaliencyInfer`) and train task (:class:`ClassifierTrainer`) of ``<name>.pt``.

    ``init(name, model_dir, conf, planner, path=source, device=torch.device, studies=str,
    limits=ServerLimits)`` (``path``: the model source, default ``<model_dir>/<name>.pt``; ``limits``
    read from ``conf`` when not given); check
    :meth:`problem` before serving: a model whose checkpoint is missing or unloadable is not served.
    """

    def init(self, name: str, model_dir: str, conf: dict[str, Any], planner: Any, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.path = str(kwargs.get("path") or os.path.join(model_dir, f"{name}.pt"))
        self.served = ServedModel(name, self.path, kwargs.get("device") or torch.device("cpu"))
        self.studies = kwargs.get("studies", "")
        self.limits = kwargs.get("limits") or ServerLimits.from_conf(conf or {})

    def problem(self) -> str | None:
        """Why this model cannot be served (missing or unloadable checkpoint), None when it can."""
        return self.served.problem()

    def infer(self) -> SaliencyInfer:
        card = self.served.card()
        return SaliencyInfer(self.name, self.served, description=card.description, limits=self.limits)

    def trainer(self) -> ClassifierTrainer:
        return ClassifierTrainer(self.name, self.served, self.studies)
