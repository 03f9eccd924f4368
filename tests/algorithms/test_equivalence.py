"""Equivalence tests (style: "loop vs vectorised, and data-parallel or grad-accum splits vs the full batch").

1. Every registered advantage estimator against a plain Python loop written here from the formulas,
   on random batches: groups of sizes 1-4 in shuffled order, rows of 0-4 turns, observation holes
   in the mask, trailing padding, a row with no sampled token; random rollout trees for `portool`.
2. Every policy loss: micro-batches (trimmed to their own length, as a collator does) with the
   mini-batch's global normalisers sum to the full-batch loss, value and gradient, in all four
   aggregation modes; and a two-way data-parallel split (each rank's loss scaled by the world size,
   gradients averaged, as DDP) equals the full batch. AEPO's entropy z-score and Clip-Cov's token
   draw are defined over the batch a loss sees, so they are switched off here (`entropy_weight=0`,
   an empty covariance band); their own tests are in test_policy_losses.py.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.testing import assert_close

from tirl.algorithms import (AGG_MODES, ADVANTAGES, POLICY_LOSSES, AdvantageInput, PolicyLossInput, TreeStructure,
                             loss_normalisers, outcome_token_rewards)

EPS = 1e-6
NAN = float("nan")

# ============================================================================ random batches


def group_ids_for(B: int, rng: random.Random) -> list[int]:
    """Groups of sizes 1, 2, 3, 4, 1, 2, ... with non-contiguous ids, shuffled over the rows."""
    ids, gid = [], 0
    while len(ids) < B:
        ids += [10 * gid + 3] * (gid % 4 + 1)
        gid += 1
    ids = ids[:B]
    rng.shuffle(ids)
    return ids


def random_turn_batch(seed: int, B: int = 14) -> AdvantageInput:
    """Rows of 0-4 turns: each samples 1-3 tokens (mask 1, its turn id) and is followed by 0-2
    observation tokens (mask 0, turn id -1); the turn reward sits on its last sampled token. Row 5
    samples nothing; row 7 has no token of turn index 1."""
    rng = random.Random(seed)
    rows = []
    for b in range(B):
        n_turns = 0 if b == 5 else 3 if b == 7 else rng.randint(1, 4)
        row = []  # (mask, turn id, reward) per position
        for k in range(n_turns):
            k += 1 if b == 7 and k > 0 else 0  # row 7 skips turn index 1 (a turn that sampled nothing)
            gen = rng.randint(1, 3)
            reward = round(rng.uniform(-1.0, 2.0), 3)
            row += [(1.0, k, 0.0)] * (gen - 1) + [(1.0, k, reward)]
            row += [(0.0, -1, 0.0)] * rng.randint(0, 2)
        rows.append(row)
    T = max(len(r) for r in rows) + 1
    mask, turn_ids, rewards = (torch.zeros(B, T), torch.full((B, T), -1, dtype=torch.long), torch.zeros(B, T))
    for b, row in enumerate(rows):
        for t, (m, k, r) in enumerate(row):
            mask[b, t], turn_ids[b, t], rewards[b, t] = m, k, r
    correct = [rng.choice([0.0, 1.0, 1.0, NAN]) for _ in range(B)]
    correct[0] = 1.0
    calls = [float(rng.randint(0, 4)) for _ in range(B)]
    gen = torch.Generator().manual_seed(seed)
    return AdvantageInput(rewards, mask, torch.tensor(group_ids_for(B, rng)), values=torch.randn(B, T, generator=gen),
                          turn_ids=turn_ids, correct=torch.tensor(correct), tool_calls=torch.tensor(calls))


# ============================================================================ loop references


def rows_of(inp: AdvantageInput):
    return inp.token_rewards.tolist(), inp.mask.tolist(), inp.group_ids.tolist()


def zscores(values: list[float]) -> list[float]:
    """GRPO statistics: a pool of one keeps its value (mean 0, std 1); equal values give 0."""
    n = len(values)
    if n == 1:
        return [values[0] / (1.0 + EPS)]
    if all(v == values[0] for v in values):
        return [0.0] * n
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return [(v - mean) / (std + EPS) for v in values]


def pooled_zscores(values: dict, key_of) -> dict:
    """z-score the values of a dict {item: value} within pools of equal key_of(item)."""
    pools: dict = {}
    for item in values:
        pools.setdefault(key_of(item), []).append(item)
    out = {}
    for items in pools.values():
        for item, z in zip(items, zscores([values[i] for i in items])):
            out[item] = z
    return out


def whiten(x: list[list[float]], m: list[list[float]]) -> list[list[float]]:
    picked = [v for row, mrow in zip(x, m) for v, k in zip(row, mrow) if k]
    mean = sum(picked) / len(picked)
    var = sum((v - mean) ** 2 for v in picked) / (len(picked) - 1)
    return [[(v - mean) / math.sqrt(var + 1e-8) * k for v, k in zip(row, mrow)] for row, mrow in zip(x, m)]


def broadcast(per_row: list[float], mask) -> list[list[float]]:
    return [[a * k for k in mrow] for a, mrow in zip(per_row, mask)]


def loop_outcome(inp: AdvantageInput, kind: str) -> list[list[float]]:
    rewards, mask, ids = rows_of(inp)
    scores = [sum(row) for row in rewards]
    out = loop_grpo_rows(scores, ids) if kind == "grpo" else []
    for i, score in enumerate(scores if kind != "grpo" else []):
        group = [scores[j] for j in range(len(scores)) if ids[j] == ids[i]]
        others = [scores[j] for j in range(len(scores)) if ids[j] == ids[i] and j != i]
        if kind == "rloo":
            out.append(score - sum(others) / len(others) if others else score)
        else:  # drgrpo, reinforce_pp_baseline
            out.append(score - (sum(group) / len(group) if len(group) > 1 else 0.0))
    adv = broadcast(out, mask)
    return whiten(adv, mask) if kind == "reinforce_pp_baseline" else adv


def loop_grpo_rows(scores: list[float], ids: list[int]) -> list[float]:
    return [pooled_zscores(dict(enumerate(scores)), lambda i: ids[i])[i] for i in range(len(scores))]


def loop_reinforce_pp(inp: AdvantageInput, gamma: float) -> list[list[float]]:
    rewards, mask, _ = rows_of(inp)
    returns = []
    for row, mrow in zip(rewards, mask):
        g, out = 0.0, [0.0] * len(row)
        for t in reversed(range(len(row))):
            g = row[t] + (gamma if mrow[t] else 1.0) * g
            out[t] = g
        returns.append(out)
    return whiten(returns, mask)


def loop_gae(inp: AdvantageInput, gamma: float, lam: float, whitened: bool) -> list[list[float]]:
    rewards, mask, _ = rows_of(inp)
    raw = []
    for r, m, v in zip(rewards, mask, inp.values.tolist()):
        next_v, last, out = 0.0, 0.0, [0.0] * len(r)
        for t in reversed(range(len(r))):
            if m[t]:
                last = r[t] + gamma * next_v - v[t] + gamma * lam * last
                next_v = v[t]
            out[t] = last
        raw.append(out)
    return whiten(raw, mask) if whitened else [[a * k for a, k in zip(ra, m)] for ra, m in zip(raw, mask)]


def loop_turns(inp: AdvantageInput) -> list[dict[int, float]]:
    """Per row: {turn index: summed reward} over the turns that sampled a token, in order."""
    out = []
    for rrow, mrow, krow in zip(inp.token_rewards.tolist(), inp.mask.tolist(), inp.turn_ids.tolist()):
        turns: dict[int, float] = {}
        for r, m, k in zip(rrow, mrow, krow):
            if m:
                turns[k] = turns.get(k, 0.0) + r
        out.append(turns)
    return out


def discounted(turns: dict[int, float], gamma: float) -> dict[int, float]:
    out, running = {}, 0.0
    for k in sorted(turns, reverse=True):
        running = turns[k] + gamma * running
        out[k] = running
    return out


def spread(per_turn: list[dict[int, float]], inp: AdvantageInput) -> list[list[float]]:
    return [[per_turn[b][k] if m else 0.0 for m, k in zip(mrow, krow)]
            for b, (mrow, krow) in enumerate(zip(inp.mask.tolist(), inp.turn_ids.tolist()))]


def loop_igpo(inp: AdvantageInput, gamma: float, separate: bool) -> list[list[float]]:
    turns, ids = loop_turns(inp), inp.group_ids.tolist()
    flat = {(b, k): r for b, row in enumerate(turns) for k, r in row.items()}
    last = {b: max(row) for b, row in enumerate(turns) if row}
    z = pooled_zscores(flat, lambda item: (ids[item[0]], separate and item[1] == last[item[0]]))
    per_turn = [discounted({k: z[(b, k)] for k in row}, gamma) for b, row in enumerate(turns)]
    return spread(per_turn, inp)


def loop_matchtir(inp: AdvantageInput, gamma: float) -> list[list[float]]:
    turns, ids = loop_turns(inp), inp.group_ids.tolist()
    traj = loop_grpo_rows([sum(row.values()) for row in turns], ids)
    returns = {(b, k): d for b, row in enumerate(turns) for k, d in discounted(row, gamma).items()}
    z = pooled_zscores(returns, lambda item: (ids[item[0]], item[1]))
    per_turn = [{k: (traj[b] + z[(b, k)]) / 2 for k in row} for b, row in enumerate(turns)]
    return spread(per_turn, inp)


def loop_mt_grpo(inp: AdvantageInput, gamma: float, weight: float) -> list[list[float]]:
    turns, ids = loop_turns(inp), inp.group_ids.tolist()
    outcome = loop_grpo_rows([row[max(row)] if row else 0.0 for row in turns], ids)
    earlier = {}
    for b, row in enumerate(turns):
        if row:
            earlier.update({(b, k): g for k, g in discounted({k: r for k, r in row.items() if k < max(row)},
                                                               gamma).items()})
    z = pooled_zscores(earlier, lambda item: (ids[item[0]], item[1]))
    per_turn = [{k: z[(b, k)] + weight * outcome[b] if (b, k) in z else outcome[b] for k in row}
                for b, row in enumerate(turns)]
    return spread(per_turn, inp)


def loop_hdpo(inp: AdvantageInput, weight: float) -> list[list[float]]:
    rewards, mask, ids = rows_of(inp)
    acc = loop_grpo_rows([sum(r) for r in rewards], ids)
    correct = [c == 1.0 for c in inp.correct.tolist()]
    calls = {b: -c for b, c in enumerate(inp.tool_calls.tolist()) if correct[b]}
    pools = {}
    for b in calls:
        pools.setdefault(ids[b], []).append(b)
    eff = [0.0] * len(acc)
    for members in pools.values():
        if len(members) > 1:
            for b, z in zip(members, zscores([calls[m] for m in members])):
                eff[b] = z
    return broadcast([a + weight * e for a, e in zip(acc, eff)], mask)


# ============================================================================ estimators vs loops


ESTIMATOR_CASES = [
    ("grpo", {}, lambda inp: loop_outcome(inp, "grpo")),
    ("drgrpo", {}, lambda inp: loop_outcome(inp, "drgrpo")),
    ("rloo", {}, lambda inp: loop_outcome(inp, "rloo")),
    ("reinforce_pp_baseline", {}, lambda inp: loop_outcome(inp, "reinforce_pp_baseline")),
    ("reinforce_pp", {"gamma": 0.9}, lambda inp: loop_reinforce_pp(inp, 0.9)),
    ("gae", {"gamma": 0.95, "lam": 0.8, "whiten": False}, lambda inp: loop_gae(inp, 0.95, 0.8, False)),
    ("gae", {"gamma": 1.0, "lam": 1.0, "whiten": True}, lambda inp: loop_gae(inp, 1.0, 1.0, True)),
    ("igpo", {}, lambda inp: loop_igpo(inp, 1.0, False)),
    ("igpo", {"gamma": 0.7, "separate": True}, lambda inp: loop_igpo(inp, 0.7, True)),
    ("matchtir", {}, lambda inp: loop_matchtir(inp, 0.9)),
    ("matchtir", {"gamma": 1.0}, lambda inp: loop_matchtir(inp, 1.0)),
    ("mt_grpo", {}, lambda inp: loop_mt_grpo(inp, 1.0, 1.0)),
    ("mt_grpo", {"gamma": 0.5, "outcome_weight": 0.3}, lambda inp: loop_mt_grpo(inp, 0.5, 0.3)),
    ("hdpo", {}, lambda inp: loop_hdpo(inp, 0.5)),
    ("hdpo", {"weight": 2.0}, lambda inp: loop_hdpo(inp, 2.0)),
]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("name", "params", "reference"), ESTIMATOR_CASES)
def test_estimator_matches_loop_reference(name, params, reference, seed):
    inp = random_turn_batch(seed)
    adv, returns = ADVANTAGES.get(name)(inp, **params)
    expected = torch.tensor(reference(inp))
    assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    assert adv.dtype == returns.dtype == torch.float32
    assert (adv[inp.mask == 0] == 0).all() and (adv[inp.mask == 1] != 0).any()


def test_every_estimator_has_a_loop_reference():
    assert {name for name, _, _ in ESTIMATOR_CASES} | {"portool"} == set(ADVANTAGES)


# ----------------------------------------------------------------------------- portool on random trees


def random_tree_batch(seed: int, trees: int = 4) -> tuple[AdvantageInput, list[list[int]], list[int], list[bool]]:
    """Random rollout trees (depth <= 3, 1-3 children per node). Each node's step has its own number of
    sampled (1-2) and observation (0-1) tokens; a leaf row holds the steps of its path, laid out in the
    same positions as every row sharing them. Returns the input, each row's path, parents, tools_ok."""
    rng = random.Random(seed)
    parent: list[int] = []
    tools_ok: list[bool] = []
    spans: list[tuple[int, int]] = []
    paths: list[list[int]] = []
    group_ids: list[int] = []

    def node(up: int) -> int:
        parent.append(up)
        tools_ok.append(up < 0 or rng.random() > 0.3)
        spans.append((rng.randint(1, 2), rng.randint(0, 1)))
        return len(parent) - 1

    def grow(at: int, path: list[int], depth: int, tree: int) -> None:
        kids = rng.randint(1, 3) if depth == 0 or (depth < 3 and rng.random() < 0.5) else 0
        if kids == 0:
            paths.append(path)
            group_ids.append(tree)
        for _ in range(kids):
            child = node(at)
            grow(child, [*path, child], depth + 1, tree)

    for tree in range(trees):
        grow(node(-1), [], 0, tree)
    T = max(sum(sum(spans[n]) for n in path) for path in paths)
    B = len(paths)
    node_B_T = torch.full((B, T), -1, dtype=torch.long)
    mask = torch.zeros(B, T)
    for b, path in enumerate(paths):
        t = 0
        for n in path:
            gen, obs = spans[n]
            node_B_T[b, t:t + gen + obs] = n
            mask[b, t:t + gen] = 1.0
            t += gen + obs
    outcome = torch.tensor([round(rng.uniform(0.0, 1.0), 3) for _ in range(B)])
    tree = TreeStructure(node_B_T, torch.tensor(parent), torch.tensor(tools_ok))
    inp = AdvantageInput(outcome_token_rewards(outcome, mask), mask, torch.tensor(group_ids), tree=tree)
    return inp, paths, parent, tools_ok


