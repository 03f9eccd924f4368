"""Credit assignment on rollout trees (reference 4.1, PORTool): step rewards, fork-relative advantages,
and training each shared step once.

A batch's tree structure arrives as tensors (`TreeStructure`): every token position of every row is
labelled with the batch-wide index of the tree node (step) that holds it, and every node knows its
parent. A *step* s is one assistant turn plus the observations that follow it; the leaves (rows)
that pass through s are `m(s)`, the other children of s's parent are its siblings.

PORTool (`portool_advantages`, registered as `portool`):

    R(s)      = mean_{tau in m(s)} R_out(tau) + eta * 1[every tool call of s ran ok]
    A_fork(s) = (R(s) - mean_{s' in C(parent(s))} R(s')) / (std_{s' in C(parent(s))} R(s') + eps)
                (unbiased std; 0 when s has no sibling or all siblings have the same R)
    A_traj(tau) = GRPO advantage of R_out(tau) over the leaves of tau's tree
    A(s, tau) = omega * A_fork(s) + (1 - omega) * A_traj(tau), on the tokens of step s in row tau

`R_out` is the row's outcome reward (the sum of its token rewards). A step without tool calls counts
as "all calls ok" (the empty case), so `eta` only separates siblings that called tools with different
success. Hand values: a root with children a (leaves correct, correct) and b (wrong, wrong), eta=0:
R(a)=1, R(b)=0, A_fork(a)=+0.7071, A_fork(b)=-0.7071 (two siblings always give +-1/sqrt(2) unless
equal); three siblings with R = 1, 0.5, 0 give A_fork = +1, 0, -1 (mean 0.5, unbiased std 0.5).

Training a shared step once (any estimator, see `mean_over_sharing_rows` and `owner_mask`): the
tokens of a step shared by k leaves sit at the same positions of k rows with identical values. The
trainer keeps them in one row (the lowest row index, `owner_mask`), gives them the mean of the k
rows' advantages there (`mean_over_sharing_rows`; for PORTool this is omega*A_fork(s) + (1-omega)*
mean_{tau in m(s)} A_traj(tau)), and drops them from the other rows, so the loss and its token counts
see every distinct token exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tirl.algorithms.advantages import (AdvantageInput, _broadcast, _group_stats, grpo_advantages,
                                        scores_from_token_rewards)
from tirl.algorithms.registry import register_advantage


TREE_ESTIMATORS = frozenset({"portool"})
"""Advantage estimators that need rollout trees (a strategy with `makes_trees`)."""


class NeedsTreeError(ValueError):
    """An estimator that needs rollout trees was given rows that are not in a tree."""


@dataclass(frozen=True)
class TreeStructure:
    """The rollout trees of a batch as tensors; N = tree nodes in the batch (roots included)."""

    node_B_T: Tensor
    """(B, T) int64: batch-wide index of the node (step) holding each token; -1 where none (padding,
    rows of flat groups)."""
    parent_N: Tensor
    """(N,) int64: index of each node's parent; -1 for roots (the prompts, which hold no tokens)."""
    tools_ok_N: Tensor
    """(N,) bool: every tool call of the step ran ok (True for a step without calls, and for roots)."""

    def __post_init__(self) -> None:
        if self.node_B_T.dim() != 2:
            raise ValueError(f"TreeStructure.node_B_T must be (B, T), got {tuple(self.node_B_T.shape)}")
        n = self.parent_N.shape[0]
        if tuple(self.parent_N.shape) != (n,) or tuple(self.tools_ok_N.shape) != (n,):
            raise ValueError(f"TreeStructure.parent_N {tuple(self.parent_N.shape)} and tools_ok_N "
                             f"{tuple(self.tools_ok_N.shape)} must both be (N,)")
        if self.node_B_T.numel() and int(self.node_B_T.max()) >= n:
            raise ValueError(f"TreeStructure.node_B_T names node {int(self.node_B_T.max())} but only {n} exist")


def membership(node_B_T: Tensor, num_nodes: int) -> Tensor:
    """(B, N) bool: row b passes through node n (holds at least one of its tokens)."""
    B, _ = node_B_T.shape
    out = torch.zeros(B, num_nodes + 1, dtype=torch.bool, device=node_B_T.device)
    rows = torch.arange(B, device=node_B_T.device).unsqueeze(1).expand_as(node_B_T)
    out[rows.reshape(-1), (node_B_T.reshape(-1) + 1)] = True  # column 0 collects the -1 ("no node") labels
    return out[:, 1:]


