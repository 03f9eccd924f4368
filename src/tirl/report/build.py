"""Build a run's report: `report.html` (self-contained) and `plots/*.png` in the run directory."""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tirl.errors import TirlError
from tirl.report import html
from tirl.report.data import RunData, read_run
from tirl.report.plots import MATPLOTLIB_HINT, Plot, render_eval_plot, render_training_plots
from tirl.report.tokens import TokenTable, load_decoder, tokenizer_dirs
from tirl.report.viewer import ViewerLimits, viewer_payload


class ReportError(TirlError):
    """The run finished and its results are saved, but its report could not be built."""

    exit_status = 3
    """The CLI's exit status for it (2 is a bad config; 3 says the run itself is fine)."""


@dataclass(frozen=True)
class Report:
    """What `build_report` wrote."""

    path: Path
    """The HTML file."""
    plots: tuple[Path, ...]
    """The PNG files (also embedded in the page)."""
    trajectories: int
    """Trajectories the viewer carries."""
    seconds: float
    notes: tuple[str, ...]
    """What the report leaves out and why (also shown in the page)."""


def build_report(run_dir: Path | str, out: Path | str | None = None, limits: ViewerLimits = ViewerLimits(),
                 tokens: bool = True) -> Report:
    """Read `run_dir` and write its report to `out` (default `<run_dir>/report.html`), PNGs to `plots/`
    next to it. Works on a finished, running or interrupted run. Raises `DataError` for a directory that
    is not a run or holds a malformed file (named)."""
    t0 = time.monotonic()
    run = read_run(run_dir)
    out = Path(out) if out else run.run_dir / "report.html"
    notes = list(run.notes)
    plots = _plots(run, notes)
    table = _token_table(run, notes) if tokens else None
    if not tokens:
        notes.append("token view left out (--no-tokens)")
    payload = viewer_payload(run, limits, table)
    sections = _sections(run, plots, limits, notes)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = html.page(f"tirl run {_run_name(run)}", html.header_html(_run_name(run), run.info, run.complete, generated),
                     sections, payload)
    png_paths = _write_pngs(plots, out.parent / "plots")
    _write_atomically(out, text)
    return Report(out, tuple(png_paths), len(payload["trajs"]), time.monotonic() - t0, tuple(notes))


def _run_name(run: RunData) -> str:
    return str((run.config.get("run") or {}).get("name") or run.run_dir.name)


def _plots(run: RunData, notes: list[str]) -> list[Plot]:
    """Training curves, then the eval bar chart; none (with a note) without matplotlib."""
    try:
        curves = render_training_plots({"rl": run.stage_metrics("rl"), "sft": run.stage_metrics("sft")})
        bars = render_eval_plot({s.name: s.summary for s in run.evals})
    except ImportError as e:
        if MATPLOTLIB_HINT not in str(e):
            raise
        notes.append(f"no plots: {MATPLOTLIB_HINT}")
        return []
    return [*curves, *([bars] if bars else [])]


def _token_table(run: RunData, notes: list[str]) -> TokenTable | None:
    decoder, where = load_decoder(tokenizer_dirs(run.run_dir, run.info, run.config))
    if decoder is None:
        notes.append(f"token view left out: the run's tokenizer was not found ({where})")
        return None
    return TokenTable(decoder)


def _sections(run: RunData, plots: list[Plot], limits: ViewerLimits, notes: list[str]) -> list[tuple[str, str, str]]:
    eval_plot = [p for p in plots if p.name == "eval"]
    curves = [p for p in plots if p.name != "eval"]
    no_curves = ("no plots: " + MATPLOTLIB_HINT if any(MATPLOTLIB_HINT in n for n in notes)
                 else "This run has no training metrics yet.")
    cap = (f"The page carries at most {limits.per_step} trajectories per RL step and {limits.per_eval} per eval "
           "stage, spread over the groups (or right and wrong answers); `tirl report --per-step N --per-eval N` "
           "changes that. Tokens are shaded by loss mask: sampled by the policy (trained on) or inserted by the "
           "environment (prompt tail, tool output).")
    sections = [
        ("evaluation", "Evaluation", html.eval_table_html(list(run.evals)) + html.plots_html(eval_plot, "", wide=True)),
        ("training", "Training curves", html.plots_html(curves, no_curves)),
        ("trajectories", "Trajectories", f'<p class="cap">{html.esc(cap)}</p><div id="viewer"></div>'),
        ("config", "Config", html.pre_html(run.config_text, "config.yaml is missing")
         + "<h3>run.json</h3>" + html.pre_html(_pretty(run.info), "run.json is missing")),
    ]
    if notes:
        sections.append(("notes", "Notes", html.notes_html(notes)))
    return sections


def _pretty(info: dict) -> str:
    return json.dumps(info, indent=1) if info else ""


def _write_pngs(plots: list[Plot], plot_dir: Path) -> list[Path]:
    if not plots:
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in plots:
        paths.append(plot_dir / f"{p.name}.png")
        paths[-1].write_bytes(p.png)
    return paths


def _write_atomically(path: Path, text: str) -> None:
    """Readers (a browser refreshing the page) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8", errors="replace")
    tmp.replace(path)


def report_after_run(run_dir: Path) -> Report:
    """The end-of-run report, called once the run's results are saved. A failure prints its traceback
    and raises `ReportError` (exit status 3) saying the run is fine and how to rebuild the report."""
    from tirl.trainer.display import console

    try:
        report = build_report(run_dir)
    except Exception as e:
        traceback.print_exc()
        raise ReportError(f"the run finished and its results are saved in {run_dir}, but building its report "
                          f"failed ({type(e).__name__}: {e}); rebuild it with `tirl report {run_dir}`") from e
    console.print(f"report: {report.path}  ({report.seconds:.1f} s)")
    return report


def report_from_command_line(run_dir: str, out: str | None, per_step: int, per_eval: int, tokens: bool) -> int:
    """`tirl report`: build, print where it went and what it left out; returns the exit status."""
    from tirl.trainer.display import console

    report = build_report(run_dir, out, ViewerLimits(per_step, per_eval), tokens)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(f"report: {report.path}  ({len(report.plots)} plots, {report.trajectories} trajectories, "
                  f"{report.seconds:.1f} s)")
    return 0
