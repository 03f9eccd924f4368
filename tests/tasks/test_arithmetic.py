"""The arithmetic task: determinism, splits, disjointness, answers, templates, configuration."""

import ast
import re
from collections import Counter
from fractions import Fraction

import pytest

from tirl.rewards import REWARDS, GroupContext
from tirl.tasks import TASKS, ArithmeticTask
from tirl.tasks.arithmetic_templates import PRETTY_SYMBOLS, TEMPLATES_BY_LEVEL, BinOp, Num, evaluate, render
from tirl.types import StopReason, Trajectory, TrajectoryMeta

N_TRAIN = 2000
_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__, ast.Div: Fraction.__truediv__}


def _eval(expression: str) -> Fraction:
    """Exact value of an expression of integers, + - * / and parentheses; anything else raises."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval"))


def _operators(expression: str) -> list[str]:
    return re.findall(r"[-+*/]", expression)


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask()


@pytest.fixture(scope="module")
def train(task):
    return [task.train_problem(i) for i in range(N_TRAIN)]


def test_registered_with_its_defaults():
    assert TASKS.get("arithmetic") is ArithmeticTask
    task = ArithmeticTask()
    assert (task.name, task.default_tools, task.default_reward) == ("arithmetic", ("calculator",), "arithmetic")
    assert task.default_reward in REWARDS


def test_system_prompts():
    task = ArithmeticTask()
    with_tools, without = task.system_prompt(True), task.system_prompt(False)
    assert "calculator" in with_tools and "<answer>number</answer>" in with_tools
    assert "calculator" not in without and "<answer>number</answer>" in without
    assert len(with_tools.split()) < 40


@pytest.mark.parametrize("expr, text", [
    (BinOp("-", Num(9), BinOp("-", Num(5), Num(3))), "9 - (5 - 3)"),
    (BinOp("/", Num(64), BinOp("/", Num(8), Num(2))), "64 / (8 / 2)"),
    (BinOp("-", BinOp("-", Num(9), Num(5)), Num(3)), "9 - 5 - 3"),
    (BinOp("*", BinOp("+", Num(2), Num(3)), Num(4)), "(2 + 3) * 4"),
    (BinOp("+", Num(2), BinOp("*", Num(3), Num(4))), "2 + 3 * 4"),
    (BinOp("*", Num(2), BinOp("*", Num(3), Num(4))), "2 * 3 * 4"),
])
def test_render_uses_exactly_the_needed_parentheses(expr, text):
    assert render(expr) == text
    assert _eval(text) == evaluate(expr)


def test_render_pretty_symbols():
    assert render(BinOp("/", BinOp("*", Num(6), Num(4)), Num(3)), PRETTY_SYMBOLS) == "6 × 4 ÷ 3"


# --- determinism and splits -------------------------------------------------------------------

def test_deterministic_across_instances(train):
    other = ArithmeticTask()
    assert [other.train_problem(i) for i in range(200)] == train[:200]
    assert other.heldout() == ArithmeticTask().heldout()
    assert other.sft_problems(50) == ArithmeticTask().sft_problems(50)


def test_train_problem_does_not_depend_on_draw_order(train):
    fresh = ArithmeticTask()
    assert fresh.train_problem(1234) == train[1234]
    assert fresh.train_problem(3) == train[3]


def test_seed_changes_train_but_not_heldout_or_sft(train):
    other = ArithmeticTask(seed=1)
    assert sum(other.train_problem(i).question == train[i].question for i in range(200)) < 5
    assert other.heldout() == ArithmeticTask(seed=0).heldout()
    assert other.sft_problems(20) == ArithmeticTask(seed=0).sft_problems(20)


def test_ids(train, task):
    assert train[123].id == "arithmetic/train/123"
    assert [p.id for p in task.heldout()] == [f"arithmetic/heldout/{i}" for i in range(100)]
    assert [p.id for p in task.sft_problems(3)] == [f"arithmetic/sft/{i}" for i in range(3)]


@pytest.mark.parametrize("levels, size, expected", [
    ([1, 2, 3, 4], 100, {1: 25, 2: 25, 3: 25, 4: 25}),
    ([1, 2, 3, 4], 10, {1: 3, 2: 3, 3: 2, 4: 2}),
    ([4, 2, 3], 7, {2: 3, 3: 2, 4: 2}),
    ([3], 5, {3: 5}),
])
def test_heldout_is_stratified(levels, size, expected):
    heldout = ArithmeticTask(levels=levels, heldout_size=size).heldout()
    assert len(heldout) == size
    assert Counter(p.info["level"] for p in heldout) == expected


def test_heldout_questions_distinct_and_a_copy(task):
    heldout = task.heldout()
    assert len({p.question for p in heldout}) == len(heldout)
    heldout.clear()
    assert len(task.heldout()) == 100


def test_larger_heldout_extends_the_smaller_one():
    assert ArithmeticTask(heldout_size=200).heldout()[:100] == ArithmeticTask().heldout()


def test_train_and_sft_never_repeat_a_heldout_question():
    task = ArithmeticTask()
    heldout = {p.question for p in task.heldout()}
    assert not any(task.train_problem(i).question in heldout for i in range(20_000))
    assert not any(p.question in heldout for p in task.sft_problems(2000))


def test_collision_with_heldout_is_regenerated_deterministically(train):
    # Natural collisions are too rare to observe, so plant one: pretend train problem 7 is held out.
    def task_with_planted_collision():
        task = ArithmeticTask()
        task.heldout()
        task._heldout_questions = task._heldout_questions | {train[7].question}
        return task

    replaced = task_with_planted_collision().train_problem(7)
    assert replaced.question != train[7].question and replaced.id == train[7].id
    assert task_with_planted_collision().train_problem(7) == replaced
    assert task_with_planted_collision().train_problem(8) == train[8]


# --- problem contents -------------------------------------------------------------------------

def _all_problems(task, train):
    return train + task.heldout() + task.sft_problems(200)


def test_expression_evaluates_to_the_positive_integer_answer(task, train):
    for p in _all_problems(task, train):
        expression = p.info["expression"]
        assert re.fullmatch(r"[0-9+\-*/() ]+", expression), expression
        assert p.reference_calls[0].arguments == {"expression": expression}
        assert (p.reference_calls[0].id, p.reference_calls[0].name) == ("call_0", "calculator")
        assert re.fullmatch(r"[1-9][0-9]*", p.answer), p.answer
        assert _eval(expression) == int(p.answer), p


def test_info_keys(train):
    assert all(set(p.info) == {"level", "template", "expression"} for p in train)


def test_operator_counts_per_level(train):
    expected = {1: 1, 2: 2, 3: 1, 4: 2}
    for p in train:
        assert len(_operators(p.info["expression"])) == expected[p.info["level"]], p


def test_every_operator_appears_at_every_level(train):
    for level in (1, 2, 3, 4):
        ops = {op for p in train if p.info["level"] == level for op in _operators(p.info["expression"])}
        assert ops == {"+", "-", "*", "/"}, (level, ops)


def test_plain_questions_show_their_expression(train):
    for p in train:
        if p.info["level"] <= 2:
            ascii_question = p.question.replace("×", "*").replace("÷", "/")
            assert p.info["expression"] in ascii_question, p


def test_word_problems_state_every_operand_and_sometimes_an_irrelevant_number(train):
    extra = Counter()
    for p in train:
        if p.info["level"] >= 3:
            operands, stated = _numbers(p.info["expression"]), _numbers(p.question)
            assert not Counter(operands) - Counter(stated), p
            extra[p.info["level"]] += len(stated) > len(operands)
    counts = Counter(p.info["level"] for p in train)
    assert 0.15 < extra[3] / counts[3] < 0.6
    assert 0.4 < extra[4] / counts[4] < 0.9


def test_operand_sizes(train):
    for p in train:
        if p.info["level"] == 1:
            a, b = _numbers(p.info["expression"])
            op = _operators(p.info["expression"])[0]
            if op == "*":
                assert 100 <= a <= 9999 and 10 <= b <= 999, p
            elif op in "+-":
                assert 100 <= a <= 9999 and 100 <= b <= 9999, p
            else:
                assert 10 <= b <= 99, p
        assert max(_numbers(p.info["expression"])) <= 9999, p


def test_max_digits_bounds_operands():
    for max_digits in (3, 6):
        task = ArithmeticTask(max_digits=max_digits)
        problems = [task.train_problem(i) for i in range(400)]
        operands = [n for p in problems for n in _numbers(p.info["expression"])]
        assert max(operands) < 10**max_digits
        assert all(_eval(p.info["expression"]) == int(p.answer) for p in problems)
    assert max(len(str(n)) for p in problems for n in _numbers(p.info["expression"])) == 6


def test_every_template_is_used(train):
    used = Counter(p.info["template"] for p in train)
    for level, names in TEMPLATES_BY_LEVEL.items():
        assert set(names) <= set(used), (level, set(names) - set(used))
        assert all(used[n] and n.startswith(f"L{level}:") for n in names)
    assert set(used) == {n for names in TEMPLATES_BY_LEVEL.values() for n in names}
    assert len(TEMPLATES_BY_LEVEL[3]) >= 6 and len(TEMPLATES_BY_LEVEL[4]) >= 6


def test_question_lengths(train):
    for p in train:
        words = len(p.question.split())
        assert (3 <= words <= 12) if p.info["level"] <= 2 else (10 <= words <= 35), (words, p.question)


def test_levels_are_drawn_uniformly_from_the_configured_ones(train):
    counts = Counter(p.info["level"] for p in train)
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) > N_TRAIN / 4 * 0.85
    only_3 = ArithmeticTask(levels=[3])
    assert {only_3.train_problem(i).info["level"] for i in range(100)} == {3}
    assert {p.info["level"] for p in only_3.heldout()} == {3}


# --- SFT set ----------------------------------------------------------------------------------

def test_sft_is_narrow():
    problems = ArithmeticTask().sft_problems(300)
    assert all(re.fullmatch(r"What is \d+ \* \d+\?", p.question) for p in problems)
    assert all(p.info["level"] == 1 and p.info["template"] == "L1:what_is" for p in problems)
    assert len({p.question for p in problems}) == 300


def test_sft_ops_choose_the_operators():
    problems = ArithmeticTask(sft_ops=["+", "/"]).sft_problems(200)
    ops = Counter(_operators(p.info["expression"])[0] for p in problems)
    assert set(ops) == {"+", "/"}
    assert all(re.fullmatch(r"What is \d+ [+/] \d+\?", p.question) for p in problems)


def test_sft_prefix_stable():
    task = ArithmeticTask()
    assert task.sft_problems(100)[:40] == task.sft_problems(40)
    assert task.sft_problems(0) == []


# --- reward on the task's own answers ---------------------------------------------------------

def test_reference_answer_text_earns_full_reward(task):
    reward = REWARDS.get(task.default_reward)
    for p in task.heldout():
        traj = Trajectory(prompt_ids=(1,), response_ids=(), loss_mask=(), logprobs=(), turns=(), messages=(),
                          stop_reason=StopReason.ANSWERED, meta=TrajectoryMeta(task_id=p.id, group_id="g"),
                          final_answer=task.final_answer_text(p))
        result = reward(traj, p, GroupContext(trajectories=(traj,)))
        assert result.correct is True and result.total == pytest.approx(1.1)


# --- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"seed": "1"}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"levels": []}, "levels"),
    ({"levels": [5]}, "levels"),
    ({"levels": [0, 1]}, "levels"),
    ({"levels": [1, 1]}, "levels"),
    ({"levels": [1.0]}, "levels"),
    ({"levels": "12"}, "levels"),
    ({"levels": 3}, "levels"),
    ({"heldout_size": 0}, "heldout_size"),
    ({"heldout_size": 2.5}, "heldout_size"),
    ({"sft_ops": []}, "sft_ops"),
    ({"sft_ops": ["^"]}, "sft_ops"),
    ({"sft_ops": "*"}, "sft_ops"),
    ({"sft_ops": ["*", "*"]}, "sft_ops"),
    ({"max_digits": 2}, "max_digits"),
    ({"max_digits": 7}, "max_digits"),
    ({"max_digits": "4"}, "max_digits"),
])
def test_bad_kwargs_raise_naming_the_kwarg(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ArithmeticTask(**kwargs)


def test_bad_indices_raise():
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="index"):
        task.train_problem(-1)
    with pytest.raises(ValueError, match="count"):
        task.sft_problems(-1)


def test_levels_order_does_not_matter():
    assert ArithmeticTask(levels=[3, 1]).heldout() == ArithmeticTask(levels=[1, 3]).heldout()