def loop_portool(inp, paths, parent, tools_ok, eta: float, omega: float) -> list[list[float]]:
    outcome = [sum(r) for r in inp.token_rewards.tolist()]
    ids = inp.group_ids.tolist()
    through = {n: [b for b, p in enumerate(paths) if n in p] for n in range(len(parent))}
    reward = {n: sum(outcome[b] for b in rows) / len(rows) + eta * tools_ok[n] for n, rows in through.items() if rows}
    fork = {}
    for n in reward:
        siblings = [s for s in reward if parent[s] == parent[n]]
        values = [reward[s] for s in siblings]
        fork[n] = 0.0 if len(siblings) == 1 else zscores(values)[siblings.index(n)]
    traj = loop_grpo_rows(outcome, ids)
    node_rows = inp.tree.node_B_T.tolist()
    return [[omega * fork[n] + (1 - omega) * traj[b] if m else 0.0 for n, m in zip(node_rows[b], mrow)]
            for b, mrow in enumerate(inp.mask.tolist())]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("eta", "omega"), [(0.1, 0.5), (0.0, 1.0), (0.3, 0.2)])
def test_portool_matches_loop_reference_on_random_trees(seed, eta, omega):
    inp, paths, parent, tools_ok = random_tree_batch(seed)
    assert len(set(inp.group_ids.tolist())) == 4 and len(paths) > 4
    adv, _ = ADVANTAGES.get("portool")(inp, eta=eta, omega=omega)
    assert_close(adv, torch.tensor(loop_portool(inp, paths, parent, tools_ok, eta, omega)), atol=1e-5, rtol=1e-5)


