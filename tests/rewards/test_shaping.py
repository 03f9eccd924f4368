"""Shaping rewards: DAPO overlong (2.5), DeepEyes (3.8), SPEAR tool reward (4.3), MASH (3.8)."""

import math

import pytest

from tirl.rewards.shaping import deepeyes_format_error, overlong_penalty, spear_bonus, toolcall_schedule
from tirl.types import ToolStatus

from tests.rewards.builders import FIXED, Step, long_trajectory, run, trajectory


def fixed(total: float = 0.0, **kw) -> dict:
    return {"name": FIXED, "kwargs": {"total": total, **kw}}


def tool_step(name: str = "zoom", status: ToolStatus = ToolStatus.OK, tokens: int = 2) -> Step:
    return Step(f"<tool_call>{name}</tool_call>", calls=[(name, {})], statuses=[status], tokens=tokens)


# --- DAPO overlong ----------------------------------------------------------------------------

def test_overlong_reference_value():
    """Reference 2.5: L_max=20480, L_cache=4096, |y|=18432 -> (16384 - 18432) / 4096 = -0.5."""
    assert overlong_penalty(18432, 20480, 4096) == pytest.approx(-0.5)


@pytest.mark.parametrize(("length", "factor", "expected"), [
    (16384, 1.0, 0.0), (100, 1.0, 0.0), (20480, 1.0, -1.0), (20481, 1.0, -1.0), (30000, 1.0, -1.0),
    (18432, 0.5, -0.25), (20481, 0.5, -0.5),
])
def test_overlong_buffer_edges(length, factor, expected):
    assert overlong_penalty(length, 20480, 4096, factor) == pytest.approx(expected)


@pytest.mark.parametrize(("max_length", "cache_length"), [(10, 0), (10, 11), (10, -1)])
def test_overlong_rejects_a_bad_buffer(max_length, cache_length):
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(5, max_length, cache_length)


def test_dapo_overlong_counts_sampled_tokens_only():
    """L_max=10, L_cache=4: 8 sampled tokens -> (6 - 8) / 4 = -0.5 on top of arithmetic's 1.1. The tool
    observation token of the second trajectory is not counted."""
    spec = {"name": "dapo_overlong", "kwargs": {"max_length": 10, "cache_length": 4}}
    r = run(spec, long_trajectory(8))
    assert r.total == pytest.approx(0.6)
    assert r.components == pytest.approx({"correct": 1.0, "format": 0.1, "overlong": -0.5})
    assert r.correct is True
    with_tool = trajectory(tool_step(tokens=3), Step("<answer>42</answer>", tokens=5))
    assert with_tool.num_sampled_tokens == 8 and len(with_tool.response_ids) == 9
    assert run(spec, with_tool).components["overlong"] == pytest.approx(-0.5)
    assert run(spec, long_trajectory(6)).total == pytest.approx(1.1)


def test_dapo_overlong_needs_its_lengths():
    with pytest.raises(ValueError, match="max_length"):
        run("dapo_overlong", long_trajectory(3))


def test_shaping_adds_onto_the_last_turn_of_a_turn_level_base():
    traj = trajectory(tool_step(tokens=4), Step("<answer>42</answer>", tokens=4))
    base = fixed(1.0, turn_rewards=[0.4, 0.6])
    r = run({"name": "dapo_overlong", "kwargs": {"base": base, "max_length": 10, "cache_length": 4}}, traj)
    assert r.turn_rewards == pytest.approx((0.4, 0.1))
    assert r.total == pytest.approx(0.5)


def test_a_base_component_named_like_the_shaping_term_is_an_error():
    spec = {"name": "dapo_overlong", "kwargs": {"base": fixed(1.0, components={"overlong": 1.0}),
                                                "max_length": 10, "cache_length": 4}}
    with pytest.raises(ValueError, match="reported twice"):
        run(spec, long_trajectory(3))


# --- DeepEyes ---------------------------------------------------------------------------------

def test_deepeyes_reference_values():
    """Reference 3.8: correct with a tool -> 0.8 + 1.2 = 2.0; correct without -> 0.8; format error -> -0.2."""
    with_tool = run("deepeyes", trajectory(tool_step(), "<answer>42</answer>"))
    assert with_tool.total == pytest.approx(2.0)
    assert with_tool.components == pytest.approx({"acc": 0.8, "format": 0.0, "tool": 1.2, "base.correct": 1.0,
                                                  "base.format": 0.1})
    assert run("deepeyes", trajectory("<answer>42</answer>")).total == pytest.approx(0.8)
    format_error = run("deepeyes", trajectory("the answer is 41"))
    assert format_error.total == pytest.approx(-0.2)
    assert format_error.correct is False


def test_deepeyes_tool_bonus_needs_accuracy_and_a_tool_that_ran():
    assert run("deepeyes", trajectory(tool_step(), "<answer>41</answer>")).total == 0.0
    failed_call = trajectory(tool_step(status=ToolStatus.VALIDATION_ERROR), "<answer>42</answer>")
    assert run("deepeyes", failed_call).total == pytest.approx(0.8)
    other_tool = {"name": "deepeyes", "kwargs": {"tools": ["crop"]}}
    assert run(other_tool, trajectory(tool_step("zoom"), "<answer>42</answer>")).total == pytest.approx(0.8)


