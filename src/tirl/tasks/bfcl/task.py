"""The `function_calling` task: BFCL v4 problems, each with its own functions.

Categories are chosen with `categories` (BFCL's names; see `tirl.tasks.bfcl.data.CATEGORIES`). Each
category is split once: a deterministic share of it (fixed by `split_seed`, never by `seed`) goes to
the held-out split, the rest to the train stream.

- `heldout()`: `heldout_size` problems, the categories taking turns (sorted by name), at most half of any
  category (a small category runs out and the others go on); a category is drawn in a fixed order keyed
  on `split_seed` and the problem id.
- `train_problem(i)`: the categories take turns too (`categories[i % k]`, so every run of k consecutive
  problems holds one of each, whatever their sizes), and each category's train problems are visited in
  a fresh order every epoch (keyed on `seed`, the epoch and the id).

The default categories are BFCL's single-turn Python ones (non-live and live, irrelevance included).
Multi-turn categories (`multi_turn_base`, `multi_turn_miss_func`, `multi_turn_miss_param`,
`multi_turn_long_context`) are opt-in: their function docs alone take several thousand tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from tirl.errors import ConfigError
from tirl.tasks.base import TASKS, Problem, Task
from tirl.tasks.bfcl.data import default_data_dir, kind_of, load_category, resolve_category

if TYPE_CHECKING:
    from tirl.envs.base import Env
    from tirl.envs.tool_env import ToolLimits
    from tirl.tools.toolset import ToolSet

DEFAULT_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance", "live_simple",
                      "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance")
"""The default `categories`: every single-turn Python category but the 16-problem live_relevance."""

INSTRUCTIONS = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. "
    "Based on the question, make one or more function calls to achieve the purpose, one tool call per function "
    "call, and nothing else. If none of the functions can be used, point it out and make no call. If the "
    "question lacks the parameters a function requires, also point it out.")
"""The single-turn system prompt (after BFCL's)."""
MULTI_TURN_INSTRUCTIONS = (
    "At each turn, try your best to complete the tasks the user asks for within the current turn. Keep calling "
    "functions until you have fulfilled the request to the best of your ability; each result comes back to you. "
    "When you have no more functions to call, answer without a call: the turn is then complete.")
"""Added for multi-turn categories (after BFCL's multi-turn behaviour paragraph)."""
THINK = "Start every reply with your reasoning inside <think>...</think>."
"""Added with `think=true` (the format ToolRL's reward asks for)."""


def _order_key(*parts: object) -> str:
    """A sort key the same on every machine and Python run."""
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()


@TASKS.register("function_calling")
class FunctionCallingTask(Task):
    """BFCL v4 function calling: single-turn AST, irrelevance, multi-turn on BFCL's back-ends; each problem's tools."""

    name = "function_calling"
    default_tools = ()
    default_reward = "bfcl"
    problem_tools = True

    def __init__(self, categories: Sequence[str] = DEFAULT_CATEGORIES, seed: int = 0, split_seed: int = 0,
                 heldout_size: int = 100, think: bool = False, max_prompt_chars: int | None = None,
                 data_dir: str | None = None):
        """Load and check the data; raises ValueError naming the bad keyword argument.

        `categories`: BFCL category names (`simple` = `simple_python`); `seed` orders the train stream;
        `split_seed` fixes which problems are held out; `heldout_size`: size of the held-out split;
        `think`: ask for a `<think>` block first (ToolRL's format); `max_prompt_chars`: keep only problems
        whose first-turn messages and function docs (as JSON) total at most this many characters, before
        splitting (None: all; long prompts cost memory quadratically in training on CPU); `data_dir`: a
        directory laid out like `bfcl_eval/data` (default: the installed package's)."""
        if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence) or not categories:
            raise ValueError(f"categories must be a non-empty list of BFCL categories, got {categories!r}")
        resolved = [resolve_category(c) for c in categories]
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"categories has duplicates: {list(categories)!r}")
        self.categories = tuple(sorted(resolved))
        self.seed = _check_int("seed", seed, lo=None)
        self.split_seed = _check_int("split_seed", split_seed, lo=None)
        self.heldout_size = _check_int("heldout_size", heldout_size, lo=1)
        if not isinstance(think, bool):
            raise ValueError(f"think must be true or false, got {think!r}")
        self.think = think
        if data_dir is not None and not Path(data_dir).is_dir():
            raise ValueError(f"data_dir {data_dir!r} is not a directory")
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.multi_turn = any(kind_of(c) == "multi_turn" for c in self.categories)
        if max_prompt_chars is not None:
            _check_int("max_prompt_chars", max_prompt_chars, lo=1)
        self.max_prompt_chars = max_prompt_chars
        self._by_category = {c: self._short_enough(load_category(self.data_dir, c)) for c in self.categories}
        self._heldout, self._train = self._split()

    def _short_enough(self, problems: list[Problem]) -> list[Problem]:
        if self.max_prompt_chars is None:
            return problems
        kept = [p for p in problems if prompt_chars(p) <= self.max_prompt_chars]
        if not kept:
            category = problems[0].info["category"] if problems else "?"
            raise ValueError(f"max_prompt_chars={self.max_prompt_chars} leaves no problem of {category!r}")
        return kept

    # ----------------------------------------------------------------------------------------- prompts
    def system_prompt(self, with_tools: bool, multi_turn: bool = False) -> str:
        """BFCL's instructions (plus the multi-turn paragraph and the think request where they apply);
        without tools: answer the user directly."""
        if not with_tools:
            parts = ["Answer the user's request as well as you can."]
        else:
            parts = [INSTRUCTIONS, *([MULTI_TURN_INSTRUCTIONS] if multi_turn else [])]
        return "\n\n".join([*parts, *([THINK] if self.think else [])])

    def make_env(self, problem: Problem, tools: ToolSet, limits: ToolLimits, with_tools: bool) -> Env:
        """One episode showing `problem`'s own functions: single-turn or multi-turn by its category.
        The run's tools are not offered (`task.tools` must stay empty)."""
        from tirl.tasks.bfcl.envs import MultiTurnEnv, SingleTurnEnv

        if len(tools):
            raise ConfigError(f"task function_calling shows each problem its own functions; task.tools "
                              f"{tools.names} would never be offered: leave task.tools unset")
        if problem.info.get("kind") == "multi_turn":
            return MultiTurnEnv(problem, self.system_prompt(with_tools, multi_turn=True), with_tools, tools, limits)
        return SingleTurnEnv(problem, self.system_prompt(with_tools), with_tools, tools)

    # ----------------------------------------------------------------------------------------- splits
    def train_problem(self, index: int) -> Problem:
        """The index-th train problem: categories take turns, each visited in a fresh order per epoch."""
        index = _check_int("index", index, lo=0)
        category = self.categories[index % len(self.categories)]
        pool = self._train[category]
        epoch, position = divmod(index // len(self.categories), len(pool))
        return pool[self._epoch_order(category, epoch)[position]]

    @lru_cache(maxsize=256)  # noqa: B019  (one task per run; the cache lives as long as it)
    def _epoch_order(self, category: str, epoch: int) -> tuple[int, ...]:
        pool = self._train[category]
        return tuple(sorted(range(len(pool)), key=lambda i: _order_key("train", self.seed, epoch, pool[i].id)))

    def heldout(self) -> list[Problem]:
        """The fixed held-out split (see the module docstring); a copy."""
        return list(self._heldout)

    def _split(self) -> tuple[list[Problem], dict[str, list[Problem]]]:
        drawn = {c: sorted(ps, key=lambda p: _order_key("heldout", self.split_seed, p.id))
                 for c, ps in self._by_category.items()}
        cap = {c: len(ps) // 2 for c, ps in drawn.items()}
        capacity = sum(cap.values())
        if self.heldout_size > capacity:
            raise ValueError(f"heldout_size {self.heldout_size} is more than the {capacity} problems that can be "
                             f"held out of {list(self.categories)} (at most half of each category)")
        taken = dict.fromkeys(drawn, 0)
        heldout: list[Problem] = []
        while len(heldout) < self.heldout_size:
            for c in self.categories:
                if taken[c] < cap[c] and len(heldout) < self.heldout_size:
                    heldout.append(drawn[c][taken[c]])
                    taken[c] += 1
        held = {p.id for p in heldout}
        train = {c: [p for p in ps if p.id not in held] for c, ps in self._by_category.items()}
        return heldout, train

    def problems(self, category: str) -> list[Problem]:
        """Every loaded problem of `category`, in file order (held-out and train alike)."""
        return list(self._by_category[resolve_category(category)])

    def final_answer_text(self, problem: Problem) -> str:
        return ""


def prompt_chars(problem: Problem) -> int:
    """Characters of a problem's first-turn messages plus its function docs as JSON (what `max_prompt_chars` bounds)."""
    return len(json.dumps(problem.info["tools"])) + sum(len(m["content"]) for m in problem.info["messages"])


def _check_int(kwarg: str, value: object, lo: int | None) -> int:
    """`value` as an int >= lo; ValueError naming `kwarg` otherwise (bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{kwarg} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{kwarg} must be >= {lo}, got {value}")
    return value
