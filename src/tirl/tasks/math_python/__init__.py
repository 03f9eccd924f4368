"""The `math_python` task: math word problems solved with the sandboxed Python interpreter (ReTool/ToRA style).

Problems come from reasoning-gym's procedural generators (seeded, unlimited, offline): by default
`gsm_symbolic` (GSM8K-derived templates), `basic_arithmetic`, `chain_sum` and `simple_equations`;
`countdown` and any other generator can be named. Numeric answers are checked with math-verify
(`math_python` reward, like `math_verify`); a generator whose answers are not unique (countdown: any
expression reaching the target) is checked with its own reasoning-gym verifier. `eval_set="champ"`
evaluates on the CHAMP competition problems (champ-dataset) whose gold answer math-verify can read.

- `train_problem(i)`: generator `generators[i % n]`, its own problem number `i // n`, each drawn from a
  dataset seeded by (seed, generator, number), so a stream is the same on every machine;
- `heldout()`: `heldout_size` problems split evenly over the generators, seeded independently of `seed`;
  a train problem whose question equals a held-out one is replaced by the next draw;
- `sft_problems`: reference calls for the generators where a short program is easy to write (arithmetic
  expressions printed, an equation solved by a search over integers); others give none.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tirl.errors import DataError
from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.rewards.math import math_equal, parse_gold
from tirl.rewards.qa import read_answer
from tirl.tasks.base import TASKS, Problem, Task
from tirl.types import ToolCall, Trajectory

DEFAULT_GENERATORS = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "simple_equations")
"""Generators used when `generators` is not given (all with unique numeric answers)."""
OWN_VERIFIER = frozenset({"countdown", "puzzle24"})
"""Generators whose answers are not unique: checked by reasoning-gym's `score_answer`, not math-verify."""
EVAL_SETS = ("generated", "champ")
INSTALL_HINT = "pip install 'tirl[envs]'"
_REDRAWS = 100
"""Redraws of a train problem that collides with the held-out split before that is reported as a bug."""


def _seed(*key: object) -> int:
    """A 31-bit seed from a key, the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, key)).encode()).digest()[:4], "big") >> 1


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as e:
        raise DataError(f"the math_python task needs reasoning-gym: {INSTALL_HINT}") from e
    return reasoning_gym


def draw(generator: str, seed: int, config: Mapping[str, Any] | None = None) -> dict:
    """One reasoning-gym entry (question, answer, metadata) from `generator` seeded with `seed`."""
    return _reasoning_gym().create_dataset(generator, size=1, seed=seed, **dict(config or {}))[0]


@TASKS.register("math_python")
class MathPythonTask(Task):
    """Math word problems (reasoning-gym: gsm_symbolic, arithmetic, equations, countdown) with the python tool; math-verify."""

    name = "math_python"
    default_tools = ("python",)
    default_reward = "math_python"

    def __init__(self, seed: int = 0, generators: Sequence[str] | Mapping[str, Mapping[str, Any]] = DEFAULT_GENERATORS,
                 heldout_size: int = 100, eval_set: str = "generated"):
        """`generators`: names, or a mapping name -> that generator's reasoning-gym config (difficulty)."""
        if isinstance(generators, Mapping):
            self.configs = {str(k): dict(v or {}) for k, v in generators.items()}
        elif isinstance(generators, (list, tuple)) and generators:
            self.configs = {str(g): {} for g in generators}
        else:
            raise ValueError(f"generators must be a non-empty list of names or a mapping, got {generators!r}")
        known = set(_reasoning_gym().factory.DATASETS)
        unknown = sorted(set(self.configs) - known)
        if unknown:
            raise ValueError(f"unknown reasoning-gym generators {unknown}; valid: {', '.join(sorted(known))}")
        if not isinstance(heldout_size, int) or heldout_size < 1:
            raise ValueError(f"heldout_size must be a positive integer, got {heldout_size!r}")
        if eval_set not in EVAL_SETS:
            raise ValueError(f"eval_set must be one of {EVAL_SETS}, got {eval_set!r}")
        self.seed, self.heldout_size, self.eval_set = seed, heldout_size, eval_set
        self.generators = tuple(self.configs)
        for g, cfg in self.configs.items():  # a bad difficulty config fails now, naming the generator
            try:
                draw(g, 0, cfg)
            except Exception as e:
                raise ValueError(f"generators.{g}: reasoning-gym rejects config {cfg}: {e}") from None
        self._heldout: list[Problem] | None = None
        self._heldout_questions: set[str] | None = None

    def system_prompt(self, with_tools: bool) -> str:
        if with_tools:
            return ("Solve the math problem. Write Python code and run it with the python tool to compute the "
                    'result, for example <tool_call>{"name": "python", "arguments": {"code": "print(48 + 48 / 2)"}}'
                    "</tool_call>, then give only the final answer as <answer>...</answer>.")
        return "Solve the math problem step by step, then give only the final answer as <answer>...</answer>."

    def train_problem(self, index: int) -> Problem:
        generator = self.generators[index % len(self.generators)]
        number = index // len(self.generators)
        taken = self._heldout_set()
        for redraw in range(_REDRAWS):
            entry = draw(generator, _seed("train", self.seed, generator, number, redraw), self.configs[generator])
            if entry["question"] not in taken:
                return _problem(f"math_python/train/{generator}/{number}", generator, entry)
        raise AssertionError(f"{generator}: {_REDRAWS} draws all collided with the held-out split")

    def heldout(self) -> list[Problem]:
        if self._heldout is None:
            self._heldout = champ_problems()[: self.heldout_size] if self.eval_set == "champ" else self._generated()
        return list(self._heldout)

    def sft_problems(self, count: int) -> list[Problem]:
        scripted = [g for g in self.generators if g in _PROGRAMS]
        if not scripted:
            raise NotImplementedError(f"task 'math_python' has no SFT traces for generators {list(self.generators)} "
                                      f"(it has them for {sorted(_PROGRAMS)})")
        taken, out, number = self._heldout_set(), [], 0
        while len(out) < count:
            g = scripted[number % len(scripted)]
            entry = draw(g, _seed("sft", self.seed, g, number), self.configs[g])
            number += 1
            if entry["question"] in taken:
                continue
            code = _PROGRAMS[g](entry)
            call = ToolCall(id="call_0", name="python", arguments={"code": code})
            out.append(_problem(f"math_python/sft/{g}/{number - 1}", g, entry, (call,)))
        return out

    def _generated(self) -> list[Problem]:
        out = []
        for k in range(self.heldout_size):
            g = self.generators[k % len(self.generators)]
            entry = draw(g, _seed("heldout", g, k), self.configs[g])
            out.append(_problem(f"math_python/heldout/{g}/{k}", g, entry))
        return out

    def _heldout_set(self) -> set[str]:
        if self._heldout_questions is None:
            self._heldout_questions = {p.question for p in self._generated()}
        return self._heldout_questions


