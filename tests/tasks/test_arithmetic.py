"""The arithmetic task: determinism, splits, disjointness, answers, templates, configuration."""

import ast
import re
from collections import Counter
from fractions import Fraction

import pytest

from tirl.rewards import REWARDS, GroupContext
from tirl.tasks import TASKS, ArithmeticTask
from tirl.tasks.arithmetic import DEFAULT_LEVELS, LEVELS, OPERATORS
from tirl.tasks.arithmetic_templates import (
    DISTRACTOR_RATE,
    LEVEL3_TEMPLATES,
    PRETTY_SYMBOLS,
    TEMPLATES_BY_LEVEL,
    BinOp,
    Num,
    evaluate,
    render,
)
from tirl.types import StopReason, Trajectory, TrajectoryMeta

N_TRAIN = 2000
N_ALL = 2500
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


@pytest.fixture(scope="module")
def train_all():
    """Train problems over every level, level 5 included (it is not in the default levels)."""
    task = ArithmeticTask(levels=LEVELS)
    return [task.train_problem(i) for i in range(N_ALL)]


def _at_level(problems, level):
    return [p for p in problems if p.info["level"] == level]


def test_default_ladder():
    task = ArithmeticTask()
    assert LEVELS == (1, 2, 3, 4, 5) and DEFAULT_LEVELS == (1, 2, 3, 4)
    assert task.levels == DEFAULT_LEVELS and task.sft_ops == ("*", "+", "-", "/")
    assert set(task.template_names()) == set(DEFAULT_LEVELS)
    assert set(TEMPLATES_BY_LEVEL) == set(LEVELS)


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
    ([1, 2, 3, 4, 5], 12, {1: 3, 2: 3, 3: 2, 4: 2, 5: 2}),
    ([4, 2, 3], 7, {2: 3, 3: 2, 4: 2}),
    ([5, 3], 5, {3: 3, 5: 2}),
    ([3], 5, {3: 5}),
])
def test_heldout_is_stratified(levels, size, expected):
    heldout = ArithmeticTask(levels=levels, heldout_size=size).heldout()
    assert len(heldout) == size
    assert Counter(p.info["level"] for p in heldout) == expected
    assert [p.info["level"] for p in heldout] == [sorted(levels)[i % len(levels)] for i in range(size)]


def test_heldout_questions_distinct_and_a_copy(task):
    heldout = task.heldout()
    assert len({p.question for p in heldout}) == len(heldout)
    heldout.clear()
    assert len(task.heldout()) == 100


def test_larger_heldout_extends_the_smaller_one():
    assert ArithmeticTask(heldout_size=200).heldout()[:100] == ArithmeticTask().heldout()


@pytest.mark.parametrize("levels", [DEFAULT_LEVELS, LEVELS])
def test_train_and_sft_never_repeat_a_heldout_question(levels):
    task = ArithmeticTask(levels=levels)
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

def _all_problems(task, train, train_all):
    return train + train_all + task.heldout() + ArithmeticTask(levels=LEVELS).heldout() + task.sft_problems(200)


def test_expression_evaluates_to_the_positive_integer_answer(task, train, train_all):
    for p in _all_problems(task, train, train_all):
        expression = p.info["expression"]
        assert re.fullmatch(r"[0-9+\-*/() ]+", expression), expression
        assert p.reference_calls[0].arguments == {"expression": expression}
        assert (p.reference_calls[0].id, p.reference_calls[0].name) == ("call_0", "calculator")
        assert re.fullmatch(r"[1-9][0-9]*", p.answer), p.answer
        assert _eval(expression) == int(p.answer), p


def test_info_keys(train, train_all):
    assert all(set(p.info) == {"level", "template", "expression"} for p in train + train_all)


def test_operator_counts_per_level(train_all):
    expected = {1: 1, 2: 2, 3: 1, 4: 1, 5: 2}
    for p in train_all:
        assert len(_operators(p.info["expression"])) == expected[p.info["level"]], p


def test_every_operator_appears_at_every_level(train, train_all):
    for problems, levels in ((train, DEFAULT_LEVELS), (train_all, LEVELS)):
        for level in levels:
            ops = Counter(op for p in _at_level(problems, level) for op in _operators(p.info["expression"]))
            assert set(ops) == {"+", "-", "*", "/"}, (level, ops)


