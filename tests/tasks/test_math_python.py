"""The math_python task: reasoning-gym problems, math-verify checking, CHAMP evaluation, a real rollout."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from tirl.cli import main
from tirl.tasks import TASKS
from tirl.tasks.math_python import DEFAULT_GENERATORS, MathPythonTask, champ_problems, math_python_reward
from tests.rewards.builders import alone, trajectory


@pytest.fixture(scope="module")
def task() -> MathPythonTask:
    return MathPythonTask(heldout_size=20)


def _score(text: str | None, problem, **params):
    """The reward of a one-turn trajectory answering `text` (None: a trajectory that never answered)."""
    t = trajectory(text or "", answered=text is not None)
    return math_python_reward(t, problem, alone(t), **params)


def test_registered_with_python_and_its_reward():
    cls = TASKS.get("math_python")
    assert cls is MathPythonTask and cls.default_tools == ("python",) and cls.default_reward == "math_python"


def test_stream_is_deterministic_and_mixes_the_generators(task):
    again = MathPythonTask(heldout_size=20)
    first = [task.train_problem(i) for i in range(8)]
    assert first == [again.train_problem(i) for i in range(8)]
    assert [p.info["generator"] for p in first] == list(DEFAULT_GENERATORS) * 2
    assert MathPythonTask(seed=1, heldout_size=20).train_problem(0).question != first[0].question
    assert MathPythonTask(seed=1, heldout_size=20).heldout() == task.heldout()  # held-out split ignores the seed


def test_train_and_sft_never_repeat_a_heldout_question(task):
    heldout = {p.question for p in task.heldout()}
    assert len(heldout) == 20
    assert not heldout & {task.train_problem(i).question for i in range(200)}
    assert not heldout & {p.question for p in task.sft_problems(40)}


def test_gold_answers_earn_the_reward_and_wrong_ones_do_not(task):
    for p in task.heldout()[:8]:
        good = _score(f"The result is <answer>{p.answer}</answer>", p, format_bonus=0.1)
        assert good.correct and good.total == pytest.approx(1.1), (p.question, p.answer)
        bad = _score(f"<answer>{p.answer}1</answer>", p, format_bonus=0.1)
        assert not bad.correct and bad.total == pytest.approx(0.1)
    p = task.heldout()[0]
    assert _score("I do not know", p).total == 0.0 and not _score(None, p).correct


def test_sft_programs_print_the_answer(task):
    """The reference code of every SFT problem prints exactly the gold answer (run here: it is our code)."""
    problems = task.sft_problems(9)
    assert {p.info["generator"] for p in problems} == {"basic_arithmetic", "chain_sum", "simple_equations"}
    for p in problems:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(p.reference_calls[0].arguments["code"], {})  # noqa: S102
        assert float(out.getvalue().split()[0]) == float(p.answer), p.reference_calls[0].arguments["code"]


def test_countdown_is_checked_by_its_own_verifier():
    """Any expression reaching the target with the given numbers is right, not only the generator's."""
    task = MathPythonTask(generators=["countdown"], heldout_size=2)
    p = task.heldout()[0]
    assert p.info["verify"] == "reasoning_gym"
    assert _score(f"<answer>{p.answer}</answer>", p).correct
    assert not _score("<answer>1 + 1</answer>", p).correct
    assert not _score("<answer>import os</answer>", p).correct


def test_generator_configs_and_bad_kwargs():
    task = MathPythonTask(generators={"basic_arithmetic": {"min_terms": 2, "max_terms": 2}}, heldout_size=3)
    assert all(len(p.info["generator"]) and p.question for p in task.heldout())
    with pytest.raises(ValueError, match="unknown reasoning-gym generators.*nope"):
        MathPythonTask(generators=["nope"])
    with pytest.raises(ValueError, match="generators.basic_arithmetic"):
        MathPythonTask(generators={"basic_arithmetic": {"no_such_option": 1}})
    with pytest.raises(ValueError, match="eval_set"):
        MathPythonTask(eval_set="gsm8k")
    with pytest.raises(ValueError, match="heldout_size"):
        MathPythonTask(heldout_size=0)


def test_champ_eval_set_keeps_the_checkable_problems():
    problems = champ_problems()
    assert 60 <= len(problems) <= 270
    assert len({p.id for p in problems}) == len(problems)
    by_id = {p.id: p for p in problems}
    assert by_id["champ/P_Combinatorics_1"].answer == "239"
    assert _score("<answer>239</answer>", by_id["champ/P_Combinatorics_1"]).correct
    task = MathPythonTask(eval_set="champ", heldout_size=10)
    assert [p.id for p in task.heldout()] == [p.id for p in problems[:10]]


def test_short_eval_with_the_default_model(tmp_path):
    """A real rollout: the default model, the sandboxed python tool, two problems, greedy."""
    run = tmp_path / "run"
    assert main(["eval", "--model", "embedded:SmolLM2-135M-Instruct", "--task", "math_python", f"run.dir={run}",
                 "eval.size=2", "eval.no_tools=false", "rollout.max_new_tokens=48",
                 "rollout.max_new_tokens_per_turn=24", "task.kwargs.heldout_size=2"]) == 0
    lines = [json.loads(x) for x in next(Path(run).rglob("*.jsonl")).read_text().splitlines() if x.strip()]
    assert lines and all(x["meta"]["task_id"].startswith("math_python/heldout/") for x in lines[:2])
