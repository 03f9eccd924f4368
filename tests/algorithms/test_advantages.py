"""Advantage estimators: hand-computed values (reference sections 1.3, 2.4), masking, and the registry
contract. Loop-vs-vectorised equivalence of every estimator: test_equivalence.py."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.testing import assert_close

from tirl.algorithms import (
    ADVANTAGES,
    POLICY_LOSSES,
    AdvantageInput,
    outcome_token_rewards,
    register_advantage,
    register_policy_loss,
    scores_from_token_rewards,
)
from tirl.registry import RegistryError

EXPECTED_ESTIMATORS = {"grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"}
TREE_ESTIMATORS = {"portool"}
"""Estimators that need rollout trees (tested in test_tree_advantage.py)."""
TURN_ESTIMATORS = {"igpo", "matchtir", "mt_grpo", "hdpo"}
"""Estimators that need turn ids or correctness and tool-call counts (tested in test_turns.py)."""


def outcome_input(rewards: list[float], group_ids: list[int], T: int = 3) -> AdvantageInput:
    mask_B_T = torch.ones(len(rewards), T)
    return AdvantageInput(
        token_rewards=outcome_token_rewards(torch.tensor(rewards), mask_B_T),
        mask=mask_B_T,
        group_ids=torch.tensor(group_ids),
    )


def row_values(adv_B_T: torch.Tensor) -> torch.Tensor:
    """The one value broadcast over each row (checks that it really is one value)."""
    assert_close(adv_B_T, adv_B_T[:, :1].expand_as(adv_B_T))
    return adv_B_T[:, 0]


# ----------------------------------------------------------------------------- hand values


def test_grpo_uses_unbiased_std():
    adv, returns = ADVANTAGES.get("grpo")(outcome_input([1, 0, 0, 1], [0, 0, 0, 0]))
    assert adv.dtype == torch.float32
    assert_close(row_values(adv), torch.tensor([0.86602, -0.86602, -0.86602, 0.86602]), atol=1e-5, rtol=0)
    assert_close(returns, adv)


def test_drgrpo_subtracts_group_mean_only():
    adv, _ = ADVANTAGES.get("drgrpo")(outcome_input([1, 0, 0, 1], [7, 7, 7, 7]))
    assert_close(row_values(adv), torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_rloo_leave_one_out_baseline():
    adv, returns = ADVANTAGES.get("rloo")(outcome_input([1, 0, 0, 1], [0, 0, 0, 0]))
    assert_close(row_values(adv), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert_close(returns, adv)


def test_reinforce_pp_whitens_discounted_returns_over_batch():
    inp = AdvantageInput(
        token_rewards=torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),
        mask=torch.ones(2, 3),
        group_ids=torch.tensor([0, 1]),  # groups must not matter for REINFORCE++
    )
    adv, returns = ADVANTAGES.get("reinforce_pp")(inp)
    assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert_close(adv, torch.tensor([[0.91287] * 3, [-0.91287] * 3]), atol=1e-5, rtol=0)


def test_reinforce_pp_discounts_policy_tokens_and_carries_over_observations():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    plain = AdvantageInput(rewards, torch.ones(1, 3), torch.tensor([0]))
    _, returns = ADVANTAGES.get("reinforce_pp")(plain, gamma=0.5)
    assert_close(returns, torch.tensor([[0.25, 0.5, 1.0]]))
    with_obs = AdvantageInput(rewards, torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([0]))
    _, returns = ADVANTAGES.get("reinforce_pp")(with_obs, gamma=0.5)
    assert_close(returns, torch.tensor([[0.5, 0.0, 1.0]]))  # the observation token is not a discount step


def test_reinforce_pp_baseline_centres_per_group_then_whitens_over_batch():
    adv, returns = ADVANTAGES.get("reinforce_pp_baseline")(outcome_input([1, 0, 0, 1], [0, 0, 0, 0]))
    # centred scores +-0.5 on 12 tokens: mean 0, unbiased variance 0.25 * 12 / 11
    expected = 0.5 / math.sqrt(0.25 * 12 / 11 + 1e-8)
    assert_close(row_values(adv), torch.tensor([expected, -expected, -expected, expected]))
    assert_close(returns, adv)


def test_gae_hand_values_unmasked():
    inp = AdvantageInput(
        token_rewards=torch.tensor([[0.0, 0.0, 1.0]]),
        mask=torch.ones(1, 3),
        group_ids=torch.tensor([0]),
        values=torch.tensor([[0.2, 0.9, 0.5]]),
    )
    adv, returns = ADVANTAGES.get("gae")(inp, gamma=1.0, lam=0.5, whiten=False)
    assert_close(adv, torch.tensor([[0.625, -0.15, 0.5]]))
    assert_close(returns, torch.tensor([[0.825, 0.75, 1.0]]))


def test_gae_skips_observation_tokens():
    inp = AdvantageInput(
        token_rewards=torch.tensor([[0.0, 0.0, 1.0]]),
        mask=torch.tensor([[1.0, 0.0, 1.0]]),
        group_ids=torch.tensor([0]),
        values=torch.tensor([[0.2, 0.9, 0.5]]),
    )
    adv, returns = ADVANTAGES.get("gae")(inp, gamma=1.0, lam=0.5, whiten=False)
    assert_close(adv, torch.tensor([[0.55, 0.0, 0.5]]))
    assert_close(returns, torch.tensor([[0.75, 0.0, 1.0]]))


def test_gae_whitening_is_masked_whiten_of_raw_advantages():
    inp = AdvantageInput(
        token_rewards=torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        mask=torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
        group_ids=torch.tensor([0, 0]),
        values=torch.tensor([[0.2, 0.9, 0.5], [0.1, 0.4, 0.3]]),
    )
    raw, _ = ADVANTAGES.get("gae")(inp, gamma=1.0, lam=0.5, whiten=False)
    whitened, _ = ADVANTAGES.get("gae")(inp, gamma=1.0, lam=0.5)
    selected = raw[inp.mask.bool()]
    expected = (selected - selected.mean()) / torch.sqrt(selected.var(unbiased=True) + 1e-8)
    assert_close(whitened[inp.mask.bool()], expected)
    assert (whitened[~inp.mask.bool()] == 0).all()


def test_gae_without_values_raises():
    with pytest.raises(ValueError, match="values"):
        ADVANTAGES.get("gae")(outcome_input([1, 0], [0, 0]))


# ----------------------------------------------------------------------------- groups


def test_group_of_size_one_has_mean_zero_and_std_one():
    inp = outcome_input([0.7, 1.0, 0.0], [5, 9, 9])
    grpo, _ = ADVANTAGES.get("grpo")(inp)
    assert_close(row_values(grpo)[0], torch.tensor(0.7 / (1 + 1e-6)))
    drgrpo, _ = ADVANTAGES.get("drgrpo")(inp)
    assert_close(row_values(drgrpo)[0], torch.tensor(0.7))
    rloo, _ = ADVANTAGES.get("rloo")(inp)
    assert_close(row_values(rloo)[0], torch.tensor(0.7))
    # the other group is unaffected by the singleton
    assert_close(row_values(grpo)[1:], torch.tensor([1.0, -1.0]) / (math.sqrt(0.5) + 1e-6) * 0.5)


def test_groups_in_one_batch_are_normalised_separately():
    rewards = [1.0, 0.0, 2.0, 4.0, 9.0]
    ids = [3, 3, 1, 1, 1]
    adv, _ = ADVANTAGES.get("grpo")(outcome_input(rewards, ids))
    g0, g1 = torch.tensor(rewards[:2]), torch.tensor(rewards[2:])
    expected = torch.cat([(g0 - g0.mean()) / (g0.std() + 1e-6), (g1 - g1.mean()) / (g1.std() + 1e-6)])
    assert_close(row_values(adv), expected)
    # changing one group's rewards leaves the other group's advantages alone
    adv2, _ = ADVANTAGES.get("grpo")(outcome_input([1.0, 0.0, -5.0, 0.5, 0.0], ids))
    assert_close(adv2[:2], adv[:2])


def test_interleaved_group_ids_are_grouped_by_value_not_position():
    adv, _ = ADVANTAGES.get("drgrpo")(outcome_input([1.0, 10.0, 0.0, 20.0], [0, 1, 0, 1]))
    assert_close(row_values(adv), torch.tensor([0.5, -5.0, -0.5, 5.0]))


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_constant_group_gets_exactly_zero_advantage(name):
    # the float32 mean of eight 0.1s is not exactly 0.1; divided by std 0 + eps that would be ~0.01
    adv, _ = ADVANTAGES.get(name)(outcome_input([0.1] * 8 + [0.7, 0.3], [0] * 8 + [1, 1]))
    assert torch.equal(adv[:8], torch.zeros(8, 3))
    assert (adv[8:, 0].abs() > 0.1).all()


# ----------------------------------------------------------------------------- masking and shapes


def random_batch(seed: int, B: int = 13, T: int = 9, with_values: bool = True) -> AdvantageInput:
    """Random rows with prompt-free responses: policy turns, observation gaps, trailing padding,
    one fully masked row, groups of sizes 1..4 in shuffled order, and a few stray token rewards."""
    gen = torch.Generator().manual_seed(seed)
    mask_B_T = (torch.rand(B, T, generator=gen) > 0.25).float()
    lengths_B = torch.randint(1, T + 1, (B,), generator=gen)
    mask_B_T *= (torch.arange(T)[None, :] < lengths_B[:, None]).float()
    mask_B_T[:, 0] = 1.0
    mask_B_T[B - 1] = 0.0
    rewards_B = torch.randint(0, 3, (B,), generator=gen).float() + 0.25 * torch.randn(B, generator=gen)
    token_rewards_B_T = outcome_token_rewards(rewards_B, mask_B_T)
    stray_B_T = (torch.rand(B, T, generator=gen) > 0.85).float() * torch.randn(B, T, generator=gen)
    ids = []
    gid = 0
    while len(ids) < B:
        ids += [gid] * (gid % 4 + 1)
        gid += 1
    ids = ids[:B]
    random.Random(seed).shuffle(ids)
    values_B_T = torch.randn(B, T, generator=gen) if with_values else None
    return AdvantageInput(token_rewards_B_T + stray_B_T, mask_B_T, torch.tensor(ids), values_B_T)


@pytest.mark.parametrize("name", sorted(EXPECTED_ESTIMATORS))
def test_outputs_are_float32_and_zero_on_masked_tokens(name):
    inp = random_batch(seed=3)
    inp = AdvantageInput(inp.token_rewards.double(), inp.mask.bool(), inp.group_ids, inp.values)
    adv, returns = ADVANTAGES.get(name)(inp)
    assert adv.shape == returns.shape == inp.mask.shape
    assert adv.dtype == returns.dtype == torch.float32
    off = ~inp.mask.bool()
    assert (adv[off] == 0).all() and (returns[off] == 0).all()
    assert (adv[inp.mask.bool()] != 0).any()
    assert torch.isfinite(adv).all()


def test_outcome_token_rewards_places_reward_on_last_policy_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = outcome_token_rewards(torch.tensor([2.0, 3.0, 4.0, 5.0]), mask)
    expected = torch.tensor([[0, 2.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 0], [0, 0, 0, 5.0]])
    assert torch.equal(out, expected)
    assert_close(scores_from_token_rewards(out), torch.tensor([2.0, 3.0, 0.0, 5.0]))


def test_estimator_parameters_are_checked():
    inp = outcome_input([1, 0], [0, 0])
    with pytest.raises(TypeError):
        ADVANTAGES.get("grpo")(inp, epsilon=0.1)  # misspelt parameter must not be ignored
    with pytest.raises(ValueError, match="group_ids"):
        AdvantageInput(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        AdvantageInput(torch.zeros(2, 3), torch.ones(2, 4), torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- registry


def test_registered_names():
    assert set(ADVANTAGES) == EXPECTED_ESTIMATORS | TREE_ESTIMATORS | TURN_ESTIMATORS
    assert {"ppo_clip", "gspo", "cispo", "aepo", "clip_cov"} <= set(POLICY_LOSSES)
    assert all(len(doc) > 30 for doc in ADVANTAGES.describe().values())


def test_duplicate_name_raises():
    with pytest.raises(RegistryError, match="already registered"):
        register_advantage("grpo")(lambda inp: (inp.mask, inp.mask))
    with pytest.raises(RegistryError, match="already registered"):
        register_policy_loss("ppo_clip")(lambda inp: (inp.logprobs.sum(), {}))
    assert set(ADVANTAGES) == EXPECTED_ESTIMATORS | TREE_ESTIMATORS | TURN_ESTIMATORS


def test_unknown_name_lists_valid_names():
    with pytest.raises(RegistryError) as info:
        ADVANTAGES.get("grpo_typo")
    for name in EXPECTED_ESTIMATORS:
        assert name in str(info.value)
    with pytest.raises(RegistryError, match="ppo_clip"):
        POLICY_LOSSES.get("ppo")
