"""``report.html``: one self-contained page per experiment run.

Every figure is embedded as a base64 PNG and the style sheet is inline: the file opens offline,
can be mailed or archived alone, and loads nothing from the network. Each section starts with the
question its table answers; a summary's ``<m>_mean``/``<m>_ci_low``/``<m>_ci_high`` columns are
shown as one cell, ``mean [low, high]``; the verdict column (yes / no / unclear, :data:`VERDICT_STYLES`)
is coloured. The run's
resolved config, the package versions and the data's hashes close the page.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from monai_sal_app.files import write_text

__all__ = ["render_report", "table_html", "write_report"]

# The colour of a verdict cell by its answer: green "yes", red "no", amber anything else
# ("unclear", "partly", "not assessable").
VERDICT_STYLES = {"yes": "yes", "no": "no"}

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1d2329; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.25em; margin-top: 2em;
       border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
p.question { font-size: 1.05em; background: #f3f6fa; border-left: 4px solid #3a6ea5; padding: .5em .8em; }
p.meta { color: #57606a; font-size: .9em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .88em; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left; }
th { background: #f6f8fa; } th small { font-weight: normal; color: #57606a; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.yes { background: #dafbe1; color: #116329; font-weight: 600; }
td.no { background: #ffebe9; color: #a40e26; font-weight: 600; }
td.unclear { background: #fff8c5; color: #7d4e00; font-weight: 600; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: .85em; color: #57606a; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .85em; }
"""


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _format(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if _number(value):
        if isinstance(value, numbers.Integral):
            return str(int(value))
        if not math.isfinite(float(value)):
            return "n/a"
        return f"{float(value):.{digits}f}"
    return str(value)


def _merged_columns(rows: Sequence[Mapping]) -> list[tuple[str, tuple[str, ...]]]:
    """(header, source keys): ``m_mean``/``m_ci_low``/``m_ci_high`` become one column ``m``."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    columns, used = [], set()
    for key in keys:
        if key in used:
            continue
        if key.endswith("_mean"):
            stem = key[: -len("_mean")]
            low, high = f"{stem}_ci_low", f"{stem}_ci_high"
            if low in keys and high in keys:
                columns.append((stem, (key, low, high)))
                used.update((key, low, high))
                continue
        columns.append((key, (key,)))
        used.add(key)
    return columns


def _cell(row: Mapping, sources: tuple[str, ...], verdict: str | None) -> str:
    if len(sources) == 3:
        mean, low, high = (row.get(k) for k in sources)
        text = _format(mean)
        if _number(low) and _number(high) and math.isfinite(low) and math.isfinite(high):
            text += f" [{_format(low)}, {_format(high)}]"
        return f'<td class="num">{html.escape(text)}</td>'
    value = row.get(sources[0])
    css = []
    if _number(value):
        css.append("num")
    if sources[0] == verdict and value is not None:
        css.append(VERDICT_STYLES.get(str(value).lower(), "unclear"))
    attr = f' class="{" ".join(css)}"' if css else ""
    return f"<td{attr}>{html.escape(_format(value))}</td>"


def table_html(rows: Sequence[Mapping], verdict: str | None = None) -> str:
    """An HTML table of ``rows``; summary triples merged, the ``verdict`` column coloured."""
    if not rows:
        return "<p><em>no rows</em></p>"
    columns = _merged_columns(rows)
    head = "".join(
        f"<th>{html.escape(name)}" + ("<br><small>mean [95% CI]</small>" if len(src) == 3 else "") + "</th>"
        for name, src in columns
    )
    body = "".join("<tr>" + "".join(_cell(row, src, verdict) for _, src in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    caption = html.escape(Path(path).stem.replace("_", " "))
    return (
        f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'
    )


def render_report(
    title: str, question: str, sections: Sequence, config: Mapping, environment: Mapping, data: Mapping
) -> str:
    """The page's HTML. ``sections``: objects with ``title``, ``question``, ``rows``, ``figures``,
    ``verdict`` and ``note`` (``runner.Section``)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if question:
        parts.append(f'<p class="question">{html.escape(question)}</p>')
    seconds = environment.get("seconds")
    parts.append(
        f'<p class="meta">scale <b>{html.escape(str(config.get("scale", "")))}</b>, seed {config.get("seed")}, '
        f"{environment.get('world_size', 1)} process(es) on {html.escape(str(environment.get('device', '')))}"
        + (f", {environment['torch_threads']} thread(s) each" if "torch_threads" in environment else "")
        + (f", {seconds:.0f} s" if isinstance(seconds, (int, float)) else "")
        + (
            f", peak memory {environment['peak_resident_memory_mb'] / 1024:.1f} GiB ({html.escape(str(environment.get('allocator')))})"
            if isinstance(environment.get("peak_resident_memory_mb"), (int, float))
            else ""
        )
        + (" in this invocation (resumed: earlier steps were read back)" if environment.get("resumed") else "")
        + "</p>"
    )
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.question:
            parts.append(f'<p class="question">{html.escape(section.question)}</p>')
        if section.rows:
            parts.append(table_html(section.rows, section.verdict))
        if section.note:
            parts.append(f"<p>{html.escape(section.note)}</p>")
        parts.extend(_figure(f) for f in section.figures)
        parts.append("</section>")
    packages = environment.get("packages", {})
    parts += [
        "<section><h2>Run</h2>",
        table_html([{"package": k, "version": v or "not installed"} for k, v in packages.items()]),
        table_html([{"data": k, **v} for k, v in data.items()]) if data else "",
        "<h3>Resolved config</h3>",
        f"<pre>{html.escape(yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=False))}</pre>",
        "</section></body></html>",
    ]
    return "\n".join(parts)


def write_report(run, path: Path, config: Mapping, environment: Mapping) -> Path:
    """Write ``run``'s report (a ``runner.Run``) to ``path`` atomically."""

    text = render_report(
        run.config["title"], run.config["question"], run.sections, config, environment, run.data_hashes
    )
    return write_text(Path(path), text)
