"""A method's trust card verdicts for one model, as text next to a method or a map.

The server carries the model's trust card in ``/info`` (``models.<name>.trust``: per method) and
each answer carries the used method's entry (``result["trust"]``). Without a card the text says so
and why.
"""

from __future__ import annotations

__all__ = ["CHECKS", "FAILED_MEANS", "method_trust", "trust_lines", "trust_tag"]

CHECKS = ("randomization", "fidelity", "localization", "repeatability")

# What a failed check means for reading the map (one line each).
FAILED_MEANS = {
    ("randomization", "fails"): "the map stays alike when the model's weights are randomized: "
    "it shows the image, not this model's reasons",
    ("fidelity", "does not track the model"): "removing what the map highlights does not hurt the "
    "prediction more than removing what it ignores",
    ("localization", "not better than chance"): "on held-out masks the map points at the lesion no better than chance",
    ("repeatability", "fails"): "another training run of the model gives a different map",
}


def method_trust(trust: dict | None, method: str | None = None) -> dict:
    """``{"available": bool, "verdicts": {check: verdict}, "stale": bool, "why": str}`` for
    ``method`` from a ``/info`` trust entry (which lists every method), or from an answer's
    ``trust`` (one method's entry, ``method`` not needed)."""
    if not trust:
        return {"available": False, "verdicts": {}, "stale": False, "why": "no trust card"}
    if not trust.get("available", False):
        return {"available": False, "verdicts": {}, "stale": False, "why": str(trust.get("why", "no trust card"))}
    entry = trust
    if "methods" in trust:
        entry = trust["methods"].get(method)
        if entry is None:
            return {"available": False, "verdicts": {}, "stale": False, "why": f"the trust card has no {method}"}
    verdicts = {check: entry["verdicts"][check] for check in CHECKS if check in entry.get("verdicts", {})}
    return {"available": True, "verdicts": verdicts, "stale": bool(trust.get("stale", False)), "why": ""}


def trust_tag(trust: dict | None, method: str | None = None) -> str:
    """A few words for a menu entry, e.g. ``randomization fails, fidelity tracks the model`` or
    ``no trust card``."""
    found = method_trust(trust, method)
    if not found["available"]:
        return "no trust card"
    tag = ", ".join(f"{check} {verdict}" for check, verdict in found["verdicts"].items()) or "no verdicts"
    return tag + (" (stale)" if found["stale"] else "")


def trust_lines(trust: dict | None, method: str | None = None) -> list[str]:
    """One line per check, ``check: verdict``, followed by what it means when the check failed;
    ``no trust card: <why>`` without one; a last line when the card is older than the weights."""
    found = method_trust(trust, method)
    if not found["available"]:
        return [f"no trust card: {found['why']}" if found["why"] != "no trust card" else "no trust card"]
    lines = []
    for check, verdict in found["verdicts"].items():
        meaning = FAILED_MEANS.get((check, verdict))
        lines.append(f"{check}: {verdict}" + (f" ({meaning})" if meaning else ""))
    if found["stale"]:
        lines.append("stale: the model was retrained after its trust card was computed")
    return lines or ["the trust card has no verdicts for this method"]
