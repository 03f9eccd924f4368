"""weighted_sum, product and gate: rewards built from other rewards."""

import pytest

from tirl.rewards import REWARDS
from tirl.rewards.base import bind

from tests.rewards.builders import COUNTING, FAILING, FIXED, Step, run, trajectory

RIGHT = trajectory("<answer>42</answer>")  # arithmetic: correct 1.0 + format 0.1 = 1.1
WRONG = trajectory("<answer>41</answer>")  # arithmetic: correct 0.0 + format 0.1 = 0.1


def fixed(total: float, **kw) -> dict:
    return {"name": FIXED, "kwargs": {"total": total, **kw}}


def test_registered_with_descriptions():
    for name in ("weighted_sum", "product", "gate"):
        assert name in REWARDS
        assert len(REWARDS.describe()[name]) > 30


# --- weighted_sum -----------------------------------------------------------------------------

def test_weighted_sum_total_components_and_correct():
    """2 * 1.1 (arithmetic) + 0.4 * (-0.5) = 2.0; components unweighted, prefixed by label."""
    spec = {"name": "weighted_sum", "kwargs": {"terms": [
        {"reward": "task", "weight": 2}, {"reward": fixed(-0.5), "weight": 0.4, "name": "pen"}]}}
    r = run(spec, RIGHT)
    assert r.total == pytest.approx(2.0)
    assert r.components == pytest.approx({"t0": 1.1, "t0.correct": 1.0, "t0.format": 0.1, "pen": -0.5})
    assert r.correct is True
    assert r.turn_rewards is None


def test_weighted_sum_correct_comes_from_the_first_term_that_knows_it():
    spec = {"name": "weighted_sum", "kwargs": {"terms": [fixed(1.0), fixed(0.0, correct=False), "task"]}}
    r = run(spec, RIGHT)
    assert r.correct is False  # term 1, not the (right) task reward of term 2
    assert r.total == pytest.approx(2.1)


def test_weighted_sum_correct_from_a_named_or_indexed_term():
    terms = [fixed(0.0, correct=False), {"reward": "task", "name": "acc"}]
    assert run({"name": "weighted_sum", "kwargs": {"terms": terms, "correct_from": "acc"}}, RIGHT).correct is True
    assert run({"name": "weighted_sum", "kwargs": {"terms": terms, "correct_from": 1}}, RIGHT).correct is True
    assert run({"name": "weighted_sum", "kwargs": {"terms": terms, "correct_from": 0}}, RIGHT).correct is False


@pytest.mark.parametrize(("correct_from", "message"), [("nope", "names no term"), (5, "there are 2 terms"),
                                                       ("t0", "does not say")])
def test_weighted_sum_bad_correct_from(correct_from, message):
    terms = [fixed(1.0), "task"]
    with pytest.raises(ValueError, match=message):
        run({"name": "weighted_sum", "kwargs": {"terms": terms, "correct_from": correct_from}}, RIGHT)


def test_weighted_sum_without_any_correctness_gives_none():
    assert run({"name": "weighted_sum", "kwargs": {"terms": [fixed(1.0)]}}, RIGHT).correct is None


def test_weighted_sum_keeps_turn_placement():
    """A: turns (0.2, 0.3), weight 2; B: outcome 1.0 on the last turn, weight -1 -> (0.4, 0.6 - 1.0)."""
    traj = trajectory(Step("call", calls=[("calc", {"x": "1"})]), "<answer>42</answer>")
    spec = {"name": "weighted_sum", "kwargs": {"terms": [
        {"reward": fixed(0.5, turn_rewards=[0.2, 0.3]), "weight": 2}, {"reward": fixed(1.0), "weight": -1}]}}
    r = run(spec, traj)
    assert r.turn_rewards == pytest.approx((0.4, -0.4))
    assert r.total == pytest.approx(0.0)


def test_errors_in_parts_propagate():
    for name in ("weighted_sum", "product"):
        with pytest.raises(RuntimeError, match="reward bug"):
            run({"name": name, "kwargs": {"terms": ["task", FAILING]}}, RIGHT)
    with pytest.raises(RuntimeError, match="reward bug"):
        run({"name": "gate", "kwargs": {"gate": "task", "reward": FAILING}}, RIGHT)


@pytest.mark.parametrize(("terms", "message"), [
    ([], "non-empty list"),
    ("task", "non-empty list"),
    ([{"weight": 1}], "term 0 must be"),
    ([{"reward": "task", "scale": 1}], "term 0 must be"),
    ([{"reward": "task", "weight": "big"}], "weight must be a finite number"),
    ([{"reward": "task", "name": "a"}, {"reward": "task", "name": "a"}], "distinct"),
    ([{"reward": "task", "name": "a.b"}], "without '.'"),
])
def test_weighted_sum_rejects_bad_terms(terms, message):
    with pytest.raises(ValueError, match=message):
        run({"name": "weighted_sum", "kwargs": {"terms": terms}}, RIGHT)


