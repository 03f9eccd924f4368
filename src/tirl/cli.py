"""`tirl train | sft | eval | tools | envs | algos`.

    tirl train [recipe.yaml] [key=value ...]     eval -> SFT -> eval -> RL -> eval (no recipe: the embedded default)
    tirl sft   [recipe.yaml] [key=value ...]     SFT cold start only
    tirl eval  --model PATH_OR_NAME --task NAME [key=value ...]
    tirl tools | envs | algos                    list what is registered

A `TirlError` (bad config, missing model, ...) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import re
import sys

from tirl.errors import TirlError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except TirlError as e:
        from tirl.trainer.display import console

        console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tirl", description="Train LLM agents to use tools with RL.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, help_ in (("train", _train, "eval -> SFT -> eval -> RL -> eval"), ("sft", _sft, "SFT only")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("items", nargs="*", help="an optional recipe.yaml, then key=value overrides")
        sp.set_defaults(func=func)
    ev = sub.add_parser("eval", help="evaluate a model on a task's held-out split")
    ev.add_argument("--model", required=True, help="embedded:<name>, a local directory or a Hub id")
    ev.add_argument("--task", default="arithmetic")
    ev.add_argument("items", nargs="*", help="an optional recipe.yaml, then key=value overrides")
    ev.set_defaults(func=_eval)
    for name, func in (("tools", _tools), ("envs", _envs), ("algos", _algos)):
        sub.add_parser(name, help=f"list registered {name}").set_defaults(func=func)
    return p


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _train(args) -> int:
    from tirl.config import load_config
    from tirl.trainer.pipeline import run_pipeline

    recipe, overrides = _split(args.items)
    run_pipeline(load_config(recipe, overrides))
    return 0


def _sft(args) -> int:
    from tirl.config import load_config
    from tirl.trainer.pipeline import run_pipeline

    recipe, overrides = _split(args.items)
    only_sft = ["pipeline.eval_before=false", "pipeline.sft=true", "pipeline.eval_after_sft=false",
                "pipeline.rl=false", "pipeline.eval_after=false"]
    run_pipeline(load_config(recipe, [*only_sft, *overrides]))
    return 0


def _eval(args) -> int:
    from tirl.config import load_config
    from tirl.trainer.pipeline import run_pipeline

    recipe, overrides = _split(args.items)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", args.model).strip("_")
    base = [f"model.name={args.model}", f"task.name={args.task}", f"run.name=eval-{slug}-{args.task}",
            "pipeline.sft=false", "pipeline.rl=false", "pipeline.eval_before=true",
            "pipeline.eval_after_sft=false", "pipeline.eval_after=false"]
    run_pipeline(load_config(recipe, [*base, *overrides]))
    return 0


def _list(title: str, entries: dict[str, str]) -> None:
    from rich.table import Table

    from tirl.trainer.display import console

    table = Table(title=title)
    table.add_column("name")
    table.add_column("description")
    for k, v in entries.items():
        table.add_row(k, v)
    console.print(table)


def _tools(args) -> int:
    from tirl.tools import TOOLS

    _list("tools", TOOLS.describe())
    return 0


def _envs(args) -> int:
    from tirl.tasks import TASKS

    _list("tasks (envs)", TASKS.describe())
    return 0


def _algos(args) -> int:
    from tirl.algorithms import ADVANTAGES, POLICY_LOSSES
    from tirl.rewards import REWARDS

    _list("advantage estimators", ADVANTAGES.describe())
    _list("policy losses", POLICY_LOSSES.describe())
    _list("rewards", REWARDS.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
