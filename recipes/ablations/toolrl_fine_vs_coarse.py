"""ToolRL's fine-grained reward vs its coarse reward on BFCL function calling.

`recipes/function_calling.yaml` (BFCL v4 single-turn categories, prompts under 3000 characters, one
assistant message whose calls are the answer) with the ToolRL reward (`task.reward=toolrl`, the KL
settings of `recipes/toolrl.yaml`). Both arms start from one cold-start SFT on gold demonstrations of
train problems and run the same seed, data, batch and steps; they differ only in the reward variant:

- `fine` (`variant=default`): R_correct in [-3, 3] from the Jaccard match of function names, of
  parameter names per call and the number of exactly right values: partial credit;
- `coarse` (`variant=coarse`): R_correct = 3 for the exact call list, else -3.

R_format is the same in both (0 here: the task does not ask for <think>). Every model is evaluated
with BFCL's own strict AST checker (`task.reward=bfcl`), not with the reward it was trained on, on the
same 50 held-out problems, greedy. The paper's claim: the fine-grained reward trains better callers.

    python recipes/ablations/toolrl_fine_vs_coarse.py [--steps 8] [--seeds 0] [--demos 128]
                                                      [--out runs/toolrl_fine_vs_coarse]

Prints BFCL accuracy, tool calls per problem and the share of problems answered with a readable call
per arm and seed, the paired bootstrap 95% interval of fine - coarse; finished stages are not re-run;
writes `summary.json`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import accuracy, evaluate, finish, flat, paired_bootstrap, problems, show_table, tool_calls, train

RECIPE = Path(__file__).resolve().parents[1] / "function_calling.yaml"
COMMON = ["pipeline.eval_before=false", "algorithm.kl_coef=0.001", "algorithm.kl_estimator=k1",
          "algorithm.kl_placement=reward", "algorithm.aggregation=token-mean"]
ARMS = {"fine": ["task.reward=toolrl", "task.reward_kwargs.variant=default"],
        "coarse": ["task.reward=toolrl", "task.reward_kwargs.variant=coarse"]}
COLUMNS = {"accuracy": "BFCL accuracy", "calls": "calls/problem", "called": "share calling"}


def row(evals) -> dict[str, float]:
    rows = list(evals.values())
    return {"accuracy": accuracy(rows), "calls": tool_calls(rows),
            "called": sum(bool(t.tool_results) for t in flat(rows)) / len(flat(rows))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--demos", type=int, default=128, help="gold demonstrations for the cold start")
    ap.add_argument("--out", type=Path, default=Path("runs/toolrl_fine_vs_coarse"))
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every stage")
    args = ap.parse_args()
    per_seed, summary = {}, {"steps": args.steps, "demos": args.demos, "seeds": {}}
    for seed in args.seeds:
        out, seeded = args.out / f"seed{seed}", [*COMMON, f"run.seed={seed}", *args.overrides]
        demos = out / "demos.jsonl"
        if not demos.exists():
            out.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "tirl.tasks.bfcl.demos", "--count", str(args.demos), "--seed",
                            str(seed), "--max-prompt-chars", "3000", "--out", str(demos)], check=True)
        sft = train(out / "sft", [*seeded, f"sft.rollouts=[{demos}]", "pipeline.rl=false"], RECIPE)
        evals = {"sft": problems(sft / "eval" / "sft.jsonl")}
        for arm, extra in ARMS.items():
            run = train(out / arm, [*seeded, f"model.name={sft / 'models' / 'sft'}", "pipeline.sft=false",
                                    f"rl.steps={args.steps}", "pipeline.eval_after=false", *extra], RECIPE)
            scored = evaluate(out / f"{arm}_bfcl", run / "models" / "final", seeded, RECIPE)
            evals[arm] = problems(scored / "eval" / "eval.jsonl")
        rows = {arm: row(e) for arm, e in evals.items()}
        show_table(f"seed {seed}, after {args.steps} GRPO steps: BFCL AST accuracy, greedy, "
                   f"{len(evals['fine'])} held-out problems", rows, COLUMNS)
        diff = rows["fine"]["accuracy"] - rows["coarse"]["accuracy"]
        lo, hi = paired_bootstrap(evals["coarse"], evals["fine"], accuracy)
        print(f"fine - coarse: accuracy {diff:+.3f} (paired bootstrap 95% CI {lo:+.3f} .. {hi:+.3f})")
        per_seed[seed] = {"accuracy fine - coarse": diff}
        summary["seeds"][seed] = {"arms": rows, "accuracy_difference": diff, "ci95": [lo, hi]}
    return finish(args.out, summary, per_seed)


if __name__ == "__main__":
    sys.exit(main())
