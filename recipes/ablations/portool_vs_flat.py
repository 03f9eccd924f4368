"""PORTool tree rollouts vs flat GRPO at equal generated tokens.

Both arms start from the same cold-start SFT checkpoint with the same seed, data stream, prompts per
step and leaves per prompt (8). `tree` is `recipes/portool.yaml`: rollouts fork after tool-call
turns (branch factor 2), siblings share their prefix, and step rewards give fork-relative advantages
blended with GRPO's (omega 0.5, eta 0.1). It runs `--steps` steps; the tokens it generated (the
backend's count, summed: `gen/tokens_total`) are then the budget of `flat` (plain GRPO), which runs
until it has generated as many (`rl.max_sampled_tokens`; at most 3x the steps), so whichever arm
generates fewer tokens per step gets more steps (leaves share the tokens of their common prefix, but
the tree expands nodes into several candidate children: which way it goes is measured, not assumed).
The claim checked: at equal generated tokens the tree arm is at least as accurate on the held-out split.

    python recipes/ablations/portool_vs_flat.py [--steps 12] [--seeds 0] [--out runs/portool_vs_flat]

Prints held-out accuracy (greedy), steps, generated tokens per arm and seed, the paired bootstrap 95%
interval of the accuracy difference; finished stages are not re-run; writes `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import accuracy, finish, paired_bootstrap, problems, show_table, train

COMMON = ["eval.no_tools=false", "pipeline.eval_before=false"]
TREE = ["rollout.strategy=tree", "rollout.tree.branch_factor=2", "algorithm.advantage=portool",
        "algorithm.advantage_kwargs.omega=0.5", "algorithm.advantage_kwargs.eta=0.1"]
COLUMNS = {"accuracy": "accuracy", "steps": "RL steps", "tokens": "gen. tokens", "tokens_per_step": "tokens/step"}


def rl_metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == "rl"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=Path("runs/portool_vs_flat"))
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every stage")
    args = ap.parse_args()
    per_seed, summary = {}, {"steps": args.steps, "seeds": {}}
    for seed in args.seeds:
        out, seeded = args.out / f"seed{seed}", [*COMMON, f"run.seed={seed}", *args.overrides]
        sft = train(out / "sft", [*seeded, "pipeline.rl=false"])
        start = [*seeded, f"model.name={sft / 'models' / 'sft'}", "pipeline.sft=false"]
        tree = train(out / "tree", [*start, f"rl.steps={args.steps}", *TREE])
        budget = int(rl_metrics(tree)[-1]["gen/tokens_total"])
        flat = train(out / "flat", [*start, f"rl.steps={3 * args.steps}", f"rl.max_sampled_tokens={budget}"])
        evals, rows = {}, {}
        for arm, run in (("tree", tree), ("flat", flat)):
            evals[arm] = problems(run / "eval" / "final.jsonl")
            steps = rl_metrics(run)
            rows[arm] = {"accuracy": accuracy(list(evals[arm].values())), "steps": len(steps),
                         "tokens": steps[-1]["gen/tokens_total"],
                         "tokens_per_step": steps[-1]["gen/tokens_total"] / len(steps)}
        rows["sft"] = {"accuracy": accuracy(list(problems(sft / "eval" / "sft.jsonl").values())), "steps": 0,
                       "tokens": 0.0, "tokens_per_step": float("nan")}
        show_table(f"seed {seed}: greedy held-out evaluation ({len(evals['tree'])} problems)", rows, COLUMNS)
        diff = rows["tree"]["accuracy"] - rows["flat"]["accuracy"]
        lo, hi = paired_bootstrap(evals["flat"], evals["tree"], accuracy)
        print(f"tree - flat at {budget} generated tokens: accuracy {diff:+.3f} "
              f"(paired bootstrap 95% CI {lo:+.3f} .. {hi:+.3f})")
        per_seed[seed] = {"accuracy tree - flat": diff}
        summary["seeds"][seed] = {"arms": rows, "budget": budget, "accuracy_difference": diff, "ci95": [lo, hi]}
    return finish(args.out, summary, per_seed)


if __name__ == "__main__":
    sys.exit(main())
