"""One policy update from a batch of scored trajectory groups: advantages, losses, optimizer step.

Pure orchestration of registered functions (`tirl.algorithms`): the estimator and the loss are
looked up by name, never special-cased here. Micro-batches are summed with global normalisers, so
gradient accumulation gives the same update as one full batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from tirl.algorithms import (ADVANTAGES, POLICY_LOSSES, AdvantageInput, PolicyLossInput, agg_loss, kl_penalty,
                             loss_normalisers, outcome_token_rewards)
from tirl.trainer.forward import response_logprobs
from tirl.types import Trajectory, TrajectoryGroup


@dataclass(frozen=True)
class UpdateSettings:
    """Everything the update needs from the config."""

    advantage: str = "grpo"
    advantage_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "ppo_clip"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    aggregation: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int = 8
    max_grad_norm: float | None = 1.0
    temperature: float = 1.0
    compute_dtype: torch.dtype = torch.float32
    skip_zero_advantage: bool = True
    """Do not run rows that cannot contribute a gradient (exact; see `_rows_with_gradient`)."""


@dataclass(frozen=True)
class Batch:
    """The trajectories of one step with their padded response tensors (B rows, T positions)."""

    trajs: list[Trajectory]
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None


def advantages_for(groups: Sequence[TrajectoryGroup], s: UpdateSettings) -> Batch:
    """Run the configured estimator on the whole batch (groups define the group ids)."""
    trajs = [t for g in groups for t in g.trajectories]
    width = max(1, max(len(t.response_ids) for t in trajs))
    mask = torch.zeros(len(trajs), width)
    for i, t in enumerate(trajs):
        mask[i, :len(t.loss_mask)] = torch.tensor(t.loss_mask, dtype=torch.float32)
    group_ids = torch.tensor([gi for gi, g in enumerate(groups) for _ in g.trajectories])
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    inp = AdvantageInput(token_rewards=outcome_token_rewards(rewards, mask), mask=mask, group_ids=group_ids)
    adv, _ = ADVANTAGES.get(s.advantage)(inp, **s.advantage_kwargs)
    return Batch(trajs, mask, adv.float())


def rl_update(model, optimizer, batch: Batch, s: UpdateSettings, ref_model=None) -> dict[str, float]:
    """`epochs` x `minibatches` optimizer steps on `batch`; returns token-weighted metrics of the rows
    that were run (train/loss is the loss of the whole mini-batch)."""
    rows = list(range(len(batch.trajs)))
    if s.epochs > 1 or s.minibatches > 1:
        batch = _with_old_logprobs(model, batch, s)
    metrics: dict[str, float] = {}
    for _ in range(s.epochs):
        for mb in _split(rows, s.minibatches):
            metrics = _minibatch_step(model, optimizer, batch, mb, s, ref_model)
    return metrics


def _minibatch_step(model, optimizer, batch: Batch, rows: list[int], s: UpdateSettings, ref_model):
    num_tokens, num_seqs = loss_normalisers(batch.mask[rows])
    norm_constant = float(batch.mask.shape[1])
    sums: dict[str, float] = {}
    active = _rows_with_gradient(batch, rows, s)
    total_loss = 0.0
    for micro in _chunks(active, s.micro_batch_size):
        parts = _micro_loss(model, batch, micro, s, ref_model, (num_tokens, num_seqs, norm_constant))
        loss, weights, micro_metrics = parts
        loss.backward()
        total_loss += float(loss.detach())
        for k, v in micro_metrics.items():
            sums[k] = sums.get(k, 0.0) + v * weights
    grad_norm = _clip(model, s.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scored = float(batch.mask[active].sum()) if active else 0.0
    out = {k: v / scored for k, v in sums.items()} if scored else {}
    out["train/loss"] = total_loss
    out["train/grad_norm"] = grad_norm
    out["train/tokens"] = float(num_tokens)
    out["train/rows_skipped"] = float(len(rows) - len(active))
    return out


def _rows_with_gradient(batch: Batch, rows: list[int], s: UpdateSettings) -> list[int]:
    """Rows whose loss can have a gradient. With no KL and no entropy term, a row whose advantages are
    all zero (e.g. a GRPO group where every sample got the same reward) contributes exactly nothing,
    so it is not run at all; the normalisers still count it, so the update is unchanged."""
    if s.kl_coef or s.entropy_coef or not s.skip_zero_advantage:
        return rows
    return [i for i in rows if bool((batch.advantages[i] * batch.mask[i]).abs().sum() > 0)]


def _micro_loss(model, batch: Batch, micro: list[int], s: UpdateSettings, ref_model, norms):
    trajs = [batch.trajs[i] for i in micro]
    scored = response_logprobs(model, [t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                               [t.loss_mask for t in trajs], temperature=s.temperature,
                               compute_dtype=s.compute_dtype, with_entropy=True,
                               entropy_grad=s.entropy_coef != 0.0)
    width = scored.logprobs.shape[1]
    mask = batch.mask[micro, :width].to(scored.logprobs.device)
    adv = batch.advantages[micro, :width].to(mask.device)
    old = (batch.old_logprobs[micro, :width].to(mask.device) if batch.old_logprobs is not None
           else scored.logprobs.detach())
    num_tokens, num_seqs, norm_constant = norms
    inp = PolicyLossInput(scored.logprobs, old, adv, mask, s.aggregation, num_tokens=num_tokens,
                          num_seqs=num_seqs, norm_constant=norm_constant)
    loss, loss_metrics = POLICY_LOSSES.get(s.loss)(inp, **s.loss_kwargs)
    metrics = {f"train/{k}": float(v) for k, v in loss_metrics.items()}
    if s.kl_coef and ref_model is not None:
        kl = kl_penalty(scored.logprobs, _ref_logprobs(ref_model, trajs, s, width), s.kl_estimator)
        kl_loss = agg_loss(kl, mask, s.aggregation, num_tokens=num_tokens, num_seqs=num_seqs,
                           norm_constant=norm_constant)
        loss = loss + s.kl_coef * kl_loss
        metrics["train/kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    entropy = agg_loss(scored.entropy, mask, s.aggregation, num_tokens=num_tokens, num_seqs=num_seqs,
                       norm_constant=norm_constant)
    if s.entropy_coef:
        loss = loss - s.entropy_coef * entropy
    n = float(mask.sum())
    metrics["train/entropy"] = float((scored.entropy.detach() * mask).sum()) / max(n, 1.0)
    metrics["train/logprob_mismatch"] = _mismatch(trajs, scored.logprobs.detach(), mask)
    return loss, n, metrics


def _ref_logprobs(ref_model, trajs, s: UpdateSettings, width: int) -> torch.Tensor:
    ctx = ref_model.disable_adapter() if hasattr(ref_model, "disable_adapter") else nullcontext()
    with torch.no_grad(), ctx:
        ref = response_logprobs(ref_model, [t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                                [t.loss_mask for t in trajs], temperature=s.temperature,
                                compute_dtype=s.compute_dtype)
    return ref.logprobs[:, :width]


def _mismatch(trajs: list[Trajectory], logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |log pi_train - log pi_sample| over sampled tokens (sampler/trainer numeric drift)."""
    sample = torch.zeros_like(logprobs)
    for i, t in enumerate(trajs):
        n = min(len(t.logprobs), logprobs.shape[1])
        sample[i, :n] = torch.tensor(t.logprobs[:n], dtype=logprobs.dtype)
    return float(((logprobs - sample).abs() * mask).sum() / mask.sum().clamp(min=1))


@torch.no_grad()
def _with_old_logprobs(model, batch: Batch, s: UpdateSettings) -> Batch:
    old = torch.zeros_like(batch.mask)
    for micro in _chunks(list(range(len(batch.trajs))), s.micro_batch_size):
        trajs = [batch.trajs[i] for i in micro]
        scored = response_logprobs(model, [t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                                   [t.loss_mask for t in trajs], temperature=s.temperature,
                                   compute_dtype=s.compute_dtype)
        old[micro, :scored.logprobs.shape[1]] = scored.logprobs.cpu()
    return Batch(batch.trajs, batch.mask, batch.advantages, old)


def _clip(model, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    return float(norm)


def _split(rows: list[int], parts: int) -> list[list[int]]:
    size = -(-len(rows) // parts)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _chunks(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]
