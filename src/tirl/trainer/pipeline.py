"""The default job: eval base -> SFT cold start -> eval -> RL -> eval, then a before/after table.

Each stage leaves its result in the run directory (eval summaries, `models/sft`, `models/final`), so
re-running the same command skips finished stages and resumes the interrupted one from its last
checkpoint. A run directory belongs to one config: re-running with a different one is an error.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from tirl import __version__
from tirl.config import Config
from tirl.errors import ResumeError
from tirl.eval.runner import evaluate_model
from tirl.models import loading
from tirl.rewards.judge import close_judges
from tirl.trainer.build import (build_reward, build_task, build_tools, load_policy, pick_device, preflight,
                                setup_threads)
from tirl.trainer import distributed
from tirl.trainer.display import console
from tirl.trainer.logging import MetricsLogger
from tirl.trainer.rl import run_rl
from tirl.trainer.sft import run_sft
from tirl.tools import ToolSet

COLUMNS = (("accuracy", "accuracy"), ("tool_calls/rate", "tool-call rate"), ("tool_calls/mean", "tool calls"),
           ("tool_calls/invalid_rate", "invalid calls"), ("tokens/sampled_mean", "tokens"))


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run directory, or check that an existing one belongs to this config."""
    run_dir = cfg.run_dir()
    saved = run_dir / "config.yaml"
    if saved.exists():
        old = yaml.safe_load(saved.read_text())
        new = cfg.model_dump(mode="json")
        diffs = [d for d in _diff(old, new) if not d.startswith("distributed.")]  # any world size resumes
        if diffs:
            raise ResumeError(f"{run_dir} holds a run with a different config ({'; '.join(diffs[:5])}); "
                              "choose another run.dir / run.name, or delete that directory")
        if (run_dir / "results.json").exists():
            raise ResumeError(f"the run in {run_dir} is complete (results in {run_dir / 'results.md'}); "
                              "resuming would train zero steps. Use another run.name for a new run")
        console.print(f"[yellow]resuming the run in {run_dir}[/]")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(cfg.to_yaml())
    return run_dir


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def run_pipeline(cfg: Config) -> dict[str, dict[str, Any]]:
    """Run the enabled stages; returns {eval name: summary}."""
    preflight(cfg)
    if cfg.distributed.launcher == "ray" and "WORLD_SIZE" not in os.environ:  # this process starts the ranks
        from tirl.cluster.train import launch

        launch(cfg)
        return {}
    world = distributed.init(cfg)  # under torchrun: every rank runs the pipeline; rank 0 writes
    if world.is_main:
        console.rule("tirl train")
        console.print(cfg.to_yaml(), markup=False)
    run_dir = distributed.main_alone(world, lambda: prepare_run_dir(cfg)) or cfg.run_dir()
    setup_threads(cfg.run.threads)
    device = pick_device(cfg.run.device)
    task, reward_fn = build_task(cfg.task), None
    tools = build_tools(cfg, task)
    try:
        return _run_stages(cfg, run_dir, device, task, tools)
    finally:
        asyncio.run(tools.shutdown())
        close_judges()
        distributed.teardown()


def _run_stages(cfg: Config, run_dir: Path, device: str, task, tools: ToolSet) -> dict[str, dict[str, Any]]:
    reward_fn = build_reward(cfg.task, task)
    logger = MetricsLogger(run_dir, cfg.run.tensorboard)
    path = loading.materialize(loading.resolve(cfg.model.name))
    world = distributed.world()
    if world.is_main:
        _write_run_info(run_dir, cfg, path, device, tools)
    results: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    p = cfg.pipeline
    if p.eval_before:
        name = "base" if (p.sft or p.rl) else "eval"
        results.update(_evaluate(cfg, name, path, task, tools, reward_fn, run_dir, device))
    if p.sft:
        path = _stage_model(run_dir / "models" / "sft", lambda: run_sft(  # data-parallel like RL
            cfg, load_policy(cfg.model, device, path), task, tools, run_dir, logger))
        if p.eval_after_sft:
            results.update(_evaluate(cfg, "sft", path, task, tools, reward_fn, run_dir, device, no_tools=False))
    if p.rl:
        path = _stage_model(run_dir / "models" / "final", lambda: run_rl(
            cfg, load_policy(cfg.model, device, path), task, tools, reward_fn, run_dir, logger))
        if p.eval_after:
            results.update(_evaluate(cfg, "final", path, task, tools, reward_fn, run_dir, device))
    logger.close()
    if world.is_main:
        _write_results(run_dir, results, time.monotonic() - t0)
        from tirl.report.build import report_after_run  # after the results are saved: a failure loses nothing

        report_after_run(run_dir)
    return results


def _stage_model(out: Path, train) -> str:
    return str(out) if (out / "config.json").exists() else str(train())


def _evaluate(cfg: Config, name: str, path: str, task, tools, reward_fn, run_dir: Path, device: str,
              no_tools: bool | None = None) -> dict[str, dict[str, Any]]:
    variants = [(name, True)]
    if cfg.eval.no_tools if no_tools is None else no_tools:
        variants.append((f"{name}_no_tools", False))
    return distributed.main_alone(distributed.world(), lambda: evaluate_model(  # on rank 0 alone
        cfg, variants, path, task, tools, reward_fn, run_dir / "eval", device)) or {}


def _write_run_info(run_dir: Path, cfg: Config, path: str, device: str, tools: ToolSet) -> None:
    """run.json: versions, model, device, and each tool's environment-defining properties."""
    dtype = loading.resolve_dtype(cfg.model.dtype, device)
    info = {"tirl_version": __version__, "model": cfg.model.name, "model_path": path, "device": device,
            "compute_dtype": str(dtype).removeprefix("torch."), "tools": tools.describe()}
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))


def results_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="held-out evaluation")
    table.add_column("model", no_wrap=True)
    for _, label in COLUMNS:
        table.add_column(label, justify="right")
    for name, summary in results.items():
        table.add_row(name, *(f"{summary.get(key, float('nan')):.3f}" for key, _ in COLUMNS))
    return table


def _write_results(run_dir: Path, results: dict[str, dict[str, Any]], seconds: float) -> None:
    console.print(results_table(results))
    lines = ["| model | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, s in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{s.get(k, float('nan')):.3f}" for k, _ in COLUMNS) + " |")
    (run_dir / "results.md").write_text("\n".join(lines) + "\n")
    (run_dir / "results.json").write_text(json.dumps({"seconds": seconds, "results": results}, indent=1))
    console.print(f"run directory: {run_dir}  ({seconds / 60:.1f} min)")
