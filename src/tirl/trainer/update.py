"""One policy update from a batch of scored trajectory groups: advantages, losses, optimizer step.

Pure orchestration of registered functions (`tirl.algorithms`): the estimator and the loss are
looked up by name, never special-cased here. Micro-batches are summed with global normalisers, so
gradient accumulation gives the same update as one full batch.

Rollout trees (reference 4.1): a step shared by several leaves of a tree is trained once, whatever
the estimator. The estimator sees the tree (`AdvantageInput.tree`: each token's step and each step's
parent) and gives per-row advantages as usual (a flat estimator such as `grpo` treats the leaves as
the group's G samples); then every token of a shared step gets the mean of its rows' advantages and
is kept in one row only (`Batch.train_mask`), so the loss, its token counts and the metrics count it
once (with `seq-mean-*` aggregations, a row's mean is over the tokens it keeps, and a row that keeps
none is not counted). Each trajectory's `loss_mask` (and `Batch.mask`) stays exactly as sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tirl.algorithms import (ADVANTAGES, POLICY_LOSSES, AdvantageInput, NeedsTreeError, PolicyLossInput, TreeStructure,
                             agg_loss, kl_penalty, loss_normalisers, mean_over_sharing_rows, outcome_token_rewards,
                             owner_mask)
from tirl.errors import ConfigError, InvariantError
from tirl.rollout.tree import ROOT, check_tree, is_tree, node_spans
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
    """(B, T) the trajectories' loss masks, as sampled."""
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    train_mask: torch.Tensor | None = None
    """(B, T) the tokens the loss covers: `mask` with each token of a shared tree step kept in one row
    only (None: `mask`)."""

    @property
    def trained(self) -> torch.Tensor:
        """(B, T) mask of the tokens trained on (each distinct token once)."""
        return self.mask if self.train_mask is None else self.train_mask


def advantages_for(groups: Sequence[TrajectoryGroup], s: UpdateSettings) -> Batch:
    """Run the configured estimator on the whole batch (groups define the group ids); on tree groups,
    train each shared step once with the mean advantage of its rows (module docstring)."""
    trajs = [t for g in groups for t in g.trajectories]
    width = max(1, max(len(t.response_ids) for t in trajs))
    mask = torch.zeros(len(trajs), width)
    for i, t in enumerate(trajs):
        mask[i, :len(t.loss_mask)] = torch.tensor(t.loss_mask, dtype=torch.float32)
    group_ids = torch.tensor([gi for gi, g in enumerate(groups) for _ in g.trajectories])
    tree = tree_structure(groups, width)
    token_rewards, turn_ids = token_rewards_and_turns(trajs, mask)
    inp = AdvantageInput(token_rewards=token_rewards, mask=mask, group_ids=group_ids, tree=tree, turn_ids=turn_ids)
    try:
        adv, _ = ADVANTAGES.get(s.advantage)(inp, **s.advantage_kwargs)
    except NeedsTreeError as e:
        raise ConfigError(f"algorithm.advantage={s.advantage}: {e}") from None
    if tree is None:
        return Batch(trajs, mask, adv.float())
    adv = mean_over_sharing_rows(adv, tree.node_B_T) * mask
    return Batch(trajs, mask, adv, train_mask=mask * owner_mask(tree.node_B_T))


def token_rewards_and_turns(trajs: Sequence[Trajectory], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(token_rewards_B_T, turn_ids_B_T)`: each trajectory's reward on its last sampled token, or, when
    the reward gave turn rewards, each on the last sampled token of its turn; and the turn index of every
    sampled token (-1 elsewhere)."""
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    token_rewards = outcome_token_rewards(rewards, mask)
    turn_ids = torch.full(mask.shape, -1, dtype=torch.long)
    for i, t in enumerate(trajs):
        for k, turn in enumerate(t.turns):
            turn_ids[i, turn.gen_start:turn.gen_end] = k
        if t.turn_rewards:
            token_rewards[i] = 0.0
            for turn, r in zip(t.turns, t.turn_rewards):
                if turn.gen_end > turn.gen_start:
                    token_rewards[i, turn.gen_end - 1] += r
                else:  # a turn that sampled nothing: its reward goes to the trajectory's last sampled token
                    token_rewards[i] += outcome_token_rewards(torch.tensor([r]), mask[i:i + 1])[0]
    return token_rewards, turn_ids


def tree_structure(groups: Sequence[TrajectoryGroup], width: int) -> TreeStructure | None:
    """The batch's rollout trees as tensors (None when no group is a tree): the step holding each token
    (-1 on rows of flat groups and on padding), each step's parent, and whether its tool calls all ran
    ok. Nodes are numbered in first-seen order of (group, node id); each tree's root is a node too."""
    if not any(is_tree(g) for g in groups):
        return None
    index: dict[tuple[int, str], int] = {}
    parent: list[int] = []
    tools_ok: list[bool] = []

    def node(key: tuple[int, str], parent_index: int, ok: bool) -> int:
        if key not in index:
            index[key] = len(parent)
            parent.append(parent_index)
            tools_ok.append(ok)
        return index[key]

    node_B_T = torch.full((sum(len(g.trajectories) for g in groups), width), -1, dtype=torch.long)
    row = 0
    for gi, g in enumerate(groups):
        if is_tree(g):
            try:
                check_tree(g)
            except ValueError as e:
                raise InvariantError(f"rollout tree: {e}") from None
            for r, t in enumerate(g.trajectories):
                for (up, name, start, end), turn in zip(node_spans(t), t.turns):
                    up_index = node((gi, up), -1, True) if up == ROOT else index[(gi, up)]
                    node_B_T[row + r, start:end] = node((gi, name), up_index, all(x.ok for x in turn.tool_results))
        row += len(g.trajectories)
    return TreeStructure(node_B_T, torch.tensor(parent, dtype=torch.long), torch.tensor(tools_ok, dtype=torch.bool))


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
    num_tokens, num_seqs = loss_normalisers(batch.trained[rows])
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
    scored = float(batch.trained[active].sum()) if active else 0.0
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
    return [i for i in rows if bool((batch.advantages[i] * batch.trained[i]).abs().sum() > 0)]


def _micro_loss(model, batch: Batch, micro: list[int], s: UpdateSettings, ref_model, norms):
    trajs = [batch.trajs[i] for i in micro]
    scored = response_logprobs(model, [t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                               [t.loss_mask for t in trajs], temperature=s.temperature,
                               compute_dtype=s.compute_dtype, with_entropy=True,
                               entropy_grad=s.entropy_coef != 0.0)
    width = scored.logprobs.shape[1]
    mask = batch.trained[micro, :width].to(scored.logprobs.device)
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
    return replace(batch, old_logprobs=old)


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
