"""Reading a run directory for the report: config, metrics, RL step trajectories, eval stages.

A run directory may belong to a run that is still going or was killed: a last JSONL line without
its newline that does not parse is a write cut short; it is skipped and named in `RunData.notes`.
Any other malformed line raises `DataError` naming the file and line. Files that a run has not
written (no RL stage, no eval yet) are simply absent from the result.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tirl.errors import DataError
from tirl.rollout.io import from_dict
from tirl.rollout.metrics import trajectory_metrics
from tirl.types import Trajectory

EVAL_ORDER = ("base", "base_no_tools", "eval", "eval_no_tools", "sft", "sft_no_tools", "final", "final_no_tools")
"""Eval stage names in pipeline order; stages with other names follow, sorted by name."""

_STEP_FILE = re.compile(r"^step_(\d+)(\.untrained)?\.jsonl$")
T = TypeVar("T")


@dataclass(frozen=True)
class EvalStage:
    """One evaluation of the run (e.g. `base`, `sft_no_tools`, `final`)."""

    name: str
    """The stage's name: its files are `eval/<name>.jsonl` and `eval/<name>.summary.json`."""
    summary: dict[str, Any]
    """The written summary, or (incomplete stage) metrics computed from the trajectories so far."""
    complete: bool
    """True when the summary file exists (the evaluation finished)."""
    trajectories: tuple[Trajectory, ...]
    """Every trajectory of the stage, in file order."""


@dataclass(frozen=True)
class StepTrajectories:
    """The trajectories saved for one RL step."""

    step: int
    """1-based RL step (the number in `step_NNNNNN.jsonl`)."""
    trained: tuple[Trajectory, ...]
    """Trajectories the update trained on."""
    untrained: tuple[Trajectory, ...]
    """Filtered groups and failed samples (`step_N.untrained.jsonl`)."""


@dataclass(frozen=True)
class RunData:
    """Everything the report shows, read from one run directory."""

    run_dir: Path
    config_text: str
    """`config.yaml` as written (empty if missing)."""
    config: dict[str, Any]
    """`config.yaml` parsed (empty if missing)."""
    info: dict[str, Any]
    """`run.json`: versions, model, device, tools (empty if missing)."""
    metrics: tuple[dict[str, Any], ...]
    """`metrics.jsonl` records `{"stage", "step", ...}` in file order; non-finite values are None."""
    evals: tuple[EvalStage, ...]
    """Eval stages in pipeline order."""
    steps: tuple[StepTrajectories, ...]
    """RL steps with saved trajectories, by step."""
    complete: bool
    """True when the run finished (`results.json` exists)."""
    notes: tuple[str, ...]
    """What the reader skipped and why (shown in the report)."""

    def stage_metrics(self, stage: str) -> list[dict[str, Any]]:
        """Metric records of one stage (`sft` or `rl`), later lines for the same step winning."""
        by_step = {r["step"]: r for r in self.metrics if r.get("stage") == stage and isinstance(r.get("step"), int)}
        return [by_step[s] for s in sorted(by_step)]


def read_run(run_dir: Path | str) -> RunData:
    """Read a run directory; raises `DataError` if it is not one (no config.yaml and no metrics.jsonl)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    if not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.jsonl").exists():
        raise DataError(f"{run_dir}: not a tirl run directory (it has neither config.yaml nor metrics.jsonl)")
    notes: list[str] = []
    config_text = _read_text(run_dir / "config.yaml")
    config = _parse_yaml(run_dir / "config.yaml", config_text)
    info = _parse_json(run_dir / "run.json")
    metrics = tuple(read_records(run_dir / "metrics.jsonl", notes))
    return RunData(run_dir=run_dir, config_text=config_text, config=config, info=info, metrics=metrics,
                   evals=tuple(read_evals(run_dir / "eval", notes)),
                   steps=tuple(read_steps(run_dir / "trajectories" / "rl", notes)),
                   complete=(run_dir / "results.json").exists(), notes=tuple(notes))


def read_records(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (missing file: none). A last line cut short by an interrupted
    write is skipped with a note; any other bad line raises `DataError` naming file and line."""
    return _read_lines(path, notes, _json_object)