def test_unknown_part_reward_names_it_at_bind():
    """Nested specs are checked when the reward is bound (preflight), not at the first scoring."""
    with pytest.raises(ValueError, match="term 't0': unknown reward 'no_such_reward'"):
        bind({"name": "weighted_sum", "kwargs": {"terms": ["no_such_reward"]}}, "arithmetic")
    with pytest.raises(ValueError, match="term 'fmt': reward 'format_tags' has no parameter 'bogus'"):
        bind({"name": "product", "kwargs": {"terms": [{"reward": {"name": "format_tags", "kwargs": {"bogus": 1}},
                                                      "name": "fmt"}]}}, "arithmetic")
    with pytest.raises(ValueError, match="parameter 'base': unknown reward 'nope'"):
        bind({"name": "otc_grpo", "kwargs": {"base": "nope"}}, "arithmetic")
    with pytest.raises(ValueError, match="needs the parameter 'max_length'"):
        bind("dapo_overlong", "arithmetic")


def test_unknown_parameter_fails_at_bind():
    with pytest.raises(ValueError, match="weights"):
        bind({"name": "weighted_sum", "kwargs": {"weights": [1]}}, "arithmetic")


# --- product ----------------------------------------------------------------------------------

def test_product_multiplies_totals():
    """OTC-style: 1.1 * 0.5 = 0.55 (right), 0.1 * 0.5 = 0.05 (wrong); scale 2 doubles."""
    spec = {"name": "product", "kwargs": {"terms": ["task", {"reward": fixed(0.5), "name": "tool"}]}}
    r = run(spec, RIGHT)
    assert r.total == pytest.approx(0.55)
    assert r.components == pytest.approx({"t0": 1.1, "t0.correct": 1.0, "t0.format": 0.1, "tool": 0.5})
    assert r.correct is True
    assert run(spec, WRONG).total == pytest.approx(0.05)
    assert run(spec, WRONG).correct is False
    spec["kwargs"]["scale"] = 2.0
    assert run(spec, RIGHT).total == pytest.approx(1.1)


def test_product_refuses_turn_rewards():
    spec = {"name": "product", "kwargs": {"terms": ["task", fixed(0.5, turn_rewards=[0.5])]}}
    with pytest.raises(ValueError, match="turn rewards"):
        run(spec, RIGHT)


def test_product_terms_take_no_weight():
    with pytest.raises(ValueError, match="term 0 must be"):
        run({"name": "product", "kwargs": {"terms": [{"reward": "task", "weight": 2}]}}, RIGHT)


# --- gate -------------------------------------------------------------------------------------

def test_gate_pays_when_the_gate_is_correct():
    spec = {"name": "gate", "kwargs": {"gate": "task", "reward": fixed(3.0, components={"x": 3.0})}}
    r = run(spec, RIGHT)
    assert r.total == 3.0
    assert r.components == pytest.approx({"gate": 1.1, "gate.correct": 1.0, "gate.format": 0.1, "passed": 1.0,
                                          "reward": 3.0, "reward.x": 3.0})
    assert r.correct is True


def test_gate_pays_otherwise_and_does_not_score_the_reward_when_closed():
    state: dict = {}
    spec = {"name": "gate", "kwargs": {"gate": "task", "reward": COUNTING, "otherwise": -1.0}}
    r = run(spec, WRONG, state=state)
    assert r.total == -1.0
    assert r.components["passed"] == 0.0 and "reward" not in r.components
    assert r.correct is False
    assert state.get("calls", 0) == 0
    run(spec, RIGHT, state=state)
    assert state["calls"] == 1


def test_gate_threshold_is_strict():
    """Gate total 0.7: paid above 0.5, not at 0.7."""
    spec = {"name": "gate", "kwargs": {"gate": fixed(0.7), "reward": fixed(2.0), "threshold": 0.5}}
    assert run(spec, RIGHT).total == 2.0
    spec["kwargs"]["threshold"] = 0.7
    assert run(spec, RIGHT).total == 0.0


def test_gate_correct_falls_back_to_the_paid_reward():
    spec = {"name": "gate", "kwargs": {"gate": fixed(1.0), "reward": "task", "threshold": 0.0}}
    assert run(spec, WRONG).correct is False


def test_gate_without_correctness_or_threshold_raises():
    with pytest.raises(ValueError, match="does not say whether"):
        run({"name": "gate", "kwargs": {"gate": fixed(1.0), "reward": "task"}}, RIGHT)


def test_gate_passes_turn_rewards_of_the_paid_reward():
    traj = trajectory(Step("call", calls=[("calc", {})]), "<answer>42</answer>")
    spec = {"name": "gate", "kwargs": {"gate": "task", "reward": fixed(1.0, turn_rewards=[0.25, 0.75])}}
    assert run(spec, traj).turn_rewards == (0.25, 0.75)
