"""Evaluation: any task's held-out split, greedy or k samples, with or without tools; resumable.

Trajectories are appended to `<out>/<name>.jsonl` chunk by chunk, every sample of a problem in one
chunk. After an interruption, problems whose k samples are all there are not run again; a last line cut
short by a kill, and a problem with only some of its samples written, are dropped and redone. A sample's
seed comes from (run.seed, problem id, sample index), so a resumed evaluation samples exactly what an
uninterrupted one would have.

The summary (`summary.summarize`: accuracy, pass@k, tool use and productivity, error rates by status,
calibration, each with a bootstrap interval over problems; accuracy per level where problems carry one)
is computed from the JSONL for the problems asked for, and written to `<out>/<name>.summary.json`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tirl.backends.base import SamplingParams
from tirl.config import Config
from tirl.errors import DataError, ResumeError
from tirl.eval.summary import summarize
from tirl.rewards.base import RewardFn
from tirl.rollout.agent import TurnLimits, is_failed
from tirl.rollout.groups import RolloutContext, RolloutSpec, Stateless, StrategyOutput, run_strategy
from tirl.rollout.io import append_jsonl, drop_partial_tail, read_jsonl
from tirl.tasks.base import Problem
from tirl.trainer.display import console
from tirl.types import Trajectory


def eval_problems(task, cfg: Config) -> list[Problem]:
    problems = task.heldout()
    return problems[:cfg.eval.size] if cfg.eval.size else problems


def with_concurrency(cfg: Config) -> Config:
    """`cfg` with `eval.concurrency` applied to the backend: the openai backend's requests in flight
    (`backend.openai.max_concurrency`), the hf backend's generation batch (`rollout.max_batch_size`).
    Unchanged when `eval.concurrency` is unset."""
    n = cfg.eval.concurrency
    if n is None:
        return cfg
    if cfg.backend.name == "openai":
        openai = cfg.backend.openai.model_copy(update={"max_concurrency": n})
        return cfg.model_copy(update={"backend": cfg.backend.model_copy(update={"openai": openai})})
    return cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"max_batch_size": n})})


def chunk_size(cfg: Config) -> int:
    """Trajectories started together (and appended together): `eval.concurrency`, else the backend's
    own width (the hf generation batch; for openai, at least the requests it keeps in flight)."""
    if cfg.eval.concurrency is not None:
        return cfg.eval.concurrency
    if cfg.backend.name == "openai":
        return max(cfg.rollout.max_batch_size, cfg.backend.openai.max_concurrency)
    return cfg.rollout.max_batch_size


def pending_problems(path: Path, problems: Sequence[Problem], samples: int) -> list[Problem]:
    """The problems whose `samples` trajectories are not all in `path` yet (reads only)."""
    counts = _sample_counts(path) if path.exists() else Counter()
    return [p for p in problems if counts.get(p.id, 0) < samples]


def run_eval(name: str, problems: list[Problem], make_env, backend, fmt, reward_fn: RewardFn, limits: TurnLimits,
             cfg: Config, out_dir: Path, chunk: int | None = None) -> dict[str, Any]:
    """Evaluate the problems not done yet, then return the summary of all of them (also written next
    to the trajectories). `backend` may be None when nothing is left to run.

    Problems run `chunk` trajectories at a time (default: `chunk_size(cfg)`), each chunk appended to the
    JSONL file when it is done.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path, summary_path = out_dir / f"{name}.jsonl", out_dir / f"{name}.summary.json"
    k = cfg.eval.samples
    _repair(path, k)
    todo = pending_problems(path, problems, k)
    if todo and backend is None:
        raise ResumeError(f"{path}: {len(todo)} problems are not evaluated yet, but no backend was given")
    spec = RolloutSpec(group_size=k, sampling=SamplingParams(cfg.eval.temperature), limits=limits,
                       stall_timeout_s=cfg.rollout.stall_timeout_s, check=cfg.rollout.check_invariants,
                       max_failed_fraction=cfg.rollout.max_failed_fraction)
    per_chunk = max(1, (chunk or chunk_size(cfg)) // k)
    if todo:
        with asyncio.Runner() as runner:
            for i in range(0, len(todo), per_chunk):
                ctx = RolloutContext(make_env, backend, fmt, spec, reward_fn, step=0, seed=cfg.run.seed,
                                     training=False)
                out = runner.run(run_strategy(EvalSampling(), todo[i:i + per_chunk], ctx))
                append_jsonl(path, _in_problem_order(out))
    wanted = {p.id for p in problems}
    trajs = [t for t in read_jsonl(path) if t.meta.task_id in wanted] if path.exists() else []
    e = cfg.eval
    summary = {"name": name, **summarize(trajs, resamples=e.bootstrap_resamples, level=e.ci_level,
                                         seed=cfg.run.seed, bins=e.calibration_bins),
               "temperature": e.temperature, **_accuracy_by_level(problems, trajs)}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def evaluate_model(cfg: Config, variants: Sequence[tuple[str, bool]], model_path: str, task, tools,
                   reward_fn: RewardFn, out_dir: Path, device: str) -> dict[str, dict[str, Any]]:
    """Evaluate the model at `model_path` once per (name, with_tools) variant into `out_dir`; returns
    {name: summary}. The model is loaded only when some variant has problems left to run (with the
    openai backend, only its tokenizer and configs: the server holds the weights)."""
    from tirl.trainer.build import EnvFactory, load_policy, make_backend, turn_limits

    cfg = with_concurrency(cfg)
    problems = eval_problems(task, cfg)
    pending = [n for n, _ in variants if pending_problems(out_dir / f"{n}.jsonl", problems, cfg.eval.samples)]
    served = cfg.backend.name == "openai"
    policy = load_policy(cfg.model, device, model_path, trainable=False,
                         weights=not served or cfg.backend.openai.weight_sync != "none") if pending else None
    backend = make_backend(policy, cfg) if policy else None
    out: dict[str, dict[str, Any]] = {}
    try:
        for name, with_tools in variants:
            console.print(f"[cyan]eval[/] {name} ({'with' if with_tools else 'without'} tools)")
            make_env = EnvFactory(task, tools, cfg, policy.fmt, with_tools) if policy else None
            out[name] = run_eval(name, problems, make_env, backend, policy.fmt if policy else None, reward_fn,
                                 turn_limits(cfg, policy.model) if policy else None, cfg, out_dir)
            console.print(f"  {headline(out[name])}")
    finally:
        if backend:
            backend.close()
    return out


def headline(summary: dict[str, Any]) -> str:
    """One line: accuracy with its interval, tool calls per problem."""
    ci = summary.get("ci", {}).get("accuracy")
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    accuracy = summary.get("accuracy")
    shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
    return f"accuracy {shown}{interval}  tool calls {summary.get('tool_calls/mean', 0.0):.2f}"


class EvalSampling(Stateless):
    """k independent samples per problem, seeded and grouped by the problem's id (not its position in a
    chunk), so that resuming after an interruption regenerates exactly the same samples."""

    async def __call__(self, problems: Sequence[Problem], ctx: RolloutContext) -> StrategyOutput:
        k = ctx.spec.group_size
        trajs = await asyncio.gather(*[ctx.sample(p, f"eval-{p.id}", si, key=("eval", p.id, si))
                                       for p in problems for si in range(k)])
        out = StrategyOutput(groups=[])
        for gi, p in enumerate(problems):
            mine = trajs[gi * k:(gi + 1) * k]
            out.failed += [t.with_reward(0.0, {}, False) for t in mine if is_failed(t)]  # failed: not correct
            ok = [t for t in mine if not is_failed(t)]
            if ok:
                out.groups.append(await ctx.score(ok, p, f"eval-{p.id}"))
        return out


def _in_problem_order(out: StrategyOutput) -> list[Trajectory]:
    """Scored and failed trajectories together, by problem then sample index (one problem's lines adjacent)."""
    trajs = out.trajectories + out.failed
    first = {}
    for t in trajs:
        first.setdefault(t.meta.task_id, len(first))
    return sorted(trajs, key=lambda t: (first[t.meta.task_id], t.meta.sample_index))


def _sample_counts(path: Path) -> Counter:
    """Trajectories per problem id in the complete lines of `path` (a line cut short by a kill is not one)."""
    counts: Counter = Counter()
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n") or not line.strip():
                continue
            try:
                counts[json.loads(line)["meta"]["task_id"]] += 1
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: not a tirl trajectory ({type(e).__name__}: {e})") from e
    return counts


def _repair(path: Path, samples: int) -> None:
    """Cut a line left unfinished by a kill, and drop the problems with fewer than `samples` trajectories
    (an interrupted chunk), so that they are run again whole. More than `samples` is an error."""
    drop_partial_tail(path)
    if not path.exists():
        return
    counts = _sample_counts(path)
    over = {tid: n for tid, n in counts.items() if n > samples}
    if over:
        tid, n = next(iter(over.items()))
        raise ResumeError(f"{path} holds {n} samples of problem {tid!r} but eval.samples={samples}: it was "
                          "written with other settings; evaluate into another directory (run.name / run.dir)")
    partial = {tid for tid, n in counts.items() if n < samples}
    if partial:  # keep the other lines byte for byte
        lines = path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if not line.strip() or json.loads(line)["meta"]["task_id"] not in partial]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _accuracy_by_level(problems: list[Problem], trajs) -> dict[str, float]:
    """`accuracy/level_<k>` for tasks whose problems carry `info["level"]`."""
    level = {p.id: p.info.get("level") for p in problems}
    by_level: dict[Any, list[bool]] = {}
    for t in trajs:
        if level.get(t.meta.task_id) is not None:
            by_level.setdefault(level[t.meta.task_id], []).append(bool(t.correct))
    return {f"accuracy/level_{k}": sum(v) / len(v) for k, v in sorted(by_level.items())}
