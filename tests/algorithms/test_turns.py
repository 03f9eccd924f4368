"""Turn-level estimators (IGPO 4.4, MatchTIR 4.6, MT-GRPO) and HDPO (3.8): hand-computed values.

Layout of the test rows: each turn samples two tokens and is followed by one observation token
(mask 0, turn id -1); a turn's reward sits on its last sampled token, as the trainer places it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tirl.algorithms import ADVANTAGES, AdvantageInput, information_gain_rewards, outcome_token_rewards, turn_table

S = 1 / math.sqrt(2)


def turn_input(turn_rewards: list[list[float]], group_ids: list[int] | None = None, **extra) -> AdvantageInput:
    """Rows of turns (two sampled tokens + one observation each), right-padded to a common width."""
    T = 3 * max(len(r) for r in turn_rewards)
    B = len(turn_rewards)
    mask = torch.zeros(B, T)
    turn_ids = torch.full((B, T), -1, dtype=torch.long)
    rewards = torch.zeros(B, T)
    for b, row in enumerate(turn_rewards):
        for k, r in enumerate(row):
            mask[b, 3 * k:3 * k + 2] = 1.0
            turn_ids[b, 3 * k:3 * k + 2] = k
            rewards[b, 3 * k + 1] = r
    ids = torch.zeros(B, dtype=torch.long) if group_ids is None else torch.tensor(group_ids)
    return AdvantageInput(rewards, mask, ids, turn_ids=turn_ids, **extra)


def per_turn(adv_B_T: torch.Tensor, inp: AdvantageInput) -> list[list[float]]:
    """The one value of each turn (checking that both of its tokens hold it and the rest is 0)."""
    out = []
    for b in range(adv_B_T.shape[0]):
        row = []
        for k in range(int(inp.turn_ids[b].max()) + 1):
            values = adv_B_T[b][inp.turn_ids[b] == k]
            assert_close(values, values[:1].expand_as(values))
            row.append(float(values[0]))
        out.append(row)
        assert (adv_B_T[b][inp.mask[b] == 0] == 0).all()
    return out


def assert_turns(actual: list[list[float]], expected: list[list[float]]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(torch.tensor(a), torch.tensor(e), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- IGPO


def test_information_gain_turn_rewards_reference_value():
    """4.4: p = [0.1, 0.3, 0.25], final F1 = 1 -> [0.2, -0.05, 1.0]; log space: [ln 3, ln(0.25/0.3), 1]."""
    assert_close(torch.tensor(information_gain_rewards([0.1, 0.3, 0.25], 1.0)), torch.tensor([0.2, -0.05, 1.0]))
    logs = information_gain_rewards([0.1, 0.3, 0.25], 1.0, log_space=True)
    assert_close(torch.tensor(logs), torch.tensor([math.log(3.0), math.log(0.25 / 0.3), 1.0]))
    assert information_gain_rewards([0.4], 0.5) == [0.5]
    for bad in ([], [0.0, 0.5], [0.5, 1.2]):
        with pytest.raises(ValueError, match="information_gain_rewards"):
            information_gain_rewards(bad, 1.0)


def test_igpo_pipeline_on_the_reference_turn_rewards():
    """One row with turn rewards [0.2, -0.05, 1.0]: mean 0.38333, unbiased std 0.54848, so
    z = [-0.33425, -0.79006, 1.12431]. gamma = 1: A_k = sum_{k'>=k} z = [0.0, 0.33425, 1.12431]
    (z sums to 0). gamma = 0.5: A_2 = 1.12431, A_1 = -0.79006 + 0.56216 = -0.22790,
    A_0 = -0.33425 - 0.11395 = -0.44821."""
    p_gold, f1 = [0.1, 0.3, 0.25], 1.0
    inp = turn_input([information_gain_rewards(p_gold, f1)])
    adv, returns = ADVANTAGES.get("igpo")(inp)
    assert_turns(per_turn(adv, inp), [[0.0, 0.33425, 1.12431]])
    assert_close(returns, adv)
    adv, _ = ADVANTAGES.get("igpo")(inp, gamma=0.5)
    assert_turns(per_turn(adv, inp), [[-0.44821, -0.22790, 1.12431]])


def test_igpo_joint_and_separate_pools():
    """Group: row a [0.2, -0.05, 1.0], row b [0.1, 0.0].
    Joint pool of all five: mean 0.25, unbiased std 0.43012, z_a = [-0.11625, -0.69748, 1.74371],
    z_b = [-0.34874, -0.58124]; gamma 1 sums: a [0.92998, 1.04623, 1.74371], b [-0.92998, -0.58124].
    Separate: information gains [0.2, -0.05, 0.1] (mean 0.08333, std 0.12583) -> [0.92717, -1.05962,
    0.13245]; outcomes [1.0, 0.0] -> +-0.70711; a [0.57465, -0.35251, 0.70711], b [-0.57465, -0.70711]."""
    inp = turn_input([[0.2, -0.05, 1.0], [0.1, 0.0]])
    joint, _ = ADVANTAGES.get("igpo")(inp)
    assert_turns(per_turn(joint, inp), [[0.92998, 1.04623, 1.74371], [-0.92998, -0.58124]])
    separate, _ = ADVANTAGES.get("igpo")(inp, separate=True)
    assert_turns(per_turn(separate, inp), [[0.57465, -0.35251, 0.70711], [-0.57465, -0.70711]])


def test_igpo_groups_do_not_mix():
    inp = turn_input([[1.0, 0.0], [0.0, 0.0], [5.0, 7.0], [5.0, 7.0]], group_ids=[3, 3, 8, 8])
    both, _ = ADVANTAGES.get("igpo")(inp)
    alone, _ = ADVANTAGES.get("igpo")(turn_input([[1.0, 0.0], [0.0, 0.0]]))
    assert_close(both[:2], alone)
    # group 8: pool [5, 7, 5, 7] -> z = [-0.86603, 0.86603] per row; sums [0, 0.86603]
    assert_turns(per_turn(both[2:], turn_input([[5.0, 7.0], [5.0, 7.0]])), [[0.0, 0.86603]] * 2)


# ----------------------------------------------------------------------------- MatchTIR


def test_matchtir_reference_value():
    """4.6: turn rewards [0.5, 1.0] and [0, 0] -> A_traj = +-0.7071 (sums 1.5 and 0); D = [1.4, 1.0] and
    [0, 0], z per turn index = +-0.7071 -> fused (A_traj + A_turn) / 2 = +-0.7071 on every turn."""
    inp = turn_input([[0.5, 1.0], [0.0, 0.0]])
    adv, returns = ADVANTAGES.get("matchtir")(inp)
    assert_turns(per_turn(adv, inp), [[S, S], [-S, -S]])
    assert_close(returns, adv)


def test_matchtir_turn_level_differs_from_trajectory_level():
    """Rows [1, 0] and [0, 1] (equal sums -> A_traj = 0): D = [1, 0] and [0.9, 1]; turn 0: z(1, 0.9) =
    +-0.7071, turn 1: z(0, 1) = -+0.7071; fused: a [0.35355, -0.35355], b [-0.35355, 0.35355]."""
    inp = turn_input([[1.0, 0.0], [0.0, 1.0]])
    adv, _ = ADVANTAGES.get("matchtir")(inp)
    assert_turns(per_turn(adv, inp), [[S / 2, -S / 2], [-S / 2, S / 2]])


def test_matchtir_row_alone_at_a_turn_index_keeps_its_return():
    """Rows [1, 1] and [0]: A_traj = +-0.7071 (sums 2 and 0). Turn 0: D = [1.9, 0] -> +-0.7071. Turn 1
    only in row a: a pool of one keeps D = 1.0 (mean 0, std 1, as MatchTIR's code) -> (0.7071 + 1) / 2."""
    inp = turn_input([[1.0, 1.0], [0.0]])
    adv, _ = ADVANTAGES.get("matchtir")(inp)
    assert_turns(per_turn(adv, inp), [[S, (S + 1.0 / (1 + 1e-6)) / 2], [-S]])


# ----------------------------------------------------------------------------- MT-GRPO


def test_mt_grpo_two_turns_is_turn_plus_outcome():
    """Rows [tool 1, outcome 1] and [0, 0]: A_out = +-0.7071, A_turn(turn 0) = +-0.7071 ->
    turn 0: +-1.4142, last turn: A_out = +-0.7071."""
    inp = turn_input([[1.0, 1.0], [0.0, 0.0]])
    adv, returns = ADVANTAGES.get("mt_grpo")(inp)
    assert_turns(per_turn(adv, inp), [[2 * S, S], [-2 * S, -S]])
    assert_close(returns, adv)


def test_mt_grpo_rows_of_different_lengths_and_outcome_weight():
    """Rows a [1, 1], b [0, 0], c [1] (one turn: its only turn is its outcome).
    Outcomes [1, 0, 1]: mean 2/3, unbiased std 0.57735 -> A_out = [0.57735, -1.15470, 0.57735].
    Turn 0 before the last turn: rows a, b only, G = [1, 0] -> +-0.70711.
    outcome_weight 1: a [1.28446, 0.57735], b [-1.86181, -1.15470], c [0.57735];
    outcome_weight 0.5: turn 0 of a = 0.70711 + 0.28868 = 0.99578, of b = -0.70711 - 0.57735 = -1.28446."""
    inp = turn_input([[1.0, 1.0], [0.0, 0.0], [1.0]])
    adv, _ = ADVANTAGES.get("mt_grpo")(inp)
    assert_turns(per_turn(adv, inp), [[1.28446, 0.57735], [-1.86181, -1.15470], [0.57735]])
    half, _ = ADVANTAGES.get("mt_grpo")(inp, outcome_weight=0.5)
    assert_turns(per_turn(half, inp), [[0.99578, 0.57735], [-1.28446, -1.15470], [0.57735]])


def test_mt_grpo_discounts_turn_rewards_up_to_the_outcome():
    """Rows [0.5, 0.2, 1] and [0, 0, 0], gamma 0.5: G_0 = 0.5 + 0.5*0.2 = 0.6 vs 0, G_1 = 0.2 vs 0 ->
    +-0.7071 at both turns; the outcome 1 is excluded from G (A_out = +-0.7071 carries it)."""
    inp = turn_input([[0.5, 0.2, 1.0], [0.0, 0.0, 0.0]])
    adv, _ = ADVANTAGES.get("mt_grpo")(inp, gamma=0.5)
    assert_turns(per_turn(adv, inp), [[2 * S, 2 * S, S], [-2 * S, -2 * S, -S]])


def test_outcome_only_rewards_make_mt_grpo_equal_grpo_on_the_last_turn():
    inp = turn_input([[0.0, 1.0], [0.0, 0.0], [0.0, 0.5]])
    adv, _ = ADVANTAGES.get("mt_grpo")(inp)
    grpo, _ = ADVANTAGES.get("grpo")(inp)
    assert_close(adv, grpo)


# ----------------------------------------------------------------------------- shared checks


@pytest.mark.parametrize("name", ["igpo", "matchtir", "mt_grpo"])
def test_turn_estimators_need_turn_ids(name):
    inp = turn_input([[1.0], [0.0]])
    bare = AdvantageInput(inp.token_rewards, inp.mask, inp.group_ids)
    with pytest.raises(ValueError, match="turn_ids"):
        ADVANTAGES.get(name)(bare)
    holes = inp.turn_ids.clone()
    holes[0, 0] = -1  # a sampled token without a turn
    with pytest.raises(ValueError, match="turn of every sampled token"):
        ADVANTAGES.get(name)(AdvantageInput(inp.token_rewards, inp.mask, inp.group_ids, turn_ids=holes))
    stray = inp.token_rewards.clone()
    stray[0, 2] = 1.0  # a reward on an observation token
    with pytest.raises(ValueError, match="outside every turn"):
        ADVANTAGES.get(name)(AdvantageInput(stray, inp.mask, inp.group_ids, turn_ids=inp.turn_ids))


def test_turn_table():
    inp = turn_input([[0.5, 1.0], [2.0]])
    table = turn_table(inp, "test")
    assert_close(table.rewards_B_K, torch.tensor([[0.5, 1.0], [2.0, 0.0]]))
    assert table.present_B_K.tolist() == [[True, True], [True, False]]
    assert table.last_B.tolist() == [1, 0]
    empty = AdvantageInput(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                           turn_ids=torch.full((2, 3), -1))
    empty_table = turn_table(empty, "test")
    assert tuple(empty_table.rewards_B_K.shape) == (2, 0) and empty_table.last_B.tolist() == [-1, -1]
    for name in ("igpo", "matchtir", "mt_grpo"):
        adv, _ = ADVANTAGES.get(name)(empty)
        assert (adv == 0).all()


# ----------------------------------------------------------------------------- HDPO


def hdpo_input(rewards, correct, calls, group_ids=None) -> AdvantageInput:
    mask = torch.ones(len(rewards), 2)
    ids = torch.zeros(len(rewards), dtype=torch.long) if group_ids is None else torch.tensor(group_ids)
    return AdvantageInput(outcome_token_rewards(torch.tensor(rewards), mask), mask, ids,
                          correct=torch.tensor(correct, dtype=torch.float32),
                          tool_calls=torch.tensor(calls, dtype=torch.float32))


def test_hdpo_reference_value():
    """3.8: correct = [1, 1, 0], tool calls [1, 3, 5]. Efficiency among the correct rows: -tc = [-1, -3],
    mean -2, unbiased std 1.41421 -> z = [+0.70711, -0.70711]; the wrong row gets none.
    Accuracy rewards [1, 1, 0]: mean 2/3, std 0.57735 -> A_acc = [0.57735, 0.57735, -1.15470].
    weight 0.5: A = [0.57735 + 0.35355, 0.57735 - 0.35355, -1.15470] = [0.93090, 0.22380, -1.15470]."""
    inp = hdpo_input([1.0, 1.0, 0.0], [1, 1, 0], [1, 3, 5])
    adv, returns = ADVANTAGES.get("hdpo")(inp)
    assert_close(adv[:, 0], torch.tensor([0.93090, 0.22380, -1.15470]), atol=1e-5, rtol=0)
    assert_close(adv[:, 1], adv[:, 0])
    assert_close(returns, adv)
    efficiency = ADVANTAGES.get("hdpo")(inp, weight=1.0)[0] - ADVANTAGES.get("grpo")(inp)[0]
    assert_close(efficiency[:, 0], torch.tensor([S, -S, 0.0]), atol=1e-5, rtol=0)


def test_hdpo_groups_unknown_correctness_and_single_correct_rows():
    """Group 0 has one correct row (no one to compare with: z = 0); in group 1 the NaN row counts as not
    correct, leaving two correct rows with calls 2 and 2 (equal: z = 0) -> HDPO equals GRPO."""
    inp = hdpo_input([1.0, 0.0, 1.0, 1.0, 1.0], [1, 0, 1, 1, float("nan")], [4, 0, 2, 2, 9], [0, 0, 1, 1, 1])
    assert_close(ADVANTAGES.get("hdpo")(inp)[0], ADVANTAGES.get("grpo")(inp)[0])


def test_hdpo_needs_correct_and_tool_calls():
    inp = hdpo_input([1.0, 0.0], [1, 0], [1, 2])
    with pytest.raises(ValueError, match=r"AdvantageInput\.correct, AdvantageInput\.tool_calls"):
        ADVANTAGES.get("hdpo")(AdvantageInput(inp.token_rewards, inp.mask, inp.group_ids))
    with pytest.raises(ValueError, match=r"AdvantageInput\.tool_calls"):
        ADVANTAGES.get("hdpo")(AdvantageInput(inp.token_rewards, inp.mask, inp.group_ids, correct=inp.correct))
    with pytest.raises(ValueError, match="all NaN"):
        ADVANTAGES.get("hdpo")(hdpo_input([1.0, 0.0], [float("nan")] * 2, [1, 2]))
    with pytest.raises(ValueError, match="1, 0 or NaN"):
        ADVANTAGES.get("hdpo")(hdpo_input([1.0, 0.0], [0.5, 1], [1, 2]))
    with pytest.raises(ValueError, match="finite"):
        ADVANTAGES.get("hdpo")(hdpo_input([1.0, 0.0], [1, 1], [1, float("inf")]))
    with pytest.raises(ValueError, match=r"correct must be \(2,\)"):
        AdvantageInput(inp.token_rewards, inp.mask, inp.group_ids, correct=torch.ones(3))