def test_level_3_operators_are_balanced(train_all):
    ops = Counter(_operators(p.info["expression"])[0] for p in _at_level(train_all, 3))
    assert min(ops.values()) > sum(ops.values()) / 4 * 0.75, ops
    phrasings = Counter(t.shape for t in LEVEL3_TEMPLATES)
    assert set(phrasings) == {"a+b", "a-b", "a*b", "a/b"} and min(phrasings.values()) >= 4


def test_plain_questions_show_their_expression(train_all):
    for p in train_all:
        if p.info["level"] <= 2:
            ascii_question = p.question.replace("×", "*").replace("÷", "/")
            assert p.info["expression"] in ascii_question, p


def test_level_3_writes_the_operation_in_words(train_all, task):
    level3 = _at_level(train_all + task.heldout(), 3)
    assert len(level3) > 400
    for p in level3:
        assert not re.search(r"[-+*/×÷]", p.question), p
        operands, stated = _numbers(p.info["expression"]), _numbers(p.question)
        assert not Counter(operands) - Counter(stated), p
        a, b = operands
        op = _operators(p.info["expression"])[0]
        assert (op != "-" or a > b) and (op != "/" or a % b == 0), p


def test_level_3_lead_in_comes_first_with_one_number(train_all):
    level3 = _at_level(train_all, 3)
    with_lead_in = 0
    for p in level3:
        sentences = re.split(r"(?<=[.?]) ", p.question)
        operands = _numbers(p.info["expression"])
        assert len(sentences) in (1, 2), p
        if len(sentences) == 2:
            with_lead_in += 1
            assert len(_numbers(sentences[0])) == 1 and sentences[0].endswith("."), p
        assert sorted(_numbers(sentences[-1])) == sorted(operands), p
    assert abs(with_lead_in / len(level3) - DISTRACTOR_RATE[3]) < 0.1


def test_word_problems_state_every_operand_and_sometimes_an_irrelevant_number(train_all):
    extra = Counter()
    for p in train_all:
        if p.info["level"] >= 3:
            operands, stated = _numbers(p.info["expression"]), _numbers(p.question)
            assert not Counter(operands) - Counter(stated), p
            assert len(stated) <= len(operands) + 1, p
            extra[p.info["level"]] += len(stated) > len(operands)
    counts = Counter(p.info["level"] for p in train_all)
    assert 0.25 < extra[3] / counts[3] < 0.55
    assert 0.15 < extra[4] / counts[4] < 0.55
    assert 0.45 < extra[5] / counts[5] < 0.9


def test_operand_sizes(train_all):
    for p in train_all:
        if p.info["level"] in (1, 3):
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


def test_every_template_is_used(train, train_all):
    for problems, levels in ((train, DEFAULT_LEVELS), (train_all, LEVELS)):
        used = Counter(p.info["template"] for p in problems)
        for level in levels:
            names = TEMPLATES_BY_LEVEL[level]
            assert set(names) <= set(used), (level, set(names) - set(used))
            assert all(used[n] and n.startswith(f"L{level}:") for n in names)
        assert set(used) == {n for level in levels for n in TEMPLATES_BY_LEVEL[level]}
    all_names = [n for names in TEMPLATES_BY_LEVEL.values() for n in names]
    assert len(all_names) == len(set(all_names))
    assert len(TEMPLATES_BY_LEVEL[3]) >= 16 and len(TEMPLATES_BY_LEVEL[4]) >= 6 and len(TEMPLATES_BY_LEVEL[5]) >= 6


_WORD_BOUNDS = {1: (3, 12), 2: (3, 12), 3: (4, 18), 4: (10, 35), 5: (10, 35)}


def test_question_lengths(train_all):
    for p in train_all:
        words = len(p.question.split())
        lo, hi = _WORD_BOUNDS[p.info["level"]]
        assert lo <= words <= hi, (words, p.question)


def test_levels_are_drawn_uniformly_from_the_configured_ones(train, train_all):
    counts = Counter(p.info["level"] for p in train)
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) > N_TRAIN / 4 * 0.85
    counts = Counter(p.info["level"] for p in train_all)
    assert set(counts) == {1, 2, 3, 4, 5} and min(counts.values()) > N_ALL / 5 * 0.85
    for level in LEVELS:
        only = ArithmeticTask(levels=[level])
        assert {only.train_problem(i).info["level"] for i in range(100)} == {level}
        assert {p.info["level"] for p in only.heldout()} == {level}


# --- SFT set ----------------------------------------------------------------------------------

