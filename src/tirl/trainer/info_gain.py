"""IGPO information-gain turn rewards (reference 4.4, arXiv 2510.14967).

Before the first turn and after each tool turn, the policy is teacher-forced on the gold answer
(the task's own final-answer text, e.g. `<answer>178377</answer>`, right after the context, which
ends with the next assistant generation prompt): `p = exp(mean_j log pi(a*_j | context, a*_<j))`,
the geometric-mean token probability. A non-final turn t earns `IG_t = p_after(t) - p_before(t)`,
the rise in the model's belief in the right answer that the turn (its call and the tool's output)
brought; the final turn earns the outcome reward. The turn rewards sum to
`p_before(last turn) - p_0 + outcome`, which becomes the trajectory's reward. One extra forward
pass per turn, no gradient. The `igpo` advantage estimator then normalises the turn rewards within
each group and sums them over the remaining turns.

Gains are measured in probability space (the reference's default) or, with `log_space`, as
`log p_after - log p_before`, as a later port does (`tirl.algorithms.turns.information_gain_rewards`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from tirl.algorithms.turns import information_gain_rewards
from tirl.trainer.forward import response_logprobs
from tirl.types import Trajectory, TrajectoryGroup


@torch.no_grad()
def answer_beliefs(model, trajs: Sequence[Trajectory], answer_ids: Sequence[Sequence[int]], *,
                   compute_dtype: torch.dtype = torch.float32, micro_batch_size: int = 8) -> list[list[float]]:
    """For each trajectory, p before each of its turns (the context: the prompt, then everything up
    to the end of the previous turn's observations). `answer_ids[i]` are the gold answer's tokens for
    trajectory i. Returns one list per trajectory, of length `len(turns)`."""
    if len(answer_ids) != len(trajs):
        raise ValueError(f"answer_beliefs: {len(answer_ids)} answers for {len(trajs)} trajectories")
    contexts, answers, owner = [], [], []
    for i, (t, ans) in enumerate(zip(trajs, answer_ids)):
        if not ans:
            raise ValueError(f"answer_beliefs: empty gold answer for task {t.meta.task_id!r}")
        ends = [0] + [turn.obs_end for turn in t.turns[:-1]]
        for end in ends:
            contexts.append(tuple(t.prompt_ids) + tuple(t.response_ids[:end]))
            answers.append(tuple(ans))
            owner.append(i)
    values: list[float] = []
    for s in range(0, len(contexts), micro_batch_size):
        chunk_c, chunk_a = contexts[s:s + micro_batch_size], answers[s:s + micro_batch_size]
        scored = response_logprobs(model, chunk_c, chunk_a, [[1] * len(a) for a in chunk_a],
                                   compute_dtype=compute_dtype)
        mean_B = (scored.logprobs * scored.mask).sum(-1) / scored.mask.sum(-1)
        values += [math.exp(float(v)) for v in mean_B.cpu()]
    out: list[list[float]] = [[] for _ in trajs]
    for i, v in zip(owner, values):
        out[i].append(v)
    return out


def with_information_gain(model, groups: Sequence[TrajectoryGroup], answer_text: Callable[[str], str], encode,
                          *, compute_dtype: torch.dtype = torch.float32, micro_batch_size: int = 8,
                          log_space: bool = False) -> tuple[list[TrajectoryGroup], dict[str, float]]:
    """The groups with IGPO turn rewards set: every trajectory's reward becomes the sum of its
    information gains plus its outcome reward (its reward so far), its components gain
    `info_gain`. `answer_text(task_id)` is the gold final answer text, `encode` the tokenizer.
    Also returns metrics: `igpo/info_gain_mean` (per non-final turn) and `igpo/belief_first`."""
    trajs = [t for g in groups for t in g.trajectories]
    if not trajs:
        return list(groups), {}
    answer_ids = [encode(answer_text(t.meta.task_id)) for t in trajs]
    beliefs = answer_beliefs(model, trajs, answer_ids, compute_dtype=compute_dtype,
                             micro_batch_size=micro_batch_size)
    gains: list[float] = []
    scored = iter(beliefs)
    out = []
    for g in groups:
        new = []
        for t in g.trajectories:
            turn_rewards = tuple(information_gain_rewards(next(scored), t.reward, log_space=log_space))
            gain = sum(turn_rewards[:-1])
            gains += list(turn_rewards[:-1])
            new.append(t.with_reward(sum(turn_rewards), {**t.reward_components, "info_gain": gain}, t.correct,
                                     turn_rewards))
        out.append(dataclasses.replace(g, trajectories=tuple(new)))
    metrics = {"igpo/belief_first": sum(b[0] for b in beliefs) / len(beliefs),
               "igpo/info_gain_mean": sum(gains) / len(gains) if gains else 0.0}
    return out, metrics
