"""`tirl eval`: evaluate any model (embedded, local, a training run or checkpoint, or a served one) on any
task, greedy or with k samples, with or without tools.

    tirl eval --model M [--task T] [--samples K --temperature X] [--size N] [--concurrency C]
              [--backend hf|vllm|openai] [--base-url URL] [--no-tools] [--out DIR] [recipe.yaml] [key=value ...]

Flags are shorthands for config keys (`--samples` is `eval.samples`, ...); setting a key both ways is an
error. The output directory (default `runs/eval-<model>-<task>[-<backend>][-k<K>-t<X>]`, printed at the
end) holds `config.yaml`, `run.json`, `eval/eval.jsonl` (every trajectory), `eval/eval.summary.json`
(every metric with its bootstrap interval; `eval_no_tools.*` for the baseline), `results.json` and
`results.md`, and for a training checkpoint the merged model (`model/`). Running the same command
again resumes an interrupted evaluation (finished problems are not run again) or, when it is complete,
shows its results; a directory written with other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

FLAGS = {"samples": "eval.samples", "temperature": "eval.temperature", "size": "eval.size",
         "concurrency": "eval.concurrency", "backend": "backend.name", "base_url": "backend.openai.base_url",
         "out": "run.dir"}
"""Flag (argparse dest) -> the config key it sets."""

OPERATIONAL = ("run.name", "run.dir", "run.threads", "run.tensorboard", "eval.size", "eval.no_tools",
               "eval.concurrency", "eval.bootstrap_resamples", "eval.ci_level", "eval.calibration_bins",
               "rollout.max_batch_size", "rollout.stall_timeout_s", "backend.openai.max_concurrency",
               "backend.openai.request_timeout_s", "backend.openai.max_retries", "backend.openai.api_key_env")
"""Keys that may change between runs into the same directory: they do not change any trajectory
(`eval.size` selects problems; the summary is recomputed for the problems asked for)."""

EVAL_ONLY = ["pipeline.sft=false", "pipeline.rl=false", "pipeline.eval_before=true", "pipeline.eval_after_sft=false",
             "pipeline.eval_after=false"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `tirl eval` flags."""
    p.add_argument("--model", required=True, help="embedded:<name>, a local model directory, a Hub id, a training "
                   "run directory (its latest policy) or checkpoint; with --backend openai: the served model's "
                   "tokenizer and chat format")
    p.add_argument("--task", help="task name (default: the run's task for a run directory, else arithmetic)")
    p.add_argument("--samples", type=int, metavar="K", help="samples per problem (eval.samples; K > 1 needs "
                   "--temperature > 0): pass@k for every k <= K")
    p.add_argument("--temperature", type=float, help="sampling temperature (eval.temperature; 0 = greedy)")
    p.add_argument("--size", type=int, metavar="N", help="first N held-out problems (eval.size)")
    p.add_argument("--concurrency", type=int, metavar="C", help="requests in flight (openai) or generation batch "
                   "(hf) (eval.concurrency)")
    p.add_argument("--backend", choices=["hf", "vllm", "openai"], help="who generates (backend.name)")
    p.add_argument("--base-url", metavar="URL", help="OpenAI-compatible server's /v1 URL "
                   "(backend.openai.base_url; implies --backend openai)")
    p.add_argument("--no-tools", action="store_true", help="evaluate only the no-tool baseline")
    p.add_argument("--out", metavar="DIR", help="output directory (run.dir)")
    p.add_argument("items", nargs="*", help="an optional recipe.yaml, then key=value overrides")


def run_command(args: argparse.Namespace) -> int:
    """Resolve the model, build and check the config, evaluate, show and save the results."""
    from tirl.eval.checkpoints import resolve_eval_model

    model = resolve_eval_model(args.model)
    cfg = build_config(args, model)
    run_dir = cfg.run_dir()
    if model.checkpoint:
        cfg = _with_model_name(cfg, str(run_dir / "model"))
    _preflight(cfg, model)
    _prepare(run_dir, cfg)
    return _evaluate(cfg, model, run_dir, no_tools_only=args.no_tools)


def flag_overrides(args: argparse.Namespace, user: list[str]) -> list[str]:
    """`key=value` for each flag given; a key also set by a `key=value` item is an error."""
    from tirl.errors import ConfigError

    given = {FLAGS[dest]: (value, f"--{dest.replace('_', '-')}") for dest, value in vars(args).items()
             if dest in FLAGS and value is not None}
    if args.base_url is not None and args.backend is None:
        given["backend.name"] = ("openai", "--base-url")
    set_by_user = {item.partition("=")[0] for item in user}
    for key in sorted(given.keys() & set_by_user):
        raise ConfigError(f"{key} is set twice: by {given[key][1]} and by {key}=...; keep one")
    return [f"{key}={value}" for key, (value, _) in given.items()]


def build_config(args: argparse.Namespace, model):
    """Defaults <- recipe <- the eval's own settings and flags <- key=value items, with a run name that
    tells evaluations apart unless run.name or run.dir is given."""
    from tirl.config import load_config
    from tirl.errors import ConfigError

    recipe, user = _split(args.items)
    base = [f"model.name={model.path}", *EVAL_ONLY, *_task_overrides(args.task, model)]
    items = [*base, *flag_overrides(args, user), *user]
    cfg = load_config(recipe, items)
    if model.checkpoint and cfg.backend.name == "openai":
        raise ConfigError(f"{args.model} is a training checkpoint, which a server cannot load from here; with "
                          "--backend openai, --model names the served model's tokenizer (serve a saved model, "
                          "e.g. <run>/models/final, and pass that directory)")
    if cfg.run.name == "default" and cfg.run.dir is None:
        cfg = load_config(recipe, [*items[:len(base)], f"run.name={default_run_name(cfg, model)}",
                                   *items[len(base):]])
    return cfg


