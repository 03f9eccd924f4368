"""Advantage estimators: token rewards, loss mask and group ids in, per-token advantages out.

Pure torch functions registered by name in `ADVANTAGES`; each has the signature
`fn(inp: AdvantageInput, **params) -> (advantages_B_T, returns_B_T)`, both float32 and 0 wherever
`mask == 0`. `B` is the number of sequences (rows), `T` the padded token length. A *group* is the
set of rows sharing a `group_ids` value: the samples of one prompt. Formulas and test values are
those of reference section 1.3 and 2.4 (verl `core_algos.py`).

Outcome estimators (`grpo`, `drgrpo`, `rloo`, `reinforce_pp_baseline`, `hdpo`) score a row by the
sum of its token rewards, `R_i = sum_t token_rewards[i, t]`, and broadcast one advantage to every
mask==1 token of the row; their `returns` equal the advantages (as verl). Estimators do not track
gradients. Turn-level estimators live in `tirl.algorithms.turns`, tree-level ones in `tirl.algorithms.tree`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tirl.algorithms.losses import masked_whiten
from tirl.algorithms.registry import register_advantage

if TYPE_CHECKING:
    from tirl.algorithms.tree import TreeStructure


@dataclass(frozen=True)
class AdvantageInput:
    """What every advantage estimator receives."""

    token_rewards: Tensor
    """(B, T) float rewards per token; an outcome reward sits on the last mask==1 token of its row."""
    mask: Tensor
    """(B, T) float or bool loss mask: 1 = token sampled by the policy, 0 = prompt, tool output, padding."""
    group_ids: Tensor
    """(B,) int64; rows with the same id are samples of the same prompt."""
    values: Tensor | None = None
    """(B, T) critic values V_t of the state before token t (GAE only)."""
    tree: TreeStructure | None = None
    """Rollout-tree structure (which step holds each token, each step's parent) when the batch has tree
    groups; None for flat batches. Estimators that ignore it treat a tree's leaves as its G samples."""
    turn_ids: Tensor | None = None
    """(B, T) int64: the index of the turn (0-based) that sampled each mask==1 token, -1 elsewhere.
    Turn-level estimators (MT-GRPO, IGPO, MatchTIR) need it; turn rewards sit on each turn's last
    sampled token of `token_rewards`."""
    correct: Tensor | None = None
    """(B,) float: 1.0 where the row's answer is right, 0.0 where wrong, NaN where the reward cannot
    tell. Needed by estimators that treat correct rows apart (HDPO)."""
    tool_calls: Tensor | None = None
    """(B,) float: the number of tool calls the row made (HDPO's efficiency channel)."""

    def __post_init__(self) -> None:
        shape = tuple(self.token_rewards.shape)
        if len(shape) != 2:
            raise ValueError(f"AdvantageInput.token_rewards must be (B, T), got {shape}")
        if tuple(self.mask.shape) != shape:
            raise ValueError(f"AdvantageInput.mask must match token_rewards {shape}, got {tuple(self.mask.shape)}")
        if tuple(self.group_ids.shape) != shape[:1]:
            raise ValueError(f"AdvantageInput.group_ids must be ({shape[0]},), got {tuple(self.group_ids.shape)}")
        if self.values is not None and tuple(self.values.shape) != shape:
            raise ValueError(f"AdvantageInput.values must match token_rewards {shape}, got {tuple(self.values.shape)}")
        if self.turn_ids is not None and tuple(self.turn_ids.shape) != shape:
            raise ValueError(f"AdvantageInput.turn_ids must match token_rewards {shape}, got {tuple(self.turn_ids.shape)}")
        for name in ("correct", "tool_calls"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape[:1]:
                raise ValueError(f"AdvantageInput.{name} must be ({shape[0]},), got {tuple(value.shape)}")
        if self.tree is not None and tuple(self.tree.node_B_T.shape) != shape:
            raise ValueError(f"AdvantageInput.tree.node_B_T must match token_rewards {shape}, "
                             f"got {tuple(self.tree.node_B_T.shape)}")


def outcome_token_rewards(rewards_B: Tensor, mask_B_T: Tensor) -> Tensor:
    """Place each row's scalar reward on the last mask==1 token of that row: `(B,), (B, T) -> (B, T)`.

    Every other position is 0; a row without any mask==1 token gets no reward at all. float32.
    """
    mask = mask_B_T.bool()
    B, T = mask.shape
    last_T = T - 1 - torch.flip(mask, dims=[1]).int().argmax(dim=1)
    out_B_T = torch.zeros(B, T, dtype=torch.float32, device=mask.device)
    has_token_B = mask.any(dim=1)
    rows_B = torch.arange(B, device=mask.device)[has_token_B]
    out_B_T[rows_B, last_T[has_token_B]] = rewards_B.to(torch.float32)[has_token_B]
    return out_B_T


def scores_from_token_rewards(token_rewards_B_T: Tensor) -> Tensor:
    """Sequence score `R_i = sum_t token_rewards[i, t]`, float32 `(B,)` (all positions, masked or not)."""
    return token_rewards_B_T.to(torch.float32).sum(dim=-1)


def _group_stats(scores_B: Tensor, group_ids_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row `(centred_B, std_B, size_B)` of the row's group.

    `centred = R - group mean`, `std` the unbiased (Bessel) group std. A group of size 1 has mean 0
    and std 1 (as verl), so its row keeps its raw score. A group whose scores are all equal is
    centred to exactly 0: a float mean that is off by one ulp must not become a large advantage
    once divided by a std of 0 + eps.
    """
    _, inverse_B = torch.unique(group_ids_B, return_inverse=True)
    num_groups = int(inverse_B.max().item()) + 1 if inverse_B.numel() else 0
    zeros_G = torch.zeros(num_groups, dtype=scores_B.dtype, device=scores_B.device)
    size_G = zeros_G.index_add(0, inverse_B, torch.ones_like(scores_B))
    mean_G = zeros_G.index_add(0, inverse_B, scores_B) / size_G
    max_G = zeros_G.scatter_reduce(0, inverse_B, scores_B, reduce="amax", include_self=False)
    min_G = zeros_G.scatter_reduce(0, inverse_B, scores_B, reduce="amin", include_self=False)
    size_B, mean_B = size_G[inverse_B], mean_G[inverse_B]
    singleton_B = size_B == 1
    constant_B = (max_G == min_G)[inverse_B] & ~singleton_B
    centred_B = torch.where(singleton_B, scores_B, scores_B - mean_B)
    centred_B = torch.where(constant_B, torch.zeros_like(centred_B), centred_B)
    sq_dev_G = zeros_G.index_add(0, inverse_B, centred_B.square())
    std_G = (sq_dev_G / (size_G - 1).clamp_min(1)).sqrt()
    std_B = torch.where(singleton_B, torch.ones_like(scores_B), std_G[inverse_B])
    return centred_B, std_B, size_B


def _broadcast(adv_B: Tensor, mask_B_T: Tensor) -> Tensor:
    return adv_B.unsqueeze(-1) * mask_B_T.to(torch.float32)


@register_advantage("grpo")
@torch.no_grad()
def grpo_advantages(inp: AdvantageInput, *, eps: float = 1e-6, norm_by_std: bool = True) -> tuple[Tensor, Tensor]:
    """GRPO: `A_i = (R_i - mean_g R) / (std_g R + eps)`, std unbiased; broadcast over mask==1 tokens.

    A group of size 1 gets mean 0 and std 1. `norm_by_std=False` gives Dr.GRPO (`R_i - mean_g R`).
    Returns `(advantages_B_T, returns_B_T)` with returns equal to the advantages.
    """
    centred_B, std_B, _ = _group_stats(scores_from_token_rewards(inp.token_rewards), inp.group_ids)
    adv_B = centred_B / (std_B + eps) if norm_by_std else centred_B
    adv_B_T = _broadcast(adv_B, inp.mask)
    return adv_B_T, adv_B_T.clone()


@register_advantage("drgrpo")
@torch.no_grad()
def drgrpo_advantages(inp: AdvantageInput) -> tuple[Tensor, Tensor]:
    """Dr.GRPO: `A_i = R_i - mean_g R` (GRPO without the std division); pair with `seq-mean-token-sum-norm`."""
    return grpo_advantages(inp, norm_by_std=False)


@register_advantage("rloo")
@torch.no_grad()
def rloo_advantages(inp: AdvantageInput) -> tuple[Tensor, Tensor]:
    """RLOO: `A_i = R_i - mean_{j != i} R_j = (R_i - mean_g R) * n / (n - 1)` for a group of n rows.

    A group of size 1 has no baseline: its row keeps `A = R` (as verl). Returns equal the advantages.
    """
    centred_B, _, size_B = _group_stats(scores_from_token_rewards(inp.token_rewards), inp.group_ids)
    adv_B = torch.where(size_B > 1, centred_B * size_B / (size_B - 1).clamp_min(1), centred_B)
    adv_B_T = _broadcast(adv_B, inp.mask)
    return adv_B_T, adv_B_T.clone()


@register_advantage("reinforce_pp")
@torch.no_grad()
def reinforce_pp_advantages(inp: AdvantageInput, *, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted return per row, then `masked_whiten` over the whole batch.

    `G_t = r_t + gamma * G_{t+1}` on mask==1 tokens, computed independently for each row (so it
    resets between sequences). Like masked GAE, mask==0 tokens (tool output, padding) are skipped:
    they carry `G` through undiscounted and add their own reward, if any, so a reward inside or
    after a tool observation still reaches the policy tokens before it. (verl instead resets the
    return at every mask==0 token, which would cut an outcome reward off from earlier turns; with a
    padding-only mask the two agree.) Whitening uses the mean and unbiased variance over all
    mask==1 tokens of the batch. Returns `(advantages_B_T, returns_B_T)`, returns being `G`
    before whitening (as verl), both masked.
    """
    rewards_B_T = inp.token_rewards.to(torch.float32)
    mask_B_T = inp.mask.to(torch.float32)
    running_B = torch.zeros_like(rewards_B_T[:, 0])
    returns_B_T = torch.zeros_like(rewards_B_T)
    for t in reversed(range(rewards_B_T.shape[1])):
        discount_B = 1.0 + (gamma - 1.0) * mask_B_T[:, t]  # gamma on policy tokens, 1 elsewhere
        running_B = rewards_B_T[:, t] + discount_B * running_B
        returns_B_T[:, t] = running_B
    adv_B_T = masked_whiten(returns_B_T, mask_B_T) * mask_B_T
    return adv_B_T, returns_B_T * mask_B_T


@register_advantage("reinforce_pp_baseline")
@torch.no_grad()
def reinforce_pp_baseline_advantages(inp: AdvantageInput) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline: group-centred scores, whitened over the whole batch.

    `R_i - mean_g R` is broadcast over mask==1 tokens, then `masked_whiten`ed over all mask==1
    tokens of the batch (so longer rows weigh more, as verl). A group of size 1 keeps `R`.
    Returns equal the advantages.
    """
    centred_B, _, _ = _group_stats(scores_from_token_rewards(inp.token_rewards), inp.group_ids)
    mask_B_T = inp.mask.to(torch.float32)
    adv_B_T = masked_whiten(_broadcast(centred_B, mask_B_T), mask_B_T) * mask_B_T
    return adv_B_T, adv_B_T.clone()


@register_advantage("gae")
@torch.no_grad()
def gae_advantages(
    inp: AdvantageInput, *, gamma: float = 1.0, lam: float = 1.0, whiten: bool = True
) -> tuple[Tensor, Tensor]:
    """Masked GAE (reference section 1.3, verl `compute_gae_advantage_return`); needs `inp.values`.

    Backwards over t: `delta = r_t + gamma * nextV - V_t`, `gae = delta + gamma * lam * lastgae`;
    on mask==1 tokens `nextV <- V_t` and `lastgae <- gae`, on mask==0 tokens (tool output, padding)
    both carry over unchanged, so observation tokens get no TD error and no bootstrap (and a reward
    placed on them is ignored). `A_raw_t = lastgae`. Returns `(advantages_B_T, returns_B_T)` with
    `returns = A_raw + V` and advantages `masked_whiten(A_raw)` over the batch when `whiten`, else
    `A_raw`; both are zeroed where mask == 0.
    """
    if inp.values is None:
        raise ValueError("the 'gae' advantage estimator needs critic values: AdvantageInput.values is None")
    rewards_B_T = inp.token_rewards.to(torch.float32)
    values_B_T = inp.values.detach().to(torch.float32)
    mask_B_T = inp.mask.to(torch.float32)
    next_value_B = torch.zeros_like(rewards_B_T[:, 0])
    last_gae_B = torch.zeros_like(next_value_B)
    raw_B_T = torch.zeros_like(rewards_B_T)
    for t in reversed(range(rewards_B_T.shape[1])):
        m_B = mask_B_T[:, t]
        delta_B = rewards_B_T[:, t] + gamma * next_value_B - values_B_T[:, t]
        gae_B = delta_B + gamma * lam * last_gae_B
        next_value_B = values_B_T[:, t] * m_B + (1.0 - m_B) * next_value_B
        last_gae_B = gae_B * m_B + (1.0 - m_B) * last_gae_B
        raw_B_T[:, t] = last_gae_B
    returns_B_T = (raw_B_T + values_B_T) * mask_B_T
    adv_B_T = masked_whiten(raw_B_T, mask_B_T) if whiten else raw_B_T
    return adv_B_T * mask_B_T, returns_B_T


gae_advantages.needs_values = True
"""Estimators marked `needs_values` get critic values: the trainer runs a value head for them."""


def require_fields(inp: AdvantageInput, estimator: str, *names: str) -> None:
    """Raise ValueError naming the `AdvantageInput` fields an estimator needs but got as None."""
    missing = [n for n in names if getattr(inp, n) is None]
    if missing:
        fields = ", ".join(f"AdvantageInput.{n}" for n in missing)
        raise ValueError(f"the {estimator!r} advantage estimator needs {fields}, which the batch does not provide")


@register_advantage("hdpo")
@torch.no_grad()
def hdpo_advantages(inp: AdvantageInput, *, weight: float = 0.5, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """HDPO (Act Wisely): GRPO accuracy advantage + weight * 1[correct] * z(-tool calls) among a group's correct rows.

    `A_i = A_acc_i + w * 1[correct_i] * z_i` (reference 3.8 [R]), broadcast over mask==1 tokens:
    `A_acc` is the GRPO advantage of the row score `R_i` (the reward should be the accuracy itself,
    with no tool penalty folded in), and `z_i = (-tc_i - mean_c(-tc)) / (std_c(-tc) + eps)` over the
    correct rows c of row i's group (unbiased std; `tc` = `inp.tool_calls`). `z = 0` where a group has
    fewer than two correct rows or they all made the same number of calls; wrong rows and rows of
    unknown correctness (NaN) get no efficiency term. Hand value: correct=[1,1,0], tc=[1,3,5] ->
    z = [+0.7071, -0.7071, none]. Needs `inp.correct` and `inp.tool_calls` (ValueError when missing,
    malformed, or when no row's correctness is known). Returns equal the advantages.
    """
    require_fields(inp, "hdpo", "correct", "tool_calls")
    correct_B = inp.correct.to(torch.float32)
    calls_B = inp.tool_calls.to(torch.float32)
    known_B = ~torch.isnan(correct_B)
    if not bool(((correct_B == 0) | (correct_B == 1) | ~known_B).all()):
        raise ValueError(f"hdpo: AdvantageInput.correct must hold 1, 0 or NaN, got {correct_B.tolist()}")
    if correct_B.numel() and not bool(known_B.any()):
        raise ValueError("hdpo: the reward told the correctness of no row (AdvantageInput.correct is all NaN); "
                         "HDPO needs a reward that sets `correct`")
    if not bool(torch.isfinite(calls_B).all()):
        raise ValueError(f"hdpo: AdvantageInput.tool_calls must be finite, got {calls_B.tolist()}")
    centred_B, std_B, _ = _group_stats(scores_from_token_rewards(inp.token_rewards), inp.group_ids)
    acc_B = centred_B / (std_B + eps)
    is_correct_B = correct_B == 1
    efficiency_B = torch.zeros_like(acc_B)
    if bool(is_correct_B.any()):
        c_centred, c_std, c_size = _group_stats(-calls_B[is_correct_B], inp.group_ids[is_correct_B])
        efficiency_B[is_correct_B] = torch.where(c_size > 1, c_centred / (c_std + eps), torch.zeros_like(c_centred))
    adv_B_T = _broadcast(acc_B + weight * efficiency_B, inp.mask)
    return adv_B_T, adv_B_T.clone()
