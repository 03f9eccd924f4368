"""`tirl train | sft | eval | report | tools | envs | algos`.

    tirl train [recipe.yaml] [key=value ...]     eval -> SFT -> eval -> RL -> eval (no recipe: the embedded default)
    tirl sft   [recipe.yaml] [key=value ...]     SFT cold start only
    tirl eval  --model M [--task T] [--samples K --temperature X] [--size N] [--concurrency C]
               [--backend hf|vllm|openai] [--base-url URL] [--no-tools] [--out DIR] [key=value ...]
                                                 evaluate a model, run directory or checkpoint (or a served model)
    tirl report RUN_DIR [--out FILE] [--per-step N] [--per-eval N] [--no-tokens]
                                                 (re)build a run's HTML report and plots
    tirl tools | envs | algos                    list what is registered
    tirl serve-tools [--tools NAME ...] [--config FILE] [--host H] [--port P] [--token T]
                                                 serve tools over HTTP (client: the `remote` tool)

A `TirlError` (bad config, missing model, ...) prints one line and exits with status 2 (3: the run
finished but its report could not be built).
"""

from __future__ import annotations

import argparse
import sys

from tirl.errors import TirlError


def main(argv: list[str] | None = None) -> int:
    args = _parse(_parser(), sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args) or 0
    except TirlError as e:
        from tirl.trainer.display import console

        console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        return getattr(e, "exit_status", 2)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, letting a recipe and key=value overrides sit between or after the flags
    (`tirl eval --model M recipe.yaml --size 20 model.dtype=bfloat16`), in the order given."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "items")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.items = [*args.items, *extra]
    return args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tirl", description="Train LLM agents to use tools with RL.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, help_ in (("train", _train, "eval -> SFT -> eval -> RL -> eval"), ("sft", _sft, "SFT only")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("items", nargs="*", help="an optional recipe.yaml, then key=value overrides")
        sp.set_defaults(func=func)
    ev = sub.add_parser("eval", help="evaluate a model on a task's held-out split")
    from tirl.eval.command import add_arguments

    add_arguments(ev)
    ev.set_defaults(func=_eval)
    for name, func in (("tools", _tools), ("envs", _envs), ("algos", _algos)):
        sub.add_parser(name, help=f"list registered {name}").set_defaults(func=func)
    sv = sub.add_parser("serve-tools", help="serve tools over HTTP (client: the `remote` tool)")
    sv.add_argument("--tools", nargs="+", action="extend", metavar="NAME", help="registered names or module:attr paths")
    sv.add_argument("--config", metavar="FILE", help="YAML: a recipe's tools: section, or a whole recipe")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (not loopback: a token is required)")
    sv.add_argument("--port", type=int, default=8765, help="port (0: a free one)")
    sv.add_argument("--token", help="bearer token clients must send (default: $TIRL_TOOL_SERVER_TOKEN)")
    sv.set_defaults(func=_serve_tools)
    rp = sub.add_parser("report", help="(re)build a run's HTML report and plots (works on runs in progress)")
    rp.add_argument("run_dir", help="the run directory")
    rp.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html; PNGs go to plots/ next to it)")
    rp.add_argument("--per-step", type=int, default=16, help="trajectories per RL step in the viewer")
    rp.add_argument("--per-eval", type=int, default=32, help="trajectories per eval stage in the viewer")
    rp.add_argument("--no-tokens", action="store_true", help="leave out the token view (no tokenizer needed)")
    rp.set_defaults(func=_report)
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
    from tirl.eval.command import run_command

    return run_command(args)


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


def _report(args) -> int:
    from tirl.report.build import report_from_command_line

    return report_from_command_line(args.run_dir, args.out, args.per_step, args.per_eval, not args.no_tokens)


def _serve_tools(args) -> int:
    from tirl.tools.server import serve_from_command_line

    return serve_from_command_line(args.tools, args.config, args.host, args.port, args.token)


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
