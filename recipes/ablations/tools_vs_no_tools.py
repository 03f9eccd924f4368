"""Tool-integrated RL vs text-only RL (ReTool, ToRA): the same budget with and without the calculator.

Both arms run the whole default pipeline (cold-start SFT, GRPO, greedy held-out evaluation) with the
same seed, data stream, batch, steps and learning settings; they differ only in the tools. The
`tools` arm is the default (calculator; SFT traces call it). The `no_tools` arm sets `task.tools=[]`:
its system prompt offers no tool, its SFT traces answer directly (question -> <answer>), and GRPO
samples text only. Operands have at most three digits (`task.kwargs.max_digits=3`, the fewest the
task allows) to give the text-only model a chance (with the default four digits it scores 0: README
"RL, no tools").
The claim checked: at equal steps the tool arm ends more accurate (ReTool also reports shorter
responses; the tokens column shows what happens here).

    python recipes/ablations/tools_vs_no_tools.py [--steps 12] [--seeds 0 1] [--out runs/tools_vs_no_tools]

Prints held-out accuracy, tool calls and generated tokens per arm and seed, the paired bootstrap 95%
interval of the accuracy difference (over problems) per seed, and with several seeds the mean
difference with a t interval over seeds. Finished stages are not re-run; writes `summary.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import accuracy, finish, paired_bootstrap, problems, sampled_tokens, show_table, tool_calls, train

COMMON = ["task.kwargs.max_digits=3", "eval.no_tools=false", "pipeline.eval_before=false"]
ARMS = {"tools": [], "no_tools": ["task.tools=[]"]}
COLUMNS = {"accuracy": "accuracy", "sft_accuracy": "after SFT", "calls": "calls/sample", "tokens": "tokens/sample"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=Path("runs/tools_vs_no_tools"))
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    per_seed, summary = {}, {"steps": args.steps, "seeds": {}}
    for seed in args.seeds:
        evals, rows = {}, {}
        for arm, extra in ARMS.items():
            run = train(args.out / f"seed{seed}" / arm,
                        [*COMMON, f"run.seed={seed}", f"rl.steps={args.steps}", *extra, *args.overrides])
            evals[arm], sft = problems(run / "eval" / "final.jsonl"), problems(run / "eval" / "sft.jsonl")
            rows[arm] = {"accuracy": accuracy(list(evals[arm].values())),
                         "sft_accuracy": accuracy(list(sft.values())),
                         "calls": tool_calls(list(evals[arm].values())),
                         "tokens": sampled_tokens(list(evals[arm].values()))}
        show_table(f"seed {seed}, after {args.steps} GRPO steps (greedy, {len(evals['tools'])} held-out problems)",
                   rows, COLUMNS)
        diff = rows["tools"]["accuracy"] - rows["no_tools"]["accuracy"]
        lo, hi = paired_bootstrap(evals["no_tools"], evals["tools"], accuracy)
        print(f"tools - no tools: accuracy {diff:+.3f} (paired bootstrap 95% CI {lo:+.3f} .. {hi:+.3f})")
        per_seed[seed] = {"accuracy tools - no_tools": diff,
                          "tokens tools - no_tools": rows["tools"]["tokens"] - rows["no_tools"]["tokens"]}
        summary["seeds"][seed] = {"arms": rows, "accuracy_difference": diff, "ci95": [lo, hi]}
    return finish(args.out, summary, per_seed)


if __name__ == "__main__":
    sys.exit(main())
