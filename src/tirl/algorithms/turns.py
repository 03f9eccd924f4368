"""Turn-level credit assignment: estimators that give each assistant turn of a row its own advantage.

A row's turns come from `AdvantageInput.turn_ids` (the 0-based index of the turn that sampled each
mask==1 token, -1 elsewhere). The reward of turn k of row b, `r[b, k]`, is the sum of the token
rewards on turn k's positions: a reward with turn rewards puts each on its turn's last sampled token,
an outcome-only reward sits on the row's last sampled token, hence on its last turn. `K` is the number
of turn slots (largest turn id + 1); a turn index that holds no sampled token of a row is *absent*
there and skipped (no reward, no discount step). A token reward outside every turn is an error.

Estimators (signature `fn(inp, **params) -> (advantages_B_T, returns_B_T)`, returns equal to the
advantages; every mask==1 token of turn k of row b gets `A[b, k]`):

- `igpo` (reference 4.4, IGPO): z-score all turn rewards of a prompt group jointly (or the
  information-gain and outcome pools separately), then `A[b, k] = sum_{k' >= k} gamma^(k'-k) z[b, k']`.
- `matchtir` (4.6, MatchTIR dual level): `A = (A_traj + A_turn) / 2` with `A_traj` GRPO of the row's
  summed turn rewards and `A_turn` the discounted turn return `D_k = r_k + gamma D_{k+1}` (gamma 0.9)
  z-scored across the group's rows at the same turn index k.
- `mt_grpo` (MT-GRPO, turn-level credit assignment): the row's final-turn reward is its outcome,
  earlier turn rewards are turn-level rewards. `A_out` = GRPO of the outcome over the group;
  `G[b, k] = sum_{k <= k' < last} gamma^(k'-k) r[b, k']` is the return of the turn-level rewards from
  k on (outcome excluded), `A_turn[b, k]` its z-score across the group's rows at turn index k; then
  `A = A_turn + outcome_weight * A_out` on every turn before the last and `A = A_out` on the last.
  With two turns (one tool turn, one answer turn) this is the paper's `A^T + lambda A^O` / `A^O`.

Group statistics follow GRPO (`_group_stats`): unbiased std, `eps = 1e-6`, a pool of one value keeps
it (mean 0 and std 1, as verl and MatchTIR), a pool of equal values is centred to exactly 0.
`information_gain_rewards` computes IGPO's turn rewards from the gold-answer probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tirl.algorithms.advantages import (AdvantageInput, _group_stats, require_fields,
                                        scores_from_token_rewards)
from tirl.algorithms.registry import register_advantage


@dataclass(frozen=True)
class TurnTable:
    """The turns of a batch as a `(B, K)` table."""

    rewards_B_K: Tensor
    """float32: reward of turn k of row b (0 where absent)."""
    present_B_K: Tensor
    """bool: row b sampled at least one token in turn k."""
    last_B: Tensor
    """int64: index of each row's last present turn, -1 for a row without any."""


def turn_table(inp: AdvantageInput, estimator: str) -> TurnTable:
    """Each row's turn rewards and turn presence (module docstring); ValueError naming `estimator` when
    `inp.turn_ids` is missing, a sampled token has no turn, or a token reward lies outside every turn."""
    require_fields(inp, estimator, "turn_ids")
    turn_ids_B_T = inp.turn_ids.long()
    mask_B_T = inp.mask.bool()
    rewards_B_T = inp.token_rewards.to(torch.float32)
    if bool((mask_B_T & (turn_ids_B_T < 0)).any()):
        raise ValueError(f"the {estimator!r} advantage estimator needs the turn of every sampled token: "
                         "some mask==1 tokens have turn_ids == -1")
    if bool(((rewards_B_T != 0) & (turn_ids_B_T < 0)).any()):
        raise ValueError(f"the {estimator!r} advantage estimator got a token reward outside every turn "
                         "(a non-zero token reward where turn_ids == -1)")
    B = rewards_B_T.shape[0]
    K = int(turn_ids_B_T.max()) + 1 if turn_ids_B_T.numel() else 0
    slot_B_T = turn_ids_B_T.clamp_min(-1) + 1  # slot 0 collects the -1 positions
    zeros = torch.zeros(B, K + 1, dtype=torch.float32, device=rewards_B_T.device)
    rewards_B_K = zeros.scatter_add(1, slot_B_T, rewards_B_T)[:, 1:]
    present_B_K = zeros.scatter_add(1, slot_B_T, mask_B_T.to(torch.float32))[:, 1:] > 0
    k_B_K = torch.arange(-1, K, device=rewards_B_T.device).expand(B, K + 1)
    none_B_1 = torch.ones(B, 1, dtype=torch.bool, device=rewards_B_T.device)
    present_or_none_B_K = torch.cat([none_B_1, present_B_K], dim=1)
    last_B = torch.where(present_or_none_B_K, k_B_K, torch.full_like(k_B_K, -1)).amax(dim=1)
    return TurnTable(rewards_B_K * present_B_K, present_B_K, last_B)


