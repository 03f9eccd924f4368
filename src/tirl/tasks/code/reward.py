"""The `humaneval_pass` reward: the problem's unit tests run against the model's function, in the sandbox.

Answer format (what the reward reads): the final assistant message ends with `<answer>...</answer>`
holding the completed function, as a fenced block (the last one in the tag is taken) or as bare code:

    <answer>
    ```python
    def add(a: int, b: int) -> int:
        return a + b
    ```
    </answer>

The function must be complete, its `def` line included; imports and helper functions may come with it.
A body without its `def` line, or no tag at all, scores 0. With `require_tag=false` (for evaluating
chat models as they are) an untagged message is read too: its last fenced block that defines the
function, else its last fenced block.

The program that runs is the problem's prompt (its imports and helper functions; its stub of the
function is then redefined), the answer's code, the problem's test code, `check(<entry point>)`, and
a random marker as the last expression. It runs in a fresh interpreter of a warm sandbox pool
(`tirl.sandbox`; bubblewrap by default, with a wall-clock limit, memory and CPU limits), never in the
trainer's process. It passes when it ends without an error and its last value is the marker, so the
tests really ran to the end. Like the official HumanEval harness, the tests compare with `==`: an
answer returning an object whose `__eq__` is always true would pass (no policy of ours has found this).

Components (reported as `reward/<name>`): `format` 1 when the tag holds code; `extracted` 1 when the
code parses and defines the entry-point function at top level; `passed` 1 when all tests pass. The
total is `passed` (plus `format_bonus` when `format` is 1). A malformed answer scores 0; it never raises.
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import re
import secrets
import textwrap
import threading
from dataclasses import dataclass
from typing import Any

from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.sandbox import LEVELS, Limits, SandboxConfig, SandboxPool, start_pool
from tirl.tasks.base import Problem
from tirl.types import Trajectory

MAX_CODE_CHARS = 20_000
"""Longer answers are not run (`extracted` 0)."""
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_FENCE_OPEN = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n", re.IGNORECASE)
_INFO_KEYS = ("prompt", "test", "entry_point")


def answer_code(text: str | None) -> str | None:
    """The code of the last `<answer>...</answer>` in `text`: the last fenced block inside the tag
    (a missing closing fence runs to the tag's end), else the tag's whole content; dedented.
    None when there is no tag or it holds only blanks."""
    if text is None:
        return None
    end = text.rfind(_ANSWER_CLOSE)
    start = text.rfind(_ANSWER_OPEN, 0, end) if end >= 0 else -1
    if start < 0:
        return None
    content = text[start + len(_ANSWER_OPEN):end]
    blocks = fenced_blocks(content)
    code = textwrap.dedent(blocks[-1] if blocks else content).strip("\n")
    return code if code.strip() else None


def untagged_code(text: str | None, entry_point: str) -> str | None:
    """The last fenced block of `text` that defines `entry_point`, else its last fenced block (dedented)."""
    blocks = [textwrap.dedent(b).strip("\n") for b in fenced_blocks(text or "")]
    defining = [b for b in blocks if defines_function(b, entry_point)]
    return (defining or blocks or [None])[-1]


def fenced_blocks(text: str) -> list[str]:
    """The contents of the ```-fenced blocks of `text`, in order; an unclosed last block runs to the end."""
    blocks, pos = [], 0
    while (opening := _FENCE_OPEN.search(text, pos)) is not None:
        close = text.find("```", opening.end())
        blocks.append(text[opening.end():] if close < 0 else text[opening.end():close])
        if close < 0:
            break
        pos = close + 3
    return blocks


def defines_function(code: str, name: str) -> bool:
    """Whether `code` parses and defines the function `name` at top level (parsed, never run)."""
    if len(code) > MAX_CODE_CHARS:
        return False
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name for node in tree.body)


def check_program(prompt: str, code: str, test: str, entry_point: str, marker: str) -> str:
    """The program run in the sandbox: prompt (imports, helpers), answer, tests, the check, the marker."""
    return f"{prompt}\n\n{code}\n\n{test}\n\ncheck({entry_point})\n{marker!r}\n"


@dataclass(frozen=True)
class CheckResult:
    """How one answer did against one problem's tests."""

    passed: bool
    status: str
    """The sandbox's status: ok | error | timeout | crashed."""
    error: str | None = None
    """The short traceback, time-out or crash reason."""