def test_deepeyes_long_answers_lose_accuracy():
    base = fixed(1.0, correct=True)
    long = trajectory(tool_step(), "<answer>" + "x" * 1000 + "</answer>")
    assert run({"name": "deepeyes", "kwargs": {"base": base}}, long).total == pytest.approx(-0.2)
    short = trajectory(tool_step(), "<answer>" + "x" * 999 + "</answer>")
    assert run({"name": "deepeyes", "kwargs": {"base": base}}, short).total == pytest.approx(2.0)


@pytest.mark.parametrize(("text", "error", "answer"), [
    ("<think>a</think><answer>42</answer>", False, "42"),
    ("<think>a<answer>42</answer>", True, "42"),
    ("<answer>42</answer><answer>43", True, "42"),
    ("<answer> </answer>", True, ""),
    ("42", True, ""),
    (None, True, ""),
    ("<answer>1</answer> or <answer>2</answer>", False, "2"),
])
def test_deepeyes_format_check(text, error, answer):
    assert deepeyes_format_error(text) == (error, answer)


# --- SPEAR ------------------------------------------------------------------------------------

def test_spear_reference_value():
    """Reference 4.3: 3 tool turns, s=50, T=200 -> 0.3 * (cos(pi/4) + 1) / 2 = 0.25607."""
    kappa = toolcall_schedule(50, 200)
    assert kappa == pytest.approx((math.cos(math.pi / 4) + 1) / 2)
    assert spear_bonus(0.0, 3, kappa) == pytest.approx(0.25607, abs=1e-5)
    traj = trajectory(tool_step(), tool_step(), tool_step(), "<answer>42</answer>")
    r = run({"name": "spear_tool", "kwargs": {"base": fixed(0.0)}}, traj, step=50)
    assert r.total == pytest.approx(0.25607, abs=1e-5)
    assert r.components["toolcall"] == pytest.approx(0.25607, abs=1e-5)


@pytest.mark.parametrize(("step", "expected"), [(0, 1.0), (100, 0.5), (200, 0.0), (201, 0.0), (1000, 0.0)])
def test_spear_schedule(step, expected):
    assert toolcall_schedule(step, 200) == pytest.approx(expected, abs=1e-12)


def test_spear_counts_turns_not_calls_and_caps():
    two_calls = Step("two", calls=[("a", {}), ("b", {})])
    traj = trajectory(two_calls, "<answer>42</answer>")
    assert run({"name": "spear_tool", "kwargs": {"base": fixed(0.0)}}, traj).total == pytest.approx(0.1)
    many = trajectory(*[tool_step() for _ in range(12)], "<answer>42</answer>")
    assert run({"name": "spear_tool", "kwargs": {"base": fixed(0.0)}}, many).total == pytest.approx(1.0)
    assert spear_bonus(0.0, 12, 1.0) == 1.0


def test_spear_qwen3_variant():
    """kappa(50) = 0.85355: a positive score gets kappa * 1[r_tc > 0], a non-positive one kappa * r_tc."""
    kappa = toolcall_schedule(50, 200)
    assert spear_bonus(1.0, 3, kappa, variant="qwen3") == pytest.approx(kappa)
    assert spear_bonus(0.0, 3, kappa, variant="qwen3") == pytest.approx(0.3 * kappa)
    assert spear_bonus(1.0, 0, kappa, variant="qwen3") == 0.0
    traj = trajectory(tool_step(), tool_step(), tool_step(), "<answer>42</answer>")
    r = run({"name": "spear_tool", "kwargs": {"variant": "qwen3"}}, traj, step=50)
    assert r.total == pytest.approx(1.1 + kappa)
    assert r.correct is True
    with pytest.raises(ValueError, match="variant"):
        spear_bonus(0.0, 1, 1.0, variant="qwen2")


def test_spear_bonus_is_gone_after_the_schedule():
    traj = trajectory(tool_step(), "<answer>42</answer>")
    r = run({"name": "spear_tool", "kwargs": {"max_toolcall_steps": 100}}, traj, step=150)
    assert r.total == pytest.approx(1.1)


# --- MASH -------------------------------------------------------------------------------------

def test_mash_pays_per_search():
    """acc - 0.1 * 3 = 0.7; wrong with one search: -0.1."""
    traj = trajectory(tool_step("search"), tool_step("search"), tool_step("search"), "<answer>42</answer>")
    r = run("mash", traj)
    assert r.total == pytest.approx(0.7)
    assert r.components == pytest.approx({"acc": 1.0, "search_cost": -0.3, "searches": 3.0, "base.correct": 1.0,
                                          "base.format": 0.1})
    assert run("mash", trajectory(tool_step("search"), "<answer>41</answer>")).total == pytest.approx(-0.1)


def test_mash_counts_only_searches_that_ran():
    traj = trajectory(tool_step("search"), tool_step("search", ToolStatus.VALIDATION_ERROR),
                      tool_step("search", ToolStatus.TIMEOUT), tool_step("calculator"), "<answer>42</answer>")
    spec = {"name": "mash", "kwargs": {"search_cost": 0.2, "tools": ["search"]}}
    assert run(spec, traj).total == pytest.approx(1.0 - 0.2 * 2)
    assert run({"name": "mash", "kwargs": {"search_cost": 0.2}}, traj).total == pytest.approx(1.0 - 0.2 * 3)


def test_tools_must_be_a_list_of_names():
    with pytest.raises(ValueError, match="list of tool names"):
        run({"name": "mash", "kwargs": {"tools": "search"}}, trajectory("<answer>42</answer>"))
