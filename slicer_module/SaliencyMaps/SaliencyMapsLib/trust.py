"""A method's trust card for one model, as text next to a method or a map.

The server carries the model's trust card in ``/info`` (``models.<name>.trust``: per method) and
each answer carries the used method's entry (``result["trust"]``). Each check comes with its
question, its answer ("yes" / "no" / "unclear"; repeatability also "partly" or "not assessable")
and what the answer means, in the server's words (``lines``), so that the module, the reports and
the REST answers say the same thing. Without a card the text says so and why.
"""

from __future__ import annotations

__all__ = ["SHORT_QUESTIONS", "method_trust", "trust_lines", "trust_tag"]

# A few words per check for a menu entry (the full question is in the card's lines).
SHORT_QUESTIONS = {
    "randomization": "depends on model",
    "fidelity": "tracks use",
    "localization": "localizes",
    "repeatability": "repeatable",
}


def method_trust(trust: dict | None, method: str | None = None) -> dict:
    """``{"available": bool, "entry": the method's summary, "reading": str, "stale": bool, "why": str}``
    for ``method`` from a ``/info`` trust entry (which lists every method), or from an answer's
    ``trust`` (one method's entry, ``method`` not needed)."""
    if not trust or not trust.get("available", False):
        why = str((trust or {}).get("why", "")) or "no trust card"
        return {"available": False, "entry": {}, "reading": "", "stale": False, "why": why}
    entry = trust
    if "methods" in trust:
        entry = trust["methods"].get(method)
        if entry is None:
            return {
                "available": False,
                "entry": {},
                "reading": "",
                "stale": False,
                "why": f"the trust card has no {method}",
            }
    return {
        "available": True,
        "entry": entry,
        "reading": str(trust.get("reading", "")),
        "stale": bool(trust.get("stale", False)),
        "why": "",
    }


def trust_tag(trust: dict | None, method: str | None = None) -> str:
    """A few words for a menu entry, e.g. ``depends on model: yes, tracks use: unclear`` or
    ``no trust card``."""
    found = method_trust(trust, method)
    if not found["available"]:
        return "no trust card"
    verdicts = found["entry"].get("verdicts", {})
    tag = ", ".join(f"{SHORT_QUESTIONS.get(check, check)}: {answer}" for check, answer in verdicts.items())
    return (tag or "no verdicts") + (" (stale)" if found["stale"] else "")


def trust_lines(trust: dict | None, method: str | None = None) -> list[str]:
    """The card's lines for the method, one per check (``<question>: <answer> (<meaning>)``), then
    how to read them; ``no trust card: <why>`` without a card; a last line when the card is older
    than the weights."""
    found = method_trust(trust, method)
    if not found["available"]:
        return [f"no trust card: {found['why']}" if found["why"] != "no trust card" else "no trust card"]
    lines = list(found["entry"].get("lines", [])) or ["the trust card has no verdicts for this method"]
    if found["reading"]:
        lines.append(f"how to read it: {found['reading']}")
    if found["stale"]:
        lines.append("stale: the model was retrained after its trust card was computed")
    return lines
