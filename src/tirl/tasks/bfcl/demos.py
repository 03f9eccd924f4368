"""Cold-start demonstrations: gold single-turn answers played through the real env, saved as trajectories.

The task's calls are not run by the run's tools, so the SFT path that replays reference calls on them
(`sft.source=task`) does not apply; SFT on trajectories does (`sft.source=rollouts`). This module writes
them: for each of the first `count` TRAIN problems (never a held-out one) of the single-turn categories,
a scripted "model" writes the gold answer (the gold calls as the chat template writes assistant tool
calls, or for irrelevance one sentence declining), the episode runs through `Task.make_env` with the
model's own chat format, and the trajectory is scored by the `bfcl` reward. Only correct ones are
written (a gold call the checker rejects, from one of BFCL's few unsolvable rows, is dropped).
live_relevance rows (no gold call) and multi-turn rows are skipped.

    python -m tirl.tasks.bfcl.demos --model embedded:SmolLM2-135M-Instruct --count 256 \\
        --max-prompt-chars 3000 --out runs/function_calling/demos.jsonl
    tirl train recipes/function_calling.yaml      # sft.source=rollouts reads that file
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from tirl.backends.base import SamplingParams
from tirl.backends.scripted import ScriptedBackend
from tirl.chat.format import ChatFormat
from tirl.envs.tool_env import ToolLimits
from tirl.rewards.base import GroupContext, bind, score
from tirl.rollout.agent import TurnLimits, run_trajectory
from tirl.tasks.base import Problem
from tirl.tasks.bfcl.task import DEFAULT_CATEGORIES, FunctionCallingTask
from tirl.tools.toolset import ToolSet
from tirl.types import Message, Trajectory, TrajectoryMeta

DECLINE = "None of the given functions can do this, so I will not call any."
"""The demonstration answer of an irrelevance problem."""


def demonstration_text(problem: Problem, fmt: ChatFormat) -> str | None:
    """What a perfect model writes for `problem` (eos excluded); None when there is no demonstration."""
    kind = problem.info.get("kind")
    if kind == "irrelevance":
        return DECLINE
    if kind == "ast":
        return fmt.assistant_text(Message("assistant", "", tool_calls=problem.reference_calls))
    return None


async def _demonstration(task: FunctionCallingTask, problem: Problem, text: str, fmt: ChatFormat) -> Trajectory:
    env = task.make_env(problem, ToolSet([]), ToolLimits(), True)
    backend = ScriptedBackend(fmt.tokenizer, [text + fmt.eos_text])
    limits = TurnLimits(max_turns=1, max_new_tokens_per_turn=4096, max_new_tokens=4096, max_context=1 << 20)
    traj = await run_trajectory(env, backend, fmt, SamplingParams(), limits, TrajectoryMeta(problem.id, problem.id),
                                seed=0)
    result = await score(bind("bfcl"), traj, problem, GroupContext(trajectories=(traj,), task_reward="bfcl"))
    return traj.with_reward(result.total, result.components, result.correct)


def demonstrations(task: FunctionCallingTask, fmt: ChatFormat, count: int) -> list[Trajectory]:
    """The correct demonstrations among the first `count` train problems (see the module docstring)."""
    problems = [task.train_problem(i) for i in range(count)]
    jobs = [(p, t) for p in problems if (t := demonstration_text(p, fmt)) is not None]

    async def run_all() -> list[Trajectory]:
        return list(await asyncio.gather(*(_demonstration(task, p, t, fmt) for p, t in jobs)))

    return [t for t in asyncio.run(run_all()) if t.correct]


def write_demonstrations(out: Path, model: str, count: int, categories: Sequence[str] = DEFAULT_CATEGORIES,
                         seed: int = 0, max_prompt_chars: int | None = None) -> int:
    """Write the demonstrations for `model`'s chat format to `out` (JSON lines, replaced); returns how many.
    `categories`, `seed` and `max_prompt_chars` configure the task as the run will (its train stream)."""
    from tirl.chat.format import load_chat_format
    from tirl.models import loading
    from tirl.rollout.io import append_jsonl

    fmt = load_chat_format(loading.load_tokenizer(loading.materialize(loading.resolve(model))))
    task = FunctionCallingTask(categories=categories, seed=seed, max_prompt_chars=max_prompt_chars)
    trajs = demonstrations(task, fmt, count)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    append_jsonl(out, trajs)
    return len(trajs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tirl.tasks.bfcl.demos", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct", help="whose tokenizer and chat format")
    parser.add_argument("--out", required=True, type=Path, help="JSON-lines file to write (replaced)")
    parser.add_argument("--count", type=int, default=256, help="train problems to demonstrate (the first N)")
    parser.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES), help="comma-separated categories")
    parser.add_argument("--seed", type=int, default=0, help="the task's seed (train order); use the run's")
    parser.add_argument("--max-prompt-chars", type=int, default=None, help="the task's max_prompt_chars")
    args = parser.parse_args(argv)
    n = write_demonstrations(args.out, args.model, args.count, args.categories.split(","), args.seed,
                             args.max_prompt_chars)
    print(f"wrote {n} demonstrations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
