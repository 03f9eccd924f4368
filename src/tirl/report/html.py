"""The report page: one static HTML file with its CSS, JavaScript, plots (data URIs) and data inline.

Safety contract: everything that comes from the run (config values, model text, tool output, task
ids) is untrusted. Server-side text goes through `html.escape`; the viewer's data is embedded as
JSON inside `<script type="application/json">` with `<`, `>` and `&` written as JSON escapes (so no
`</script>` can end the block), and the page's script inserts it only as text nodes.
"""

from __future__ import annotations

import base64
import html
import json
import math
from importlib import resources
from string import Template
from typing import Any

from tirl.report.data import EvalStage
from tirl.report.plots import Plot

EVAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("problems", "problems"), ("samples", "samples"), ("accuracy", "accuracy"), ("pass@1", "pass@1"),
    ("reward/mean", "reward"), ("tool_calls/rate", "tool-call rate"), ("tool_calls/mean", "calls / trajectory"),
    ("tool_calls/invalid_rate", "invalid calls"), ("tool_calls/error_rate", "failed calls"),
    ("tool_productivity", "tool productivity"), ("tokens/sampled_mean", "sampled tokens"),
    ("stop/answered", "answered"), ("turns/mean", "turns"))
"""(summary key, column label) of the eval table, each shown where some stage has it; `accuracy/level_*`
columns follow. A summary's `ci[key]` ([low, high]) is shown under the value."""


def json_for_script(value: Any) -> str:
    """`value` as JSON that is safe inside a `<script type="application/json">` element: no `<`, `>`,
    `&` or line/paragraph separators appear raw (they are \\u escapes, which JSON.parse restores)."""
    try:
        text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN or infinity somewhere (JSON.parse rejects them): null instead
        text = json.dumps(_finite_tree(value), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite_tree(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_tree(v) for v in value]
    return value


def esc(value: Any) -> str:
    """Text for HTML element content or a quoted attribute."""
    return html.escape(str(value), quote=True)


def page(title: str, header: str, sections: list[tuple[str, str, str]], payload: dict[str, Any]) -> str:
    """The whole document. `sections` are (anchor id, heading, inner HTML already escaped)."""
    nav = " ".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h, _ in sections)
    body = "\n".join(f'<section id="{esc(a)}"><h2>{esc(h)}</h2>\n{inner}\n</section>' for a, h, inner in sections)
    template = Template(_asset("page.html"))
    return template.substitute(title=esc(title), header=header, nav=nav, sections=body,
                               style=_asset("report.css"), script=_asset("viewer.js"),
                               data=json_for_script(payload))


def _asset(name: str) -> str:
    return resources.files("tirl.report").joinpath("assets", name).read_text(encoding="utf-8")


def header_html(run_name: str, info: dict[str, Any], complete: bool, generated: str) -> str:
    """The run's identity: model, device, dtype, tirl version, whether it finished."""
    facts = [("model", info.get("model")), ("device", info.get("device")), ("dtype", info.get("compute_dtype")),
             ("tirl", info.get("tirl_version")), ("status", "complete" if complete else "incomplete (in progress "
                                                 "or interrupted)"), ("report built", generated)]
    items = "".join(f"<li><b>{esc(k)}</b> {esc(v)}</li>" for k, v in facts if v is not None)
    return f'<h1>tirl run <span class="run-name">{esc(run_name)}</span></h1><ul class="facts">{items}</ul>'


def eval_table_html(stages: list[EvalStage]) -> str:
    """One row per eval stage (tools on or off): the `EVAL_COLUMNS` some stage has, then accuracy per level."""
    if not stages:
        return '<p class="absent">This run has no evaluation.</p>'
    levels = sorted({k for s in stages for k in s.summary if k.startswith("accuracy/level_")},
                    key=lambda k: (len(k), k))
    columns = [(k, label) for k, label in EVAL_COLUMNS if any(s.summary.get(k) is not None for s in stages)]
    columns += [(k, k.removeprefix("accuracy/").replace("_", " ")) for k in levels]
    head = "<tr><th>stage</th><th>tools</th>" + "".join(f"<th>{esc(label)}</th>" for _, label in columns)
    head += "<th>state</th></tr>"
    rows = []
    for s in stages:
        cells = "".join(f'<td class="num">{_cell(s.summary, k)}</td>' for k, _ in columns)
        tools = "without" if s.name.endswith("_no_tools") else "with"
        state = "complete" if s.complete else "partial"
        rows.append(f'<tr data-stage="{esc(s.name)}"><td>{esc(s.name)}</td><td>{tools}</td>{cells}'
                    f"<td>{state}</td></tr>")
    return f'<table class="eval-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _cell(summary: dict[str, Any], key: str) -> str:
    """The value, with its interval `ci[key]` below it where the summary has one."""
    text = esc(_fmt(summary.get(key)))
    ci = (summary.get("ci") or {}).get(key) if isinstance(summary.get("ci"), dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        text += f'<div class="ci">{esc(_fmt(float(ci[0])))}–{esc(_fmt(float(ci[1])))}</div>'
    return text


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return str(v) if isinstance(v, int) else f"{v:.3f}"


def figure_html(plot: Plot) -> str:
    """The plot as an inline PNG (data URI); its title (drawn in the image) is the alt text."""
    data = base64.b64encode(plot.png).decode("ascii")
    return (f'<figure class="plot" data-plot="{esc(plot.name)}"><img alt="{esc(plot.title)}" '
            f'title="{esc(plot.title)}" src="data:image/png;base64,{data}"></figure>')


def plots_html(plots: list[Plot], absent: str, wide: bool = False) -> str:
    """A grid of figures (one wide column if `wide`), or a note saying why there are none."""
    if not plots:
        return f'<p class="absent">{esc(absent)}</p>' if absent else ""
    return f'<div class="plots{" wide" if wide else ""}">' + "".join(map(figure_html, plots)) + "</div>"


def notes_html(notes: list[str]) -> str:
    return "<ul class=\"notes\">" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"


def pre_html(text: str, empty: str) -> str:
    return f"<pre>{esc(text)}</pre>" if text else f'<p class="absent">{esc(empty)}</p>'