def _problem(problem_id: str, generator: str, entry: dict, calls: tuple[ToolCall, ...] = ()) -> Problem:
    info: dict[str, Any] = {"generator": generator, "level": generator}
    if generator in OWN_VERIFIER:
        info["verify"] = "reasoning_gym"
        info["entry"] = json.loads(json.dumps(entry, default=str))
    else:
        info["verify"] = "math_verify"
    return Problem(id=problem_id, question=entry["question"], answer=str(entry["answer"]), reference_calls=calls,
                   info=info)


def _arithmetic_program(entry: dict) -> str:
    expression = entry["metadata"]["expression"].replace("^", "**")
    return f"print({expression})"


def _equation_program(entry: dict) -> str:
    meta = entry["metadata"]
    left, right = meta["equation"].split("=")
    v = meta["variable"]
    return (f"for {v} in range(-10000, 10001):\n    if {left.strip()} == {right.strip()}:\n"
            f"        print({v})")


_PROGRAMS = {"basic_arithmetic": _arithmetic_program, "chain_sum": _arithmetic_program,
             "simple_equations": _equation_program}
"""Generators with SFT programs: the code a careful solver would run."""


def champ_problems() -> list[Problem]:
    """CHAMP's problems whose gold answer math-verify can read (the rest have free-form answers)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"eval_set='champ' needs the champ-dataset package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json"
    try:
        problems = json.loads(path.read_text())["problems"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: cannot read CHAMP's problems: {e}") from e
    out = []
    for pid, p in sorted(problems.items()):
        answer = _champ_answer(p.get("_answer") or "")
        try:
            parse_gold(answer, pid)
        except ValueError:
            continue
        out.append(Problem(id=f"champ/{pid}", question=p["_text"], answer=answer,
                           info={"level": p.get("category", ""), "verify": "math_verify"}))
    return out


def _champ_answer(text: str) -> str:
    """The checkable part of a CHAMP answer ('C(10, 5), or equivalently 252' -> '252'); plain answers as is."""
    m = re.search(r"equivalently,?\s*(.+)$", text)
    answer = (m.group(1) if m else text).strip().rstrip(".")
    return answer if re.fullmatch(r"-?[\d./^()*+\- ]+|\\?\w+\{.*\}.*", answer) else ""


@REWARDS.register("math_python")
def math_python_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *,
                       format_bonus: float = 0.0) -> RewardResult:
    """math_python answer check: math-verify equivalence of <answer> with the gold, or reasoning-gym's verifier (countdown).

    1.0 for a correct answer plus `format_bonus` for a non-empty tagged answer; a trajectory that did not
    end by answering scores 0."""
    answer = read_answer(trajectory.final_answer)
    if problem.info.get("verify") == "reasoning_gym":
        correct = answer is not None and _own_verifier(answer, problem) >= 1.0
    else:
        correct = math_equal(answer, problem.answer, problem.id)
    components = {"correct": 1.0 if correct else 0.0, "format": format_bonus if answer else 0.0}
    return RewardResult(total=sum(components.values()), components=components, correct=correct)


def _own_verifier(answer: str, problem: Problem) -> float:
    entry = problem.info["entry"]
    generator = problem.info["generator"]
    dataset = _reasoning_gym().create_dataset(generator, size=1, seed=0)
    try:
        return float(dataset.score_answer(answer, entry))
    except Exception:  # model output the verifier chokes on is a wrong answer, not a crash
        return 0.0