def read_trajectories(path: Path, notes: list[str]) -> list[Trajectory]:
    """The trajectories of a JSONL file, tolerant of a cut-short last line like `read_records`."""
    return _read_lines(path, notes, lambda line: from_dict(_json_object(line)))


def _read_lines(path: Path, notes: list[str], parse: Callable[[str], T]) -> list[T]:
    if not path.exists():
        return []
    data = path.read_text(errors="replace")
    lines = data.split("\n")
    out: list[T] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(parse(line))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if n == len(lines):  # no newline after it: a write in progress or cut short by a kill
                notes.append(f"{path.name}: skipped its unfinished last line {n} (the run was writing it "
                             "or was interrupted)")
                continue
            raise DataError(f"{path}:{n}: malformed line ({type(e).__name__}: {e})") from e
    return out


def _json_object(line: str) -> dict[str, Any]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return {k: _finite(v) for k, v in value.items()}


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_evals(eval_dir: Path, notes: list[str]) -> list[EvalStage]:
    """Every eval stage with a trajectory or summary file, in `EVAL_ORDER` then by name."""
    if not eval_dir.is_dir():
        return []
    names = {p.name.removesuffix(".summary.json") for p in eval_dir.glob("*.summary.json")}
    names |= {p.stem for p in eval_dir.glob("*.jsonl")}
    stages = []
    for name in sorted(names, key=eval_sort_key):
        trajs = tuple(read_trajectories(eval_dir / f"{name}.jsonl", notes))
        summary_path = eval_dir / f"{name}.summary.json"
        if summary_path.exists():
            summary, complete = _parse_json(summary_path), True
        else:
            summary, complete = {"name": name, "problems": len({t.meta.task_id for t in trajs}),
                                 "samples": len(trajs), **trajectory_metrics(trajs)}, False
            notes.append(f"eval {name}: no summary yet; its row shows the {len(trajs)} trajectories written so far")
        stages.append(EvalStage(name, summary, complete, trajs))
    return stages


def eval_sort_key(name: str) -> tuple[int, str]:
    """Pipeline order for known stage names, then alphabetical."""
    return (EVAL_ORDER.index(name), "") if name in EVAL_ORDER else (len(EVAL_ORDER), name)


def read_steps(traj_dir: Path, notes: list[str]) -> list[StepTrajectories]:
    """Saved RL trajectories grouped by step (files `step_N.jsonl` and `step_N.untrained.jsonl`)."""
    if not traj_dir.is_dir():
        return []
    files: dict[int, dict[bool, Path]] = {}
    for p in traj_dir.iterdir():
        m = _STEP_FILE.match(p.name)
        if m:
            files.setdefault(int(m.group(1)), {})[m.group(2) is None] = p
    out = []
    for step in sorted(files):
        by_kind = {trained: tuple(read_trajectories(p, notes)) for trained, p in files[step].items()}
        out.append(StepTrajectories(step, by_kind.get(True, ()), by_kind.get(False, ())))
    return out


def pick_spread(items: Sequence[T], cap: int, key: Callable[[T], Hashable]) -> list[T]:
    """At most `cap` items, taken round-robin over the buckets of `key` (in first-seen order), so every
    bucket (group, correctness) is represented before any gets a second item; order within a bucket kept."""
    buckets: dict[Hashable, list[T]] = {}
    for item in items:
        buckets.setdefault(key(item), []).append(item)
    out: list[T] = []
    depth = 0
    while len(out) < min(cap, len(items)):
        for bucket in buckets.values():
            if depth < len(bucket) and len(out) < cap:
                out.append(bucket[depth])
        depth += 1
    return out


def _read_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _parse_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _parse_yaml(path: Path, text: str) -> dict[str, Any]:
    try:
        value = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a mapping of config sections, got {type(value).__name__}")
    return value