_POOLS: dict[SandboxConfig, SandboxPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(config: SandboxConfig) -> SandboxPool:
    """The started pool of `config` (started and probed on first use; shared by every reward call)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(config)
        if pool is None or pool.closed:
            pool = _POOLS[config] = start_pool(config)
        return pool


@atexit.register
def close_pools() -> None:
    """Kill every sandbox the reward started (at exit; tests call it too)."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


def sandbox_config(isolation: str = "bwrap", memory_mb: int = 1024, max_sandboxes: int = 4) -> SandboxConfig:
    """The sandbox the tests run in: no preloads (the tests import what they use)."""
    return SandboxConfig(isolation=isolation, limits=Limits(memory_mb=memory_mb, max_output_bytes=4096),
                         preload=(), max_sandboxes=max_sandboxes)


async def run_tests(problem: Problem, code: str, timeout_s: float, config: SandboxConfig) -> CheckResult:
    """Run `problem`'s tests against `code` in a fresh sandboxed interpreter."""
    info = _problem_info(problem)
    marker = f"tirl-tests-done-{secrets.token_hex(8)}"
    program = check_program(info["prompt"], code, info["test"], info["entry_point"], marker)
    pool = await asyncio.to_thread(_pool, config)
    result = await pool.run(program, timeout_s)
    passed = result.status == "ok" and result.value == repr(marker)
    return CheckResult(passed, result.status, result.error)


def _problem_info(problem: Problem) -> dict[str, str]:
    missing = [k for k in _INFO_KEYS if not isinstance(problem.info.get(k), str)]
    if missing:
        raise ValueError(f"problem {problem.id!r} has no {missing[0]!r} in its info (humaneval_pass needs "
                         f"{', '.join(_INFO_KEYS)}); is it a `code` task problem?")
    return {k: problem.info[k] for k in _INFO_KEYS}


@REWARDS.register("humaneval_pass")
async def humaneval_pass(trajectory: Trajectory, problem: Problem, group: GroupContext, timeout_s: float = 10.0,
                         isolation: str = "bwrap", memory_mb: int = 1024, max_sandboxes: int = 4,
                         format_bonus: float = 0.0, require_tag: bool = True) -> RewardResult:
    """HumanEval unit tests: 1 when the function in <answer> passes all of them, run in the sandbox (code task).

    Parameters: `timeout_s` wall-clock seconds for the tests, `isolation` the sandbox level (bwrap;
    weaker levels warn loudly), `memory_mb` its memory, `max_sandboxes` sandboxes running tests at
    once, `format_bonus` paid when the tag holds code, `require_tag` false to also read untagged code
    blocks. See the module docstring for the format.
    """
    entry_point = _problem_info(problem)["entry_point"]
    tagged = answer_code(trajectory.final_answer)
    code = tagged if tagged is not None or require_tag else untagged_code(trajectory.final_answer, entry_point)
    extracted = code is not None and defines_function(code, entry_point)
    passed = False
    if extracted:
        config = sandbox_config(isolation, memory_mb, max_sandboxes)
        passed = (await run_tests(problem, code, timeout_s, config)).passed
    components = {"format": float(tagged is not None), "extracted": float(extracted), "passed": float(passed)}
    return RewardResult(total=float(passed) + format_bonus * components["format"], components=components,
                        correct=passed)


def _validate(params: dict[str, Any], task_reward: str) -> None:
    """Reject bad parameters before any work starts (called by `tirl.rewards.base.check_params`)."""
    if params.get("isolation", "bwrap") not in LEVELS:
        raise ValueError(f"reward 'humaneval_pass': isolation must be one of {list(LEVELS)}, "
                         f"got {params['isolation']!r}")
    rules = (("timeout_s", lambda v: v > 0, "> 0"), ("memory_mb", lambda v: v >= 16, "an int >= 16"),
             ("max_sandboxes", lambda v: v >= 1, "an int >= 1"), ("format_bonus", lambda v: True, "a number"))
    if not isinstance(params.get("require_tag", True), bool):
        raise ValueError(f"reward 'humaneval_pass': require_tag must be true or false, got {params['require_tag']!r}")
    for key, ok, rule in rules:
        if key not in params:
            continue
        value = params[key]
        integer = key in ("memory_mb", "max_sandboxes")
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not ok(value):
            raise ValueError(f"reward 'humaneval_pass': {key} must be {rule}, got {value!r}")


humaneval_pass.validate = _validate  # type: ignore[attr-defined]
