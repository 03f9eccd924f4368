"""Fission-GRPO vs plain GRPO: recovering from tool errors on a task whose calculator fails at random.

Every tool call, in training and in evaluation, fails with probability `--fault-rate` (0.3) with
"Error: the calculator service is temporarily unavailable (503); the call did not run, try it again"
(`rollout.tool_fault_rate`; each trajectory draws from a generator seeded by its problem and sample
number, so both arms' evaluations meet the same faults as long as they make the same calls). In a
share `--retry` (0.25) of the cold-start SFT traces (96, two epochs) the first call fails with that
error and is made again (`task.kwargs.retry`): without such traces the cold-started model never calls
again after a fault (it answers "503", the number in the error), no recovery rollout differs from
another, and neither arm has anything to learn from (recipes/README.md). From that one SFT
checkpoint, with the same seed, data, batch and steps, `grpo` trains on the flat groups only;
`fission` (`rollout.strategy=fission`: 4 recovery groups of 4 per step, sampled from the point where a
call failed) trains on those too, which is more rollouts per step: the comparison is at equal steps and prompts, not equal compute.

Read from each evaluation (greedy, and temperature 1 with 4 samples per problem):
- recovery rate: share of the trajectories that met a fault whose answer is correct (the paper's
  claim: higher with Fission);
- retry rate: share of those that called the tool again after the fault;
- accuracy overall, and on trajectories that met no fault (should not drop).

    python recipes/ablations/fission_vs_grpo.py [--steps 10] [--seeds 0] [--fault-rate 0.3] [--retry 0.25]
                                                [--out runs/fission_vs_grpo]

Finished stages are not re-run; prints the tables and paired bootstrap 95% intervals (over problems) of
fission - grpo, and writes `summary.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import accuracy, evaluate, finish, flat, paired_bootstrap, problems, show_table, train

from tirl.tools.toolset import FAULT_MESSAGE

FAULT = "Error: " + FAULT_MESSAGE.format(name="calculator")
COMMON = ["rollout.max_turns=4", "eval.no_tools=false", "pipeline.eval_before=false"]
SFT = ["sft.examples=96", "sft.epochs=2"]
ARMS = {"grpo": [], "fission": ["rollout.strategy=fission", "rollout.fission.group_size=4",
                                "rollout.fission.max_groups=4"]}
SAMPLED = ["eval.temperature=1.0", "eval.samples=4"]
COLUMNS = {"recovery": "recovery rate", "retry": "retry rate", "faulted": "faulted share",
           "accuracy": "accuracy", "clean_accuracy": "acc. no fault"}


def faulted(t) -> int | None:
    """Index (in the trajectory's tool results) of its first injected fault, or None."""
    return next((i for i, r in enumerate(t.tool_results) if r.content == FAULT), None)


def recovery(rows) -> float:
    hit = [t for t in flat(rows) if faulted(t) is not None]
    return sum(bool(t.correct) for t in hit) / len(hit) if hit else float("nan")


def retry(rows) -> float:
    hit = [(t, faulted(t)) for t in flat(rows) if faulted(t) is not None]
    return sum(any(r.ok for r in t.tool_results[i + 1:]) for t, i in hit) / len(hit) if hit else float("nan")


def clean_accuracy(rows) -> float:
    clean = [t for t in flat(rows) if faulted(t) is None]
    return sum(bool(t.correct) for t in clean) / len(clean) if clean else float("nan")


def table(evals: dict) -> dict[str, dict[str, float]]:
    return {arm: {"recovery": recovery(list(e.values())), "retry": retry(list(e.values())),
                  "faulted": sum(faulted(t) is not None for t in flat(list(e.values()))) / len(flat(list(e.values()))),
                  "accuracy": accuracy(list(e.values())), "clean_accuracy": clean_accuracy(list(e.values()))}
            for arm, e in evals.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--fault-rate", type=float, default=0.3)
    ap.add_argument("--retry", type=float, default=0.25, help="share of SFT traces that show a retry after a fault")
    ap.add_argument("--out", type=Path, default=Path("runs/fission_vs_grpo"))
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every stage")
    args = ap.parse_args()
    common = [*COMMON, f"rollout.tool_fault_rate={args.fault_rate}", f"task.kwargs.retry={args.retry}",
              *args.overrides]
    per_seed, summary = {}, {"steps": args.steps, "fault_rate": args.fault_rate, "retry": args.retry, "seeds": {}}
    for seed in args.seeds:
        out, seeded = args.out / f"seed{seed}", [*common, f"run.seed={seed}"]
        sft = train(out / "sft", [*SFT, *seeded, "pipeline.rl=false"])  # overrides may change SFT
        models = {"sft": sft / "models" / "sft"}
        for arm, extra in ARMS.items():
            run = train(out / arm, [*seeded, f"model.name={models['sft']}", "pipeline.sft=false",
                                    f"rl.steps={args.steps}", *extra])
            models[arm] = run / "models" / "final"
        greedy = {"sft": problems(sft / "eval" / "sft.jsonl"),
                  **{arm: problems(out / arm / "eval" / "final.jsonl") for arm in ARMS}}
        sampled = {arm: problems(evaluate(out / f"{arm}_sampled", models[arm], [*seeded, *SAMPLED])
                                 / "eval" / "eval.jsonl") for arm in ARMS}
        summary["seeds"][seed] = {}
        for mode, evals in (("greedy", greedy), ("sampled", sampled)):
            rows = table(evals)
            show_table(f"seed {seed}, {mode} evaluation, tool fault rate {args.fault_rate}", rows, COLUMNS)
            cis = {k: paired_bootstrap(evals["grpo"], evals["fission"], f) for k, f in
                   (("recovery", recovery), ("accuracy", accuracy))}
            for k, (lo, hi) in cis.items():
                print(f"fission - grpo: {k} {rows['fission'][k] - rows['grpo'][k]:+.3f} "
                      f"(paired bootstrap 95% CI {lo:+.3f} .. {hi:+.3f})")
            summary["seeds"][seed][mode] = {"table": rows, "ci95": cis}
        per_seed[seed] = {f"{mode} {k} fission - grpo": summary["seeds"][seed][mode]["table"]["fission"][k]
                          - summary["seeds"][seed][mode]["table"]["grpo"][k]
                          for mode in ("greedy", "sampled") for k in ("recovery", "accuracy")}
    return finish(args.out, summary, per_seed)


if __name__ == "__main__":
    sys.exit(main())
