"""``POST /scoring/trust``: recompute the trust cards of the served models on the datastore's images.

MONAI Label runs scoring methods in a background process (``?run_sync=true`` waits for the answer)
and, by default, again after every train task and datastore change
(``MONAI_LABEL_AUTO_UPDATE_SCORING``), so a retrained model's card follows its new weights.

Per served model: every datastore image of the model's dimensionality (up to ``max_images``, in
datastore order) with its ``final`` label as mask when it has one, through the same
``evaluation.inputs.load_trust_inputs`` and ``evaluation.trust.trust_card`` as
``monai-sal trust``; the card is written beside the checkpoint (``<name>.trust.json``), where
``/info`` and the infer answers read it, with the datastore ids of the images it rests on.

The served card is never silently replaced by a weaker one: a new card replaces it only when it
rests on at least as many images, when the card on disk is missing, corrupt, of another schema
version or older than the weights, or when the request says ``replace``; a datastore that offers
the very images the card already rests on leaves it alone (automatic rescoring after a datastore
change does not churn it). The answer says, per model, whether the card was written or kept and
why. Request parameters (all optional): ``model`` (one served model; default all), ``methods``,
``checks``, ``max_images`` (default 32), ``seed``, ``replace`` (default false).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from monai_sal_app.data.io import ImageError, read_image
from monai_sal_app.evaluation.inputs import load_trust_inputs
from monai_sal_app.evaluation.trust import (
    DEFAULT_CHECKS,
    DEFAULT_TRUST_METHODS,
    read_trust_card,
    trust_card,
    trust_card_path,
    write_trust_card,
)
from monai_sal_app.lib.errors import RequestError
from monai_sal_app.lib.served_model import ServedModel
from monai_sal_app.models.train import predict_probabilities

__all__ = ["TrustScoring"]

logger = logging.getLogger(__name__)
DEFAULTS = {
    "methods": list(DEFAULT_TRUST_METHODS),
    "checks": list(DEFAULT_CHECKS),
    "max_images": 32,
    "seed": 0,
    "replace": False,
}


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

    @staticmethod
    def _keep_reason(served: ServedModel, ids: list[str], replace: bool) -> str:
        """Why the card on disk stays (empty: it may be replaced by one on the images ``ids``)."""
        if replace:
            return ""
        try:
            current = read_trust_card(served.path)
        except ValueError:  # corrupt or of another schema version: replaced
            return ""
        if current is None or served.trust().get("stale"):
            return ""
        rests_on = current.get("data", {})
        if rests_on.get("images") == ids:
            return f"the card already rests on these {len(ids)} datastore images"
        if int(rests_on.get("n_images", 0)) > len(ids):
            return (
                f"the card rests on {rests_on.get('n_images')} images ({rests_on.get('source', 'unknown source')}), "
                f"more than the {len(ids)} datastore images; send replace=true to replace it anyway"
            )
        return ""

    def reasons_to_score(self, datastore: Datastore | None) -> dict[str, str]:
        """Per served model, why its card should be recomputed at the server's start: none, corrupt
        or of another schema, older than its weights, or older than a datastore image or label
        (``datastore`` None: a remote datastore, whose changes are not seen here). Empty when every
        card is current."""
        newest = _newest_datastore_file(datastore) if datastore is not None else None
        reasons = {}
        for name, served in self.served.items():
            path = trust_card_path(served.path)
            try:
                card = read_trust_card(served.path)
            except ValueError as error:
                reasons[name] = str(error)
                continue
            if card is None:
                reasons[name] = "no trust card"
            elif served.files_modified_ns() > os.stat(path).st_mtime_ns:
                reasons[name] = "the weights are newer than the trust card"
            elif newest is not None and newest[0] > os.stat(path).st_mtime_ns:
                reasons[name] = f"the datastore changed since the trust card ({newest[1]})"
        return reasons

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
            with served.use() as loaded:
                model, card = loaded.network, loaded.card
                chosen = [item for item, dims in items if dims == card.spatial_dims][: int(options["max_images"])]
                if len(chosen) < 2:
                    result[name] = {
                        "skipped": f"{len(chosen)} datastore image(s) of {card.spatial_dims}D: a card needs 2"
                    }
                    continue
                ids = [item["id"] for item in chosen]
                checked = time.time_ns()  # weights written after this still make the card stale
                kept = self._keep_reason(served, ids, bool(options["replace"]))
                if kept:
                    os.utime(trust_card_path(served.path), ns=(checked, checked))  # module docstring
                    result[name] = {"kept": kept}
                    logger.info("trust card of %s kept: %s", name, kept)
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
                    data={
                        "source": "datastore",
                        "first_images": len(chosen),
                        "images": ids,
                        "checkpoint": served.path.name,
                    },
                )
                write_trust_card(trust, served.path)
            result[name] = {
                "written": True,
                "n_images": len(chosen),
                "verdicts": {method: entry["verdicts"] for method, entry in trust["methods"].items()},
                "seconds": trust["seconds"],
            }
            logger.info("trust card of %s recomputed on %d datastore images", name, len(chosen))
        return result


def _newest_datastore_file(datastore: Datastore) -> tuple[int, str] | None:
    """(modification time in ns, id) of the datastore's newest image or label file; None for an
    empty datastore."""
    newest = None
    for image_id in datastore.list_images():
        paths = [datastore.get_image_uri(image_id)]
        for tag, label_id in datastore.get_labels_by_image_id(image_id).items():
            paths.append(datastore.get_label_uri(label_id, tag))
        for path in paths:
            try:
                stamp = os.stat(path).st_mtime_ns
            except OSError:
                continue
            if newest is None or stamp > newest[0]:
                newest = (stamp, image_id)
    return newest