def discounted_turn_returns(rewards_B_K: Tensor, present_B_K: Tensor, gamma: float) -> Tensor:
    """`D[b, k] = r[b, k] + gamma * D[b, next present turn]` over each row's present turns, float32
    `(B, K)`, 0 where absent (absent turns are skipped: they cost no discount step)."""
    out_B_K = torch.zeros_like(rewards_B_K, dtype=torch.float32)
    running_B = torch.zeros(out_B_K.shape[0], dtype=torch.float32, device=out_B_K.device)
    for k in reversed(range(rewards_B_K.shape[1])):
        running_B = torch.where(present_B_K[:, k], rewards_B_K[:, k] + gamma * running_B, running_B)
        out_B_K[:, k] = running_B
    return out_B_K * present_B_K


def zscore_by_key(values_N: Tensor, keys_N: Tensor, eps: float) -> Tensor:
    """`(v - mean_key v) / (std_key v + eps)` per pool of equal keys, `(N,)` (GRPO statistics)."""
    if values_N.numel() == 0:
        return values_N.to(torch.float32)
    centred_N, std_N, _ = _group_stats(values_N.to(torch.float32), keys_N)
    return centred_N / (std_N + eps)


def broadcast_turns(adv_B_K: Tensor, turn_ids_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """`out[b, t] = adv[b, turn_ids[b, t]]` on mask==1 tokens, 0 elsewhere: `(B, K) -> (B, T)` float32."""
    padded_B_K = torch.cat([adv_B_K.new_zeros(adv_B_K.shape[0], 1), adv_B_K.to(torch.float32)], dim=1)
    return padded_B_K.gather(1, turn_ids_B_T.long().clamp_min(-1) + 1) * mask_B_T.to(torch.float32)


def _turn_keys(group_ids_B: Tensor, rows_N: Tensor, turns_N: Tensor, num_turns: int) -> Tensor:
    """One key per (group, turn index) pair."""
    _, group_B = torch.unique(group_ids_B, return_inverse=True)
    return group_B[rows_N] * max(num_turns, 1) + turns_N


def _grpo_rows(scores_B: Tensor, group_ids_B: Tensor, eps: float) -> Tensor:
    centred_B, std_B, _ = _group_stats(scores_B.to(torch.float32), group_ids_B)
    return centred_B / (std_B + eps)


@register_advantage("igpo")
@torch.no_grad()
def igpo_advantages(inp: AdvantageInput, *, gamma: float = 1.0, separate: bool = False,
                    eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """IGPO (information-gain turn rewards): group-wise z-scored turn rewards, A_k = sum_{k'>=k} gamma^(k'-k) z_k'.

    Reference 4.4.

    Every present turn reward of a prompt group (information gains and final outcomes alike) joins one
    pool; `separate=True` pools each row's last turn (the outcome) apart from its earlier turns (the
    information gains). Needs `inp.turn_ids`. Returns `(advantages_B_T, returns_B_T)`, equal.
    """
    table = turn_table(inp, "igpo")
    rows_N, turns_N = table.present_B_K.nonzero(as_tuple=True)
    keys_N = _turn_keys(inp.group_ids, rows_N, torch.zeros_like(turns_N), 1)
    if separate:
        keys_N = keys_N * 2 + (turns_N == table.last_B[rows_N]).long()
    z_B_K = torch.zeros_like(table.rewards_B_K)
    z_B_K[rows_N, turns_N] = zscore_by_key(table.rewards_B_K[rows_N, turns_N], keys_N, eps)
    adv_B_T = broadcast_turns(discounted_turn_returns(z_B_K, table.present_B_K, gamma), inp.turn_ids, inp.mask)
    return adv_B_T, adv_B_T.clone()


@register_advantage("matchtir")
@torch.no_grad()
def matchtir_advantages(inp: AdvantageInput, *, gamma: float = 0.9, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """MatchTIR dual level: (GRPO of summed turn rewards + z-score at turn index k of D_k = r_k + gamma D_k+1) / 2.

    Reference 4.6.
    `A_traj` is GRPO of `R_b = sum_k r[b, k]`; `D_k = r_k + gamma * D_{k+1}` per row; `A_turn[b, k]` is
    D z-scored across the rows of b's group that have turn index k; turn k's tokens get
    `(A_traj + A_turn) / 2`. Needs `inp.turn_ids`. Returns `(advantages_B_T, returns_B_T)`, equal.
    """
    table = turn_table(inp, "matchtir")
    traj_B = _grpo_rows(scores_from_token_rewards(inp.token_rewards), inp.group_ids, eps)
    returns_B_K = discounted_turn_returns(table.rewards_B_K, table.present_B_K, gamma)
    rows_N, turns_N = table.present_B_K.nonzero(as_tuple=True)
    keys_N = _turn_keys(inp.group_ids, rows_N, turns_N, table.rewards_B_K.shape[1])
    turn_B_K = torch.zeros_like(returns_B_K)
    turn_B_K[rows_N, turns_N] = zscore_by_key(returns_B_K[rows_N, turns_N], keys_N, eps)
    adv_B_T = broadcast_turns((traj_B[:, None] + turn_B_K) / 2, inp.turn_ids, inp.mask)
    return adv_B_T, adv_B_T.clone()


@register_advantage("mt_grpo")
@torch.no_grad()
def mt_grpo_advantages(inp: AdvantageInput, *, gamma: float = 1.0, outcome_weight: float = 1.0,
                       eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """MT-GRPO: turn-level GRPO per turn index + outcome_weight * outcome GRPO; the last turn gets the outcome's.

    The last present turn's reward is the row's outcome `R_out`, `A_out` its GRPO advantage; for the
    earlier turns `G[b, k]` is the gamma-discounted return of the turn rewards from k up to (not
    including) the last turn, `A_turn[b, k]` G's z-score across the group's rows at turn index k, and
    `A = A_turn + outcome_weight * A_out`; the last turn gets `A_out`. Needs `inp.turn_ids`.
    Returns `(advantages_B_T, returns_B_T)`, equal.
    """
    table = turn_table(inp, "mt_grpo")
    B, K = table.rewards_B_K.shape
    has_turn_B = table.last_B >= 0
    outcome_B = torch.zeros(B, dtype=torch.float32, device=table.rewards_B_K.device)
    outcome_B[has_turn_B] = table.rewards_B_K[has_turn_B, table.last_B[has_turn_B]]
    out_adv_B = _grpo_rows(outcome_B, inp.group_ids, eps)
    k_B_K = torch.arange(K, device=outcome_B.device).expand(B, K)
    earlier_B_K = table.present_B_K & (k_B_K < table.last_B[:, None])
    returns_B_K = discounted_turn_returns(table.rewards_B_K, earlier_B_K, gamma)
    rows_N, turns_N = earlier_B_K.nonzero(as_tuple=True)
    turn_B_K = torch.zeros_like(returns_B_K)
    keys_N = _turn_keys(inp.group_ids, rows_N, turns_N, K)
    turn_B_K[rows_N, turns_N] = zscore_by_key(returns_B_K[rows_N, turns_N], keys_N, eps)
    adv_B_K = torch.where(earlier_B_K, turn_B_K + outcome_weight * out_adv_B[:, None], out_adv_B[:, None])
    adv_B_T = broadcast_turns(adv_B_K, inp.turn_ids, inp.mask)
    return adv_B_T, adv_B_T.clone()


def information_gain_rewards(gold_probs: Sequence[float], final_reward: float, *,
                             log_space: bool = False) -> list[float]:
    """IGPO turn rewards (reference 4.4): `IG_k = p_k - p_{k-1}` per non-final turn, `final_reward` last.

    `gold_probs` holds n values for a trajectory of n turns: `p_0`, the probability of the gold answer
    (geometric mean over its tokens, teacher-forced) before the first turn, then `p_k` after each
    non-final turn k. `log_space=True` gives `log p_k - log p_{k-1}` instead. Hand value:
    p = [0.1, 0.3, 0.25], final F1 1.0 -> [0.2, -0.05, 1.0]. ValueError for p outside (0, 1].
    """
    probs = [float(p) for p in gold_probs]
    if not probs:
        raise ValueError("information_gain_rewards: gold_probs is empty; a trajectory of n turns needs n values")
    if not all(0.0 < p <= 1.0 for p in probs):
        raise ValueError(f"information_gain_rewards: probabilities must lie in (0, 1], got {probs}")
    scale = math.log if log_space else float
    gains = [scale(after) - scale(before) for before, after in zip(probs, probs[1:])]
    return [*gains, float(final_reward)]