def test_sft_is_narrow():
    problems = ArithmeticTask().sft_problems(300)
    assert all(re.fullmatch(r"What is \d+ [-+*/] \d+\?", p.question) for p in problems)
    assert all(p.info["level"] == 1 and p.info["template"] == "L1:what_is" for p in problems)
    assert len({p.question for p in problems}) == 300
    ops = Counter(_operators(p.info["expression"])[0] for p in problems)
    assert set(ops) == set(OPERATORS) and min(ops.values()) > 300 / 4 * 0.6


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
    ({"levels": [6]}, "levels"),
    ({"levels": [1, 6]}, "levels"),
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


@pytest.mark.parametrize("levels", [[5], [1, 5], [1, 2, 3, 4, 5]])
def test_every_level_is_a_valid_configuration(levels):
    task = ArithmeticTask(levels=levels)
    assert task.levels == tuple(sorted(levels))
    assert {p.info["level"] for p in task.heldout()} == set(levels)


def test_bad_indices_raise():
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="index"):
        task.train_problem(-1)
    with pytest.raises(ValueError, match="count"):
        task.sft_problems(-1)


def test_levels_order_does_not_matter():
    assert ArithmeticTask(levels=[3, 1]).heldout() == ArithmeticTask(levels=[1, 3]).heldout()


@pytest.mark.parametrize("levels", [DEFAULT_LEVELS, (2, 5)])
def test_train_levels_take_turns(levels):
    """Every RL step of len(levels) prompts sees each level once (a random draw starved some levels)."""
    task = ArithmeticTask(levels=levels)
    assert [task.train_problem(i).info["level"] for i in range(12)] == [levels[i % len(levels)] for i in range(12)]


def test_check_variant_adds_an_inverse_check_call_to_sft_traces():
    """check=True: "a op b" = r is followed by a call that computes r again ("b op a" where op commutes)."""
    from tirl.tasks.arithmetic import evaluate_ascii

    task = ArithmeticTask(check=True)
    problems = task.sft_problems(12)
    for p in problems:
        first, second = (c.arguments["expression"] for c in p.reference_calls)
        assert first == p.info["expression"] and evaluate_ascii(first) == int(p.answer)
        a, op, b = first.split(" ")
        assert second == (f"{b} {op} {a}" if op in "+*" else first) and evaluate_ascii(second) == int(p.answer)
    assert "check the result" in task.system_prompt(True)
    assert "check" not in task.system_prompt(False)
    assert [p.question for p in problems] == [p.question for p in ArithmeticTask().sft_problems(12)]
    with pytest.raises(ValueError, match="check must be a share between 0 and 1"):
        ArithmeticTask(check="yes")
    with pytest.raises(ValueError, match="check must be a share between 0 and 1"):
        ArithmeticTask(check=1.5)


def test_check_share_of_sft_traces():
    """check=0.5: about half of the SFT traces check their result; the same ones every time."""
    traces = ArithmeticTask(check=0.5).sft_problems(200)
    checked = [len(p.reference_calls) == 2 for p in traces]
    assert 70 < sum(checked) < 130
    assert checked == [len(p.reference_calls) == 2 for p in ArithmeticTask(check=0.5).sft_problems(200)]
    assert all(len(p.reference_calls) == 1 for p in ArithmeticTask(check=0.0).sft_problems(50))


def test_retry_share_of_sft_traces_fails_the_first_call_and_makes_it_again():
    """retry=0.5: about half of the SFT traces list the first call twice, the first marked failed (with
    check too, the check stays last); ids are call_0, call_1, ...; the same traces every time."""
    traces = ArithmeticTask(retry=0.5, check=1.0).sft_problems(200)
    retried = [p for p in traces if p.info.get("failed_calls") == (0,)]
    assert 70 < len(retried) < 130
    for p in retried:
        first, again, check = p.reference_calls
        assert first.arguments == again.arguments == {"expression": p.info["expression"]}
        assert [c.id for c in p.reference_calls] == ["call_0", "call_1", "call_2"]
    assert all(len(p.reference_calls) == 2 for p in traces if p not in retried)
    assert [p.id for p in retried] == [p.id for p in ArithmeticTask(retry=0.5).sft_problems(200)
                                       if p.info.get("failed_calls")]
    with pytest.raises(ValueError, match="retry must be a share between 0 and 1"):
        ArithmeticTask(retry=2)
