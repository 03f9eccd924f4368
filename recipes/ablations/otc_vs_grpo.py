"""OTC-GRPO vs plain GRPO: tool calls per solved problem at equal held-out accuracy.

The task is `arithmetic` with `check=0.85`: the system prompt asks the model to check every result
with the calculator, and 85% of the SFT cold-start traces do so (a second call that computes the
same number again), so after SFT the model usually makes two calls where one gives the answer, and
sometimes one. (With every
trace checking, the cold-started model always checks: no group then has a correct one-call sample,
and no reward based on the group's calls can tell anything apart.) Plain GRPO has no reason to drop the
check (it is paid for the answer only); OTC-GRPO (reference 3.2) pays less for more calls than the
fewest any correct rollout of the question needed.

Both arms start from the same SFT checkpoint, use the same seed, data, batch and steps, and are
evaluated on the same held-out split twice: greedy (the pipeline's own evaluation), and sampled as in
training (temperature 1, 4 samples per problem), which shows the policy's propensity to call where
greedy decoding hides it behind one mode. Run from the repository root:

    python recipes/ablations/otc_vs_grpo.py [--steps 24] [--seed 0] [--out runs/otc_vs_grpo]

Stages already finished in `--out` are not re-run. Prints a table and writes `summary.json` there.
Paired bootstrap (over held-out problems) gives 95% intervals of the differences.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import evaluate, flat, paired_bootstrap, problems, train, write_summary

COMMON = ["task.kwargs.check=0.85", "rollout.max_turns=4", "rollout.max_tool_calls=3", "eval.no_tools=false"]
SFT = ["sft.examples=96", "sft.epochs=2"]  # the default 48 x 1 teaches the first call but rarely the check
ARMS = {"grpo": [], "otc_grpo": ["task.reward=otc_grpo", "task.reward_kwargs.c=3"]}
SAMPLED = ["eval.temperature=1.0", "eval.samples=4"]


def stats(rows) -> dict[str, float]:
    ts = flat(rows)
    solved = [len(t.tool_results) for t in ts if t.correct]
    calls = sum(len(t.tool_results) for t in ts)
    return {"accuracy": len(solved) / len(ts), "calls_per_problem": calls / len(ts),
            "calls_per_solved": sum(solved) / len(solved) if solved else float("nan"),
            "tool_productivity": len(solved) / calls if calls else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/otc_vs_grpo"))
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every stage")
    args = ap.parse_args()
    out, seed = args.out, [*COMMON, f"run.seed={args.seed}", *args.overrides]
    sft = train(out / "sft", [*seed, *SFT, "pipeline.rl=false", "pipeline.eval_before=false"])
    models = {"sft": sft / "models" / "sft"}
    for arm, extra in ARMS.items():
        train(out / arm, [*seed, f"model.name={models['sft']}", "pipeline.sft=false", "pipeline.eval_before=false",
                          f"rl.steps={args.steps}", *extra])
        models[arm] = out / arm / "models" / "final"
    sampled = {name: problems(evaluate(out / f"{name}_sampled", model, [*seed, *SAMPLED]) / "eval" / "eval.jsonl")
               for name, model in models.items()}
    greedy = {"sft": problems(sft / "eval" / "sft.jsonl"),
              **{arm: problems(out / arm / "eval" / "final.jsonl") for arm in ARMS}}
    summary = {"greedy": compare(greedy), "sampled": compare(sampled), "steps": args.steps, "seed": args.seed}
    for mode in ("greedy", "sampled"):
        show(mode, summary[mode])
    write_summary(out, summary)
    return 0


def compare(evals: dict[str, dict[str, list[tuple[bool, int]]]]) -> dict:
    table = {name: stats(list(rows.values())) for name, rows in evals.items()}
    key = lambda k: lambda rows: stats(rows)[k]  # noqa: E731
    g, o = table["grpo"], table["otc_grpo"]
    return {"table": table,
            "calls_per_solved_reduction": 1 - o["calls_per_solved"] / g["calls_per_solved"],
            "accuracy_difference": o["accuracy"] - g["accuracy"],
            "ci95_accuracy_difference": paired_bootstrap(evals["grpo"], evals["otc_grpo"], key("accuracy")),
            "ci95_calls_per_solved_difference": paired_bootstrap(evals["grpo"], evals["otc_grpo"],
                                                                 key("calls_per_solved"))}


def show(mode: str, c: dict) -> None:
    print(f"\n{mode}:\n{'model':10} {'accuracy':>9} {'calls/problem':>14} {'calls/solved':>13} {'TP':>6}")
    for name, s in c["table"].items():
        print(f"{name:10} {s['accuracy']:9.3f} {s['calls_per_problem']:14.2f} {s['calls_per_solved']:13.2f} "
              f"{s['tool_productivity']:6.3f}")
    lo, hi = c["ci95_accuracy_difference"]
    clo, chi = c["ci95_calls_per_solved_difference"]
    print(f"OTC vs GRPO: calls per solved problem {-100 * c['calls_per_solved_reduction']:+.1f}% "
          f"(difference 95% CI {clo:+.2f} .. {chi:+.2f}), accuracy {100 * c['accuracy_difference']:+.1f} points "
          f"(95% CI {100 * lo:+.1f} .. {100 * hi:+.1f})")


if __name__ == "__main__":
    sys.exit(main())
