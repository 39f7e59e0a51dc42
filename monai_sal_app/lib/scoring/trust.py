"""``POST /scoring/trust``: recompute the trust cards of the served models on the datastore's images.

MONAI Label runs scoring methods in a background process (``?run_sync=true`` waits for the answer)
and, by default, again after every train task and datastore change
(``MONAI_LABEL_AUTO_UPDATE_SCORING``), so a retrained model's card follows its new weights.

Per served model: every datastore image of the model's dimensionality (up to ``max_images``, in
datastore order) with its ``final`` label as mask when it has one, through the same
``experiments.trust_report.load_trust_inputs`` and ``evaluation.trust.trust_card`` as
``monai-sal trust``; the card is written beside the checkpoint (``<name>.trust.json``), where
``/info`` and the infer answers read it. Request parameters (all optional): ``model`` (one served
model; default all), ``methods``, ``checks``, ``max_images`` (default 32), ``seed``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from monai_sal_app.data.io import ImageError, read_image
from monai_sal_app.evaluation.trust import DEFAULT_CHECKS, DEFAULT_TRUST_METHODS, trust_card, write_trust_card
from monai_sal_app.experiments.trust_report import load_trust_inputs
from monai_sal_app.lib.errors import RequestError
from monai_sal_app.lib.served_model import ServedModel
from monai_sal_app.models.train import predict_probabilities

__all__ = ["TrustScoring"]

logger = logging.getLogger(__name__)
DEFAULTS = {"methods": list(DEFAULT_TRUST_METHODS), "checks": list(DEFAULT_CHECKS), "max_images": 32, "seed": 0}


class TrustScoring(ScoringMethod):
    """The trust cards of the served models, recomputed on the datastore images."""

    def __init__(self, served: dict[str, ServedModel]) -> None:
        super().__init__("trust cards of the served models on the datastore images (as monai-sal trust)")
        self.served = served

    def info(self) -> dict[str, Any]:
        return {**super().info(), "config": DEFAULTS}

    def _items(self, datastore: Datastore) -> list[tuple[dict, int]]:
        """(manifest-like item, spatial dims) of every readable datastore image."""
        items = []
        for image_id in datastore.list_images():
            path = datastore.get_image_uri(image_id)
            try:
                dims = read_image(path)[0].ndim
            except (ImageError, ValueError, OSError) as error:
                logger.info("trust scoring: %s skipped (%s)", image_id, error)
                continue
            label_id = datastore.get_labels_by_image_id(image_id).get("final")
            mask = datastore.get_label_uri(label_id, "final") if label_id else None
            items.append(({"id": image_id, "image": path, "mask": mask, "label": None}, dims))
        return items

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        options = {**DEFAULTS, **{k: request[k] for k in DEFAULTS if k in request}}
        names = [request["model"]] if request.get("model") else list(self.served)
        unknown = [n for n in names if n not in self.served]
        if unknown:
            raise RequestError(404, f"unknown model(s) {unknown}; served: {', '.join(self.served)}")
        items = self._items(datastore)
        result: dict[str, Any] = {}
        for name in names:
            served = self.served[name]
            with served.use() as (model, card):
                chosen = [item for item, dims in items if dims == card.spatial_dims][: int(options["max_images"])]
                if len(chosen) < 2:
                    result[name] = {
                        "skipped": f"{len(chosen)} datastore image(s) of {card.spatial_dims}D: a card needs 2"
                    }
                    continue
                images, _, masks = load_trust_inputs(chosen, card)
                targets = torch.from_numpy(card.predict(predict_probabilities(model, images)))
                trust = trust_card(
                    model,
                    images,
                    masks=masks,
                    methods=options["methods"],
                    checks=options["checks"],
                    seed=int(options["seed"]),
                    targets=targets,
                    data={"source": "datastore", "first_images": len(chosen), "checkpoint": served.path.name},
                )
                write_trust_card(trust, served.path)
            result[name] = {
                "n_images": len(chosen),
                "verdicts": {method: entry["verdicts"] for method, entry in trust["methods"].items()},
                "seconds": trust["seconds"],
            }
            logger.info("trust card of %s recomputed on %d datastore images", name, len(chosen))
        return result