def step_rewards(outcome_B: Tensor, member_B_N: Tensor, tools_ok_N: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """`R(s) = mean_{tau in m(s)} R_out(tau) + eta * 1[tools ok in s]`, float32 `(N,)`, and `(N,)` bool
    marking the nodes with at least one leaf (R is 0 for the others: roots, nodes of no row)."""
    member = member_B_N.to(torch.float32)
    leaves_N = member.sum(dim=0)
    has_leaf_N = leaves_N > 0
    mean_N = (member.T @ outcome_B.to(torch.float32)) / leaves_N.clamp_min(1)
    reward_N = torch.where(has_leaf_N, mean_N + eta * tools_ok_N.to(torch.float32), torch.zeros_like(mean_N))
    return reward_N, has_leaf_N


def fork_advantages(reward_N: Tensor, parent_N: Tensor, valid_N: Tensor, eps: float = 1e-6) -> Tensor:
    """`A_fork(s) = (R(s) - mean_siblings R) / (unbiased std_siblings R + eps)`, float32 `(N,)`.

    Siblings are the `valid_N` nodes with the same parent (s included). A node with no sibling, a
    sibling set whose rewards are all equal, a root and an invalid node get exactly 0.
    """
    out_N = torch.zeros_like(reward_N, dtype=torch.float32)
    keep_N = valid_N & (parent_N >= 0)
    if not bool(keep_N.any()):
        return out_N
    centred, std, size = _group_stats(reward_N[keep_N].to(torch.float32), parent_N[keep_N])
    out_N[keep_N] = torch.where(size > 1, centred / (std + eps), torch.zeros_like(centred))
    return out_N


def portool_token_advantages(outcome_B: Tensor, group_ids_B: Tensor, mask_B_T: Tensor, tree: TreeStructure, *,
                             eta: float = 0.1, omega: float = 0.5, eps: float = 1e-6) -> Tensor:
    """`A(s, tau) = omega * A_fork(s) + (1 - omega) * A_traj(tau)` on every mask==1 token, float32 `(B, T)`.

    `outcome_B` is R_out per row (leaf), `group_ids_B` the tree of each row (A_traj is GRPO over a
    tree's leaves, `A = (R - mean) / (unbiased std + eps)`), `tree` gives each token's step. Every
    mask==1 token must belong to a step: otherwise `NeedsTreeError`.
    """
    if bool((mask_B_T.bool() & (tree.node_B_T < 0)).any()):
        raise NeedsTreeError("the 'portool' advantage estimator needs rollout trees (rollout.strategy=tree or "
                             "entropy_branch): some rows are not in a tree")
    num_nodes = tree.parent_N.shape[0]
    reward_N, has_leaf_N = step_rewards(outcome_B, membership(tree.node_B_T, num_nodes), tree.tools_ok_N, eta)
    fork_N = fork_advantages(reward_N, tree.parent_N, has_leaf_N, eps)
    fork_B_T = torch.cat([fork_N.new_zeros(1), fork_N])[tree.node_B_T + 1]  # 0 where no node
    centred_B, std_B, _ = _group_stats(outcome_B.to(torch.float32), group_ids_B)
    traj_B_T = _broadcast(centred_B / (std_B + eps), mask_B_T)
    return (omega * fork_B_T + (1.0 - omega) * traj_B_T) * mask_B_T.to(torch.float32)


@register_advantage("portool")
@torch.no_grad()
def portool_advantages(inp: AdvantageInput, *, eta: float = 0.1, omega: float = 0.5,
                       eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """PORTool (reference 4.1): omega * fork-relative step advantage + (1 - omega) * GRPO over the leaves.

    Needs `inp.tree` (rollout trees: `rollout.strategy=tree`); see `portool_token_advantages`. Returns
    `(advantages_B_T, returns_B_T)`, returns equal to the advantages. The trainer then trains each
    shared step once with the mean over its leaves.
    """
    if inp.tree is None:
        raise NeedsTreeError("the 'portool' advantage estimator needs rollout trees (rollout.strategy=tree or "
                             "entropy_branch); these groups are flat")
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"portool: omega must be in [0, 1], got {omega}")
    adv = portool_token_advantages(scores_from_token_rewards(inp.token_rewards), inp.group_ids, inp.mask,
                                   inp.tree, eta=eta, omega=omega, eps=eps)
    return adv, adv.clone()


def _sharing_keys(node_B_T: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For the positions that hold a node: `(rows, cols, key)`, key numbering the distinct
    (node, position) pairs 0..K-1 (rows sharing a step share its keys)."""
    T = node_B_T.shape[1]
    rows, cols = torch.nonzero(node_B_T >= 0, as_tuple=True)
    raw = node_B_T[rows, cols] * T + cols
    _, key = torch.unique(raw, return_inverse=True)
    return rows, cols, key


def mean_over_sharing_rows(values_B_T: Tensor, node_B_T: Tensor) -> Tensor:
    """Each tree token's value replaced by its mean over the rows that hold the same step there.

    `(B, T), (B, T) -> (B, T)` float32: for a token of step s at position t,
    `out[b, t] = mean_{b' in m(s)} values[b', t]`; positions with node -1 keep their value.
    """
    out = values_B_T.to(torch.float32).clone()
    rows, cols, key = _sharing_keys(node_B_T)
    if key.numel() == 0:
        return out
    K = int(key.max()) + 1
    sums = torch.zeros(K, dtype=torch.float32, device=out.device).index_add(0, key, out[rows, cols])
    counts = torch.zeros(K, dtype=torch.float32, device=out.device).index_add(0, key, torch.ones_like(sums[key]))
    out[rows, cols] = (sums / counts)[key]
    return out


def owner_mask(node_B_T: Tensor) -> Tensor:
    """(B, T) bool: True where this row trains the token, i.e. where it holds no tree node (flat rows,
    padding) or is the lowest-indexed row holding that step at that position; False on the copies."""
    out = torch.ones_like(node_B_T, dtype=torch.bool)
    rows, cols, key = _sharing_keys(node_B_T)
    if key.numel() == 0:
        return out
    K = int(key.max()) + 1
    first = torch.full((K,), node_B_T.shape[0], dtype=torch.long, device=node_B_T.device)
    first = first.scatter_reduce(0, key, rows, reduce="amin")
    out[rows, cols] = rows == first[key]
    return out
