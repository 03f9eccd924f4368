"""The arithmetic task: exact multi-digit arithmetic, from bare expressions to word problems.

A small model cannot do 3-4 digit arithmetic in its head but can learn to call the `calculator`
tool and copy its result into `<answer>...</answer>`. The task is built for the default job:

- `sft_problems`: a NARROW cold-start set (level 1, one template "What is {a} {op} {b}?", ASCII
  operators from `sft_ops`, all four by default) that teaches the call format;
- `train_problem`: the BROAD stream (levels 1-4 by default, taking turns; many templates and
  phrasings, irrelevant numbers) that RL learns the strategy on; fixed by `seed`, each index drawn
  independently;
- `heldout`: a fixed evaluation split, independent of `seed`, stratified over `levels`, whose
  question texts never occur in the train stream or the SFT set.

The level ladder (see the templates module) is built so that RL has a signal: GRPO learns only
from problems the cold-started model solves some of the time. Levels 1-2 are bare expressions;
level 3 writes one operation in words ("Multiply 2345 by 67."), which a model cold-started on
"What is {a} {op} {b}?" already solves sometimes; level 4 is one-operation word problems. Level 5
(two-operation word problems) exists but is left out of the default `levels`: a 135M model
practically never solves one after the cold start, so within the default budget it gives RL no
learning signal and only dilutes the batch.

Question generation lives in `tirl.tasks.arithmetic_templates`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from fractions import Fraction

from tirl.tasks.arithmetic_templates import (
    ASCII_SYMBOLS,
    TEMPLATES_BY_LEVEL,
    TWO_OPERAND_SHAPES,
    Generated,
    OperandRanges,
    evaluate,
    generate,
    plain_question,
    render,
)
from tirl.tasks.base import TASKS, Problem, Task
from tirl.types import ToolCall

LEVELS = (1, 2, 3, 4, 5)
"""The difficulty levels allowed in `levels` (see the templates module)."""
DEFAULT_LEVELS = (1, 2, 3, 4)
"""The default `levels`: level 5 is left out because it gives a small model no RL signal (see above)."""
OPERATORS = ("+", "-", "*", "/")
TOOL_CHOICES = ("calculator", "python")
"""Tools the task can be set to be solved with (`tool` keyword)."""
"""Operators allowed in `sft_ops`."""
MAX_DIGITS_RANGE = (3, 6)
"""Inclusive bounds of `max_digits`."""
_MAX_ATTEMPTS = 1000
"""Regenerations tried before a collision with the held-out split is reported as a bug."""


def _rng(*key: object) -> random.Random:
    """A private RNG seeded from a key, the same on every machine and Python run."""
    digest = hashlib.sha256("/".join(str(k) for k in key).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def _problem(problem_id: str, level: int, generated: Generated, tool: str = "calculator") -> Problem:
    """Wrap a generated question; the answer and the call come from the same expression tree.

    With `tool="python"` the call is the expression as Python code (`//` for the exact divisions).
    """
    value = evaluate(generated.expression)
    if value.denominator != 1 or value <= 0:
        raise AssertionError(f"generated a non-positive or fractional answer {value} for {generated.question!r}")
    expression = render(generated.expression, ASCII_SYMBOLS)
    if tool == "python":
        call = ToolCall(id="call_0", name="python", arguments={"code": expression.replace("/", "//")})
    else:
        call = ToolCall(id="call_0", name="calculator", arguments={"expression": expression})
    return Problem(id=problem_id, question=generated.question, answer=str(value.numerator), reference_calls=(call,),
                   info={"level": level, "template": generated.template, "expression": expression})


@TASKS.register("arithmetic")
class ArithmeticTask(Task):
    """Multi-digit arithmetic (+ - * /) in five levels, from bare expressions to word problems; tool: calculator."""

    name = "arithmetic"
    default_tools = ("calculator",)
    default_reward = "arithmetic"

    def __init__(self, seed: int = 0, levels: Sequence[int] = DEFAULT_LEVELS, heldout_size: int = 100,
                 sft_ops: Sequence[str] = OPERATORS, max_digits: int = 4, tool: str = "calculator",
                 check: float = 0.0, retry: float = 0.0):
        """Validate the configuration; raises ValueError naming the bad keyword argument.

        `seed` fixes the train stream only; `levels` are the difficulty levels (from 1-5, default
        1-4) that the train stream takes in turns and the held-out split is stratified over;
        `heldout_size` is the held-out split's size;
        `sft_ops` are the operators of the narrow SFT set; `max_digits` bounds operand digits;
        `tool` is what the problems are meant to be solved with (`calculator` or `python`): it sets
        the default tools, the system prompt and the SFT traces' calls. `check` > 0 asks the model to
        check every result with a second call, and that share of the SFT traces do so (computing it
        again: "4821 * 37", then "37 * 4821"; true = 1.0): calls that a tool-efficiency reward (OTC)
        can teach the model to save without losing accuracy, and that plain GRPO has no reason to drop.
        `retry` > 0: that share of the SFT traces show the first call failing with the injected-fault
        error of `rollout.tool_fault_rate` and the same call made again: a recovery the cold-started
        model has seen (error-recovery experiments; without it a small model answers the error's "503").
        """
        if tool not in TOOL_CHOICES:
            raise ValueError(f"tool must be one of {list(TOOL_CHOICES)}, got {tool!r}")
        self.tool = tool
        self.default_tools = (tool,)
        if not isinstance(check, (int, float)) or not 0.0 <= check <= 1.0:
            raise ValueError(f"check must be a share between 0 and 1 (or true/false), got {check!r}")
        self.check = float(check)
        if not isinstance(retry, (int, float)) or not 0.0 <= retry <= 1.0:
            raise ValueError(f"retry must be a share between 0 and 1, got {retry!r}")
        self.retry = float(retry)
        self.seed = _check_int("seed", seed, lo=None)
        self.levels = _check_choices("levels", levels, LEVELS)
        self.heldout_size = _check_int("heldout_size", heldout_size, lo=1)
        self.sft_ops = _check_choices("sft_ops", sft_ops, OPERATORS)
        self.max_digits = _check_int("max_digits", max_digits, *MAX_DIGITS_RANGE)
        self._ranges = OperandRanges.for_digits(self.max_digits)
        self._heldout: list[Problem] | None = None
        self._heldout_questions: frozenset[str] = frozenset()

    def system_prompt(self, with_tools: bool) -> str:
        """Short instructions; the answer always goes in `<answer>number</answer>`."""
        if with_tools and self.check:
            return (f"Solve the problem. Use the {self.tool} tool for every calculation and check the result "
                    f"with the {self.tool} tool, then give the final answer as <answer>number</answer>.")
        if with_tools:
            return (f"Solve the problem. Use the {self.tool} tool for every calculation, "
                    "then give the final answer as <answer>number</answer>.")
        return "Solve the problem and give the final answer as <answer>number</answer>."

    def template_names(self) -> dict[int, tuple[str, ...]]:
        """Template ids this task draws from, by level (only the configured levels)."""
        return {level: TEMPLATES_BY_LEVEL[level] for level in self.levels}

    def train_problem(self, index: int) -> Problem:
        """The index-th train problem: a function of (seed, index) alone; never a held-out question.

        Levels take turns (`levels[index % len(levels)]`), so every run of len(levels) consecutive
        problems, such as one RL step of 4 prompts with the default levels, holds one of each: a random
        draw gave one level 15 prompts and another 38 in a 96-prompt run.
        """
        index = _check_int("index", index, lo=0)
        self._ensure_heldout()
        level = self.levels[index % len(self.levels)]
        for attempt in range(_MAX_ATTEMPTS):
            rng = _rng("arithmetic", "train", self.seed, index, attempt)
            generated = generate(level, rng, self._ranges)
            if generated.question not in self._heldout_questions:
                return _problem(f"arithmetic/train/{index}", level, generated, self.tool)
        raise RuntimeError(f"train problem {index}: every attempt collided with the held-out split")

    def heldout(self) -> list[Problem]:
        """The fixed held-out split (independent of `seed`): `heldout_size` problems, levels in turn.

        Problem i has level `sorted(levels)[i % len(levels)]`, so the counts per level differ by at most one
        (the first levels get the remainder) and any prefix is nearly stratified too. Question texts
        are distinct. The list is cached; a copy is returned.
        """
        self._ensure_heldout()
        assert self._heldout is not None
        return list(self._heldout)

    def sft_problems(self, count: int) -> list[Problem]:
        """The narrow SFT set: "What is {a} {op} {b}?" with ASCII `op` from `sft_ops`, level 1.

        Deterministic and independent of `seed`; `sft_problems(n)[:k] == sft_problems(k)`; question
        texts are distinct and never held-out questions.
        """
        count = _check_int("count", count, lo=0)
        self._ensure_heldout()
        seen = set(self._heldout_questions)
        problems = []
        for i in range(count):
            generated = self._fresh(seen, "sft", i, self._sft_question)
            seen.add(generated.question)
            problem = _problem(f"arithmetic/sft/{i}", 1, generated, self.tool)
            checks = self.check > 0 and _rng("arithmetic", "check", i).random() < self.check
            problem = _with_check(problem, self.tool) if checks else problem
            retries = self.retry > 0 and _rng("arithmetic", "retry", i).random() < self.retry
            problems.append(_with_retry(problem) if retries else problem)
        return problems

    def _sft_question(self, rng: random.Random) -> Generated:
        shape = TWO_OPERAND_SHAPES[rng.choice(self.sft_ops)]
        return plain_question(1, "what_is", shape, ASCII_SYMBOLS, rng, self._ranges)

    def _ensure_heldout(self) -> None:
        """Build the held-out split once (keyed on a constant, not on `seed`)."""
        if self._heldout is not None:
            return
        seen: set[str] = set()
        problems = []
        for i in range(self.heldout_size):
            level = self.levels[i % len(self.levels)]
            generated = self._fresh(seen, "heldout", i, lambda rng, lv=level: generate(lv, rng, self._ranges))
            seen.add(generated.question)
            problems.append(_problem(f"arithmetic/heldout/{i}", level, generated, self.tool))
        self._heldout = problems
        self._heldout_questions = frozenset(seen)

    def _fresh(self, taken: set[str], split: str, index: int,
               make: Callable[[random.Random], Generated]) -> Generated:
        """The first question from `make(rng)` over attempts 0, 1, ... whose text is not in `taken`."""
        for attempt in range(_MAX_ATTEMPTS):
            generated = make(_rng("arithmetic", split, index, attempt))
            if generated.question not in taken:
                return generated
        raise RuntimeError(f"{split} problem {index}: no new question in {_MAX_ATTEMPTS} attempts")


def _with_check(problem: Problem, tool: str) -> Problem:
    """The SFT problem `a op b` with a second reference call that checks the result by computing it
    again: `b op a` where op commutes, else `a op b` once more. The check gives the same number, so
    the answer after it is the same as without it: a call a tool-efficient policy can save."""
    a, op, b = problem.info["expression"].split(" ")
    expression = f"{b} {op} {a}" if op in "+*" else f"{a} {op} {b}"
    if evaluate_ascii(expression) != int(problem.answer):
        raise AssertionError(f"check {expression} of {problem.info['expression']} does not give {problem.answer}")
    if tool == "python":
        call = ToolCall(id="call_1", name="python", arguments={"code": expression.replace("/", "//")})
    else:
        call = ToolCall(id="call_1", name="calculator", arguments={"expression": expression})
    return replace(problem, reference_calls=(*problem.reference_calls, call))


def _with_retry(problem: Problem) -> Problem:
    """The first reference call twice, the first time failing (`info["failed_calls"]`); ids renumbered."""
    first, *rest = problem.reference_calls
    calls = tuple(replace(c, id=f"call_{k}") for k, c in enumerate((first, first, *rest)))
    return replace(problem, reference_calls=calls, info={**problem.info, "failed_calls": (0,)})


def evaluate_ascii(expression: str) -> Fraction:
    """Value of `"a op b"` (integers, one ASCII operator), exactly."""
    a, op, b = expression.split(" ")
    x, y = Fraction(int(a)), Fraction(int(b))
    return {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op]


def _check_int(kwarg: str, value: object, lo: int | None, hi: int | None = None) -> int:
    """`value` as an int within [lo, hi]; ValueError naming `kwarg` otherwise (bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{kwarg} must be an int, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"{kwarg} must be {bounds}, got {value}")
    return value


def _check_choices(kwarg: str, values: object, allowed: tuple) -> tuple:
    """A non-empty sequence of distinct members of `allowed`, as a sorted tuple; ValueError naming `kwarg`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{kwarg} must be a non-empty list drawn from {list(allowed)}, got {values!r}")
    bad = [v for v in values if not isinstance(v, type(allowed[0])) or isinstance(v, bool) or v not in allowed]
    if bad:
        raise ValueError(f"{kwarg} has invalid entries {bad!r}; allowed: {list(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{kwarg} has duplicates: {list(values)!r}")
    return tuple(sorted(values))