def default_run_name(cfg, model) -> str:
    """eval-<model>-<task>, then -<backend> unless hf, then -k<K>-t<T> when sampling."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name if not model.run_dir else model.path).strip("_")
    name = f"eval-{slug}-{re.sub(r'[^A-Za-z0-9._-]+', '_', cfg.task.name)}"
    if cfg.backend.name != "hf":
        name += f"-{cfg.backend.name}"
    if cfg.eval.samples > 1 or cfg.eval.temperature > 0:
        name += f"-k{cfg.eval.samples}-t{cfg.eval.temperature:g}"
    return name


def _task_overrides(task: str | None, model) -> list[str]:
    """The task to evaluate on: --task, else a training run's own task and tool settings, else arithmetic."""
    if task is not None:
        return [f"task.name={task}"]
    if model.run_dir is None:
        return ["task.name=arithmetic"]
    from tirl.eval.checkpoints import load_run_config

    run_cfg = load_run_config(model.run_dir).model_dump(mode="json")
    return [f"task={json.dumps(run_cfg['task'])}", f"tools={json.dumps(run_cfg['tools'])}"]


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _with_model_name(cfg, name: str):
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": name})})


def _preflight(cfg, model) -> None:
    """Every name in the config checked before any work; the model too unless it is a checkpoint to merge
    (whose run config and base model the merge checks)."""
    from tirl.models import loading
    from tirl.trainer.build import preflight

    preflight(cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"eval_before": False})}))
    if not model.checkpoint:
        loading.resolve(cfg.model.name)


def _prepare(run_dir: Path, cfg) -> None:
    """Create the output directory, or check that the one there was written with the same settings."""
    import yaml

    from tirl.errors import ResumeError
    from tirl.trainer.display import console

    saved = run_dir / "config.yaml"
    if saved.exists():
        diffs = config_differences(yaml.safe_load(saved.read_text()), cfg.model_dump(mode="json"))
        if diffs:
            raise ResumeError(f"{run_dir} holds an evaluation with other settings ({'; '.join(diffs[:5])}); "
                              "choose another --out / run.name, or delete that directory")
        console.print(f"[yellow]continuing the evaluation in {run_dir}[/]")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(cfg.to_yaml())


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every key that differs, the OPERATIONAL ones left out."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += config_differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    key = prefix.rstrip(".")
    return [] if old == new or key in OPERATIONAL else [f"{key}: {old!r} -> {new!r}"]


def _evaluate(cfg, model, run_dir: Path, no_tools_only: bool) -> int:
    from tirl.eval.checkpoints import merge_checkpoint
    from tirl.eval.runner import evaluate_model
    from tirl.eval.summary import summary_table
    from tirl.rewards.judge import close_judges
    from tirl.trainer.build import build_reward, build_task, build_tools, pick_device, setup_threads
    from tirl.trainer.display import console

    console.rule("tirl eval")
    console.print(cfg.to_yaml(), markup=False)
    setup_threads(cfg.run.threads)
    device, t0 = pick_device(cfg.run.device), time.monotonic()
    task = build_task(cfg.task)
    tools = build_tools(cfg, task)
    try:
        reward_fn = build_reward(cfg.task, task)
        path = str(merge_checkpoint(model, run_dir / "model")) if model.checkpoint else _materialized(cfg)
        _write_run_info(run_dir, cfg, model, path, device, tools)
        variants = [("eval_no_tools", False)] if no_tools_only else [("eval", True)] + (
            [("eval_no_tools", False)] if cfg.eval.no_tools else [])
        results = evaluate_model(cfg, variants, path, task, tools, reward_fn, run_dir / "eval", device)
    finally:
        import asyncio

        asyncio.run(tools.shutdown())
        close_judges()
    for name, summary in results.items():
        console.print(summary_table(name, summary))
    _write_results(run_dir, results, time.monotonic() - t0)
    from tirl.report.build import report_after_run  # after the results are saved: a failure loses nothing

    report_after_run(run_dir)
    console.print(f"output directory: {run_dir}", soft_wrap=True, highlight=False)
    console.print("  eval/<name>.jsonl: every trajectory; eval/<name>.summary.json: every metric with its "
                  "interval; results.md: the tables", soft_wrap=True)
    return 0


def _materialized(cfg) -> str:
    from tirl.models import loading

    return loading.materialize(loading.resolve(cfg.model.name))


def _write_run_info(run_dir: Path, cfg, model, path: str, device: str, tools) -> None:
    """run.json: version, what --model named and what was loaded, device, the tools' settings."""
    from tirl import __version__
    from tirl.models import loading

    dtype = str(loading.resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    info = {"tirl_version": __version__, "model": model.name, "model_path": path,
            "checkpoint": model.path if model.checkpoint else None,
            "run_dir": str(model.run_dir) if model.run_dir else None, "backend": cfg.backend.name,
            "device": device, "compute_dtype": dtype, "tools": tools.describe()}
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))


def _write_results(run_dir: Path, results: dict[str, dict[str, Any]], seconds: float) -> None:
    """results.json ({seconds, results: {name: summary}}) and results.md (each metric with its interval)."""
    from tirl.eval.summary import table_rows

    (run_dir / "results.json").write_text(json.dumps({"seconds": seconds, "results": results}, indent=1))
    lines = []
    for name, summary in results.items():
        level = summary.get("bootstrap", {}).get("level", 0.95)
        lines += [f"## {name}", "", f"| metric | value | {level:.0%} CI |", "|---|---:|---:|"]
        lines += [f"| {m} | {v} | {ci} |" for m, v, ci in table_rows(summary)] + [""]
    (run_dir / "results.md").write_text("\n".join(lines))