# ============================================================================ policy losses: splits


LOSS_CASES = [
    ("ppo_clip", {"clip_low": 0.2, "clip_high": 0.28}),
    ("gspo", {"clip_low": 0.05, "clip_high": 0.05}),
    ("cispo", {"clip_low": 0.2, "clip_high": 0.1}),
    ("aepo", {"clip_high": 0.1, "entropy_weight": 0.0}),
    ("clip_cov", {"clip_cov_lb": 1e9, "clip_cov_ub": 2e9}),
]


def random_policy_batch(seed: int, B: int = 8, T: int = 10):
    """Rows of different lengths with holes, one fully masked row; `theta` stands for the model: every
    row's log-probs are its rows of theta (so gradients can be compared on one tensor)."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=gen) > 0.3).float()
    lengths = torch.tensor([10, 3, 7, 1, 10, 5, 2, 6])[:B]
    mask *= (torch.arange(T)[None, :] < lengths[:, None]).float()
    mask[:, 0] = 1.0
    mask[2] = 0.0
    theta = -torch.rand(B, T, generator=gen) * 2
    old = theta + 0.3 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen)
    entropy = torch.rand(B, T, generator=gen) * 3
    return theta, old, adv, mask, entropy


def rows_loss(name, params, theta, batch, rows, mode, **normalisers):
    """Loss of `rows` (trimmed to their own padded length, as a collator would), as a function of theta."""
    _, old, adv, mask, entropy = batch
    sub_mask = mask[rows]
    used = sub_mask.sum(dim=0).nonzero()
    T_sub = int(used.max().item()) + 1 if used.numel() else 1
    inp = PolicyLossInput(theta[rows, :T_sub], old[rows, :T_sub], adv[rows, :T_sub], sub_mask[:, :T_sub],
                          agg_mode=mode, entropy=entropy[rows, :T_sub], **normalisers)
    return POLICY_LOSSES.get(name)(inp, **params)[0]


def full_loss_and_grad(name, params, batch, mode):
    theta = batch[0].clone().requires_grad_()
    _, old, adv, mask, entropy = batch
    loss = POLICY_LOSSES.get(name)(PolicyLossInput(theta, old, adv, mask, agg_mode=mode, entropy=entropy), **params)[0]
    (grad,) = torch.autograd.grad(loss, theta)
    assert grad.abs().sum() > 0
    return loss.detach(), grad


def global_normalisers(mask: torch.Tensor) -> dict:
    num_tokens, num_seqs = loss_normalisers(mask)
    return {"num_tokens": num_tokens, "num_seqs": num_seqs, "norm_constant": float(mask.shape[1])}


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize(("name", "params"), LOSS_CASES)
def test_micro_batches_with_global_normalisers_sum_to_the_full_batch(name, params, mode):
    batch = random_policy_batch(seed=1)
    full, full_grad = full_loss_and_grad(name, params, batch, mode)
    theta = batch[0].clone().requires_grad_()
    norms = global_normalisers(batch[3])
    total = sum(rows_loss(name, params, theta, batch, rows, mode, **norms)
                for rows in (slice(0, 3), slice(3, 4), slice(4, 8)))
    (grad,) = torch.autograd.grad(total, theta)
    assert_close(total.detach(), full)
    assert_close(grad, full_grad)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize(("name", "params"), LOSS_CASES)
def test_local_normalisers_do_not_match_full_batch(name, params, mode):
    """The control for the test above: without global normalisers the sum is a different loss."""
    batch = random_policy_batch(seed=1)
    full, _ = full_loss_and_grad(name, params, batch, mode)
    theta = batch[0].clone().requires_grad_()
    total = sum(rows_loss(name, params, theta, batch, rows, mode) for rows in (slice(0, 3), slice(3, 4), slice(4, 8)))
    assert not torch.allclose(total.detach(), full)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize(("name", "params"), LOSS_CASES)
def test_data_parallel_split_equals_full_batch(name, params, mode):
    """Two ranks hold rows 0-3 and 4-7 and their own copy of theta; each counts its tokens and sequences
    and an all-reduce (a sum) makes the counts global; each rank's loss is scaled by the world size, and
    DDP averages the gradients over ranks."""
    batch = random_policy_batch(seed=2)
    full, full_grad = full_loss_and_grad(name, params, batch, mode)
    shards = (slice(0, 4), slice(4, 8))
    counts = [loss_normalisers(batch[3][rows]) for rows in shards]
    norms = {"num_tokens": counts[0][0] + counts[1][0], "num_seqs": counts[0][1] + counts[1][1],
             "norm_constant": float(batch[3].shape[1])}
    world = len(shards)
    losses, grads = [], []
    for rows in shards:
        theta = batch[0].clone().requires_grad_()
        loss = world * rows_loss(name, params, theta, batch, rows, mode, **norms)
        (grad,) = torch.autograd.grad(loss, theta)
        losses.append(loss.detach())
        grads.append(grad)
    assert_close(sum(losses) / world, full)
    assert_close(sum(grads) / world, full_grad)
