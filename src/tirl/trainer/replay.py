"""SPEAR self-imitation replay (reference 4.3): good past trajectories are trained on again.

Each step, after the estimator:

1. `add`: on-policy rows whose advantage (the mean over their trained tokens) exceeds `threshold` enter
   the buffer with their reward, the step (policy version) and the old log-probs of that policy
   (`Batch.old_logprobs`: the behaviour policy of a later replay); the buffer keeps the newest `size`
   (FIFO).
2. `evict`: entries stored more than `tolerate_steps` policy versions ago are dropped.
3. The step's rewards join D_R, the last `reward_window` on-policy rewards.
4. Recalibration: a stored trajectory gets `A~ = R - P50(D_R)` (P50: the linearly interpolated median)
   and is used only when `A~ > 0`; up to `batch_size` of those are sampled (seeded by run seed and
   step). Hand values: D_R = [0, 0, 1, 1, 1] -> P50 = 1, so a stored R = 1 gets A~ = 0 and is dropped.
5. The loss adds `beta(s) * policy loss(replay rows, A~)`, `beta(s) = coef * (1 - cos(pi s / T)) / 2`
   for s < T, `coef` after (T = `warmup_steps`): beta(0) = 0, beta(T) = coef (`update.rl_update`).

The buffer is part of every checkpoint, as JSON (trajectories via `tirl.rollout.io`).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tirl.rollout.io import from_dict, to_dict
from tirl.trainer.update import Batch, loss_masks
from tirl.types import Trajectory


@dataclass(frozen=True)
class ReplayEntry:
    """A stored trajectory with what its replay needs."""

    traj: Trajectory
    old_logprobs: tuple[float, ...]
    """Log-probs of its response tokens under the policy of step `step` (0.0 where the mask is 0)."""
    advantage: float
    """Its on-policy advantage when stored."""
    step: int
    """The policy version (RL step) that stored it."""


def p50(rewards: Sequence[float]) -> float:
    """The median with linear interpolation (numpy's default percentile); ValueError when empty."""
    if not len(rewards):
        raise ValueError("P50 of an empty reward window")
    return float(np.percentile(np.asarray(rewards, dtype=np.float64), 50))


def recalibrated(entries: Sequence[ReplayEntry], baseline: float) -> list[tuple[ReplayEntry, float]]:
    """`(entry, A~)` with `A~ = R - baseline`, for the entries whose `A~ > 0` only."""
    out = [(e, e.traj.reward - baseline) for e in entries]
    return [(e, a) for e, a in out if a > 0]


def replay_weight(step: int, coef: float, warmup_steps: int) -> float:
    """`beta(s) = coef * (1 - cos(pi s / T)) / 2` for `s < T`, else `coef` (T = `warmup_steps`; 0: coef)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return coef
    return coef * (1.0 - math.cos(math.pi * step / warmup_steps)) / 2.0


def replay_batch(chosen: Sequence[tuple[ReplayEntry, float]]) -> Batch:
    """The chosen entries as a `Batch`: `A~` broadcast over each row's sampled tokens, stored old log-probs."""
    trajs = [e.traj for e, _ in chosen]
    mask = loss_masks(trajs)
    old = torch.zeros_like(mask)
    for i, (e, _) in enumerate(chosen):
        old[i, :len(e.old_logprobs)] = torch.tensor(e.old_logprobs, dtype=torch.float32)
    adv = torch.tensor([a for _, a in chosen], dtype=torch.float32).unsqueeze(-1) * mask
    return Batch(trajs, mask, adv, old_logprobs=old)


class ReplayBuffer:
    """The SIL buffer and the reward window D_R (module docstring)."""

    def __init__(self, size: int, threshold: float, tolerate_steps: int, reward_window: int):
        if size < 1 or reward_window < 1 or tolerate_steps < 0:
            raise ValueError(f"replay buffer: size ({size}) and reward_window ({reward_window}) must be >= 1, "
                             f"tolerate_steps ({tolerate_steps}) >= 0")
        self.size, self.threshold, self.tolerate_steps = size, threshold, tolerate_steps
        self.entries: list[ReplayEntry] = []
        self.rewards: deque[float] = deque(maxlen=reward_window)

    def add(self, batch: Batch, step: int) -> int:
        """Store the rows of `batch` whose advantage exceeds the threshold (needs `batch.old_logprobs`);
        returns how many. The oldest entries beyond `size` are dropped."""
        if batch.old_logprobs is None:
            raise ValueError("replay: the batch has no old log-probs to store")
        trained = batch.trained
        added = 0
        for i, t in enumerate(batch.trajs):
            tokens = float(trained[i].sum())
            if tokens == 0:
                continue
            advantage = float((batch.advantages[i] * trained[i]).sum()) / tokens
            if advantage > self.threshold:
                n = len(t.response_ids)
                old = (batch.old_logprobs[i, :n] * batch.mask[i, :n]).tolist()
                self.entries.append(ReplayEntry(t, tuple(old), advantage, step))
                added += 1
        del self.entries[:max(0, len(self.entries) - self.size)]
        return added

    def evict(self, step: int) -> int:
        """Drop entries stored more than `tolerate_steps` policy versions before `step`; returns how many."""
        keep = [e for e in self.entries if step - e.step <= self.tolerate_steps]
        dropped = len(self.entries) - len(keep)
        self.entries = keep
        return dropped

    def step(self, batch: Batch, step: int, seed: int, batch_size: int | None) -> tuple[Batch | None, dict[str, float]]:
        """One step of the module docstring (1-4) for the on-policy `batch`: the replay rows to train on
        (None: none qualify) and `replay/*` metrics."""
        added = self.add(batch, step)
        evicted = self.evict(step)
        self.rewards.extend(t.reward for t in batch.trajs)
        baseline = p50(self.rewards)
        eligible = recalibrated(self.entries, baseline)
        n = min(len(eligible), batch_size or len(batch.trajs))
        chosen = random.Random(f"replay-{seed}-{step}").sample(eligible, n)
        metrics = {"replay/size": float(len(self.entries)), "replay/added": float(added),
                   "replay/evicted": float(evicted), "replay/eligible": float(len(eligible)),
                   "replay/rows": float(n), "replay/p50": baseline}
        return (replay_batch(chosen) if chosen else None), metrics

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: the entries (trajectories as `tirl.rollout.io` dicts) and the reward window."""
        return {"entries": [{"traj": to_dict(e.traj), "old_logprobs": list(e.old_logprobs),
                             "advantage": e.advantage, "step": e.step} for e in self.entries],
                "rewards": list(self.rewards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = [ReplayEntry(from_dict(e["traj"]), tuple(e["old_logprobs"]), e["advantage"], e["step"])
                        for e in state["entries"]]
        self.rewards.clear()
        self.rewards.extend(state["rewards"])
