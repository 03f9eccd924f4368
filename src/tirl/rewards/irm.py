"""TL-Training IRM error-category reward (Ye et al. 2024, arXiv 2412.15495): one score per kind of tool-call mistake.

The predicted call is compared with the gold call; the first rule that applies gives the reward:

    -2    no parseable call, or the tool is not in the tool list
    -1.5  a different tool than the gold one
    with hal = predicted keys not in the tool's schema, red = predicted keys that are schema keys but
    not gold keys, mis = gold keys the prediction lacks:
    -1.8  hal and red and mis
    -1.3  hal and (red or mis)
    -1.0  red and mis
    -0.8  hal
    -0.5  red or mis
    -0.25 same keys, some value differs
    +1    exact match
The reward is clipped to [-5, 5] (a no-op for these values, kept from the paper's PPO setup).

Mapping onto tirl: the paper scores one generated call, `tool(k='v', ...)`. Here the predicted call is
the trajectory's first call attempt (the first tool result, in order): an attempt that could not be
parsed (`invalid_call`), or no attempt at all, is the paper's parse failure. The gold call is the first
of `problem.info["gold_calls"]` / `problem.reference_calls` (as for ToolRL). The tool list and schemas
come from `problem.info["tools"]` (OpenAI function-tool dicts or `{"name", "parameters"}` JSON
schemas); without it the tool list is what the env knew (a result with status `unknown_tool` is a
tool outside the list) and, as in the paper's code for a tool without a known signature, hal and red
are never set. Values are compared as JSON values (`"5"` differs from `5`); the paper compared the
quoted strings it parsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.rewards.toolrl import gold_calls
from tirl.tasks.base import Problem
from tirl.types import ToolCall, ToolStatus, Trajectory

CATEGORY_REWARDS: dict[str, float] = {
    "parse_error": -2.0,
    "unknown_tool": -2.0,
    "wrong_tool": -1.5,
    "hal_red_mis": -1.8,
    "hal_and_red_or_mis": -1.3,
    "red_mis": -1.0,
    "hal": -0.8,
    "red_or_mis": -0.5,
    "wrong_values": -0.25,
    "exact": 1.0,
}
"""The error categories in rule order, with their rewards."""

CLIP = 5.0


def irm_category(pred_name: str | None, pred_args: Mapping[str, Any], gold_name: str, gold_args: Mapping[str, Any],
                 known_tool: bool, schema_keys: set[str] | None) -> str:
    """The first IRM rule that applies (a key of `CATEGORY_REWARDS`).

    `pred_name` None: no parseable call. `known_tool`: the predicted tool is in the tool list.
    `schema_keys`: the predicted tool's parameter names (None: unknown, so hal and red stay False)."""
    if pred_name is None:
        return "parse_error"
    if not known_tool:
        return "unknown_tool"
    if pred_name != gold_name:
        return "wrong_tool"
    hal = schema_keys is not None and not set(pred_args) <= schema_keys
    red = schema_keys is not None and any(k not in gold_args and k in schema_keys for k in pred_args)
    mis = any(k not in pred_args for k in gold_args)
    if hal and red and mis:
        return "hal_red_mis"
    if hal and (red or mis):
        return "hal_and_red_or_mis"
    if red and mis:
        return "red_mis"
    if hal:
        return "hal"
    if red or mis:
        return "red_or_mis"
    if dict(pred_args) != dict(gold_args):
        return "wrong_values"
    return "exact"


def tool_schemas(problem: Problem) -> dict[str, set[str]] | None:
    """{tool name: its parameter names} from `problem.info["tools"]`; None when the problem gives none."""
    if "tools" not in problem.info:
        return None
    raw = problem.info["tools"]
    if isinstance(raw, (str, Mapping)) or not isinstance(raw, (list, tuple)):
        raise ValueError(f"problem {problem.id!r}: info['tools'] must be a list of JSON tool schemas, got {raw!r}")
    out = {}
    for schema in raw:
        fn = schema.get("function", schema) if isinstance(schema, Mapping) else None
        params = fn.get("parameters", {}) if isinstance(fn, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not isinstance(params, Mapping) \
                or not isinstance(params.get("properties", {}), Mapping):
            raise ValueError(f"problem {problem.id!r}: info['tools'] holds {schema!r}, not a tool schema "
                             "({'name', 'parameters': {'properties': ...}} or OpenAI's {'type': 'function', ...})")
        out[fn["name"]] = set(params.get("properties", {}))
    return out


def first_call(trajectory: Trajectory) -> tuple[ToolCall | None, ToolStatus | None]:
    """The trajectory's first call attempt and its status; (None, status) if it could not be parsed
    (no `ToolCall` answers the result), (None, None) if the trajectory made no attempt."""
    for turn in trajectory.turns:
        if turn.tool_results:
            result = turn.tool_results[0]
            call = next((c for c in turn.tool_calls if c.id == result.call_id), None)
            return (None if result.status is ToolStatus.INVALID_CALL else call), result.status
    return None, None


@REWARDS.register("irm")
def irm_reward(trajectory: Trajectory, problem: Problem, group: GroupContext) -> RewardResult:
    """TL-Training IRM: -2 unknown tool/unparsed, -1.5 wrong tool, -1.8..-0.5 bad keys, -0.25 values, +1 exact.

    Bad keys: hallucinated (not in the schema), redundant (schema keys the gold lacks), missing (gold
    keys the call lacks), -1.8 for all three down to -0.5 for redundant or missing alone. Scores the
    trajectory's first call attempt against the problem's first gold call; components are the reward
    (`irm`) and a 0/1 indicator per error category (`irm_<category>`)."""
    gold = gold_calls(problem)
    if not gold:
        raise ValueError(f"problem {problem.id!r} has no gold call (info['gold_calls'] or reference_calls) for IRM")
    schemas = tool_schemas(problem)
    call, status = first_call(trajectory)
    if call is None:  # no attempt, or one the parser could not read (whatever its status)
        category = irm_category(None, {}, gold[0]["name"], gold[0]["parameters"], False, None)
    else:
        known = call.name in schemas if schemas is not None else status is not ToolStatus.UNKNOWN_TOOL
        keys = schemas.get(call.name) if schemas is not None else None
        category = irm_category(call.name, call.arguments, gold[0]["name"], gold[0]["parameters"], known, keys)
    value = max(-CLIP, min(CLIP, CATEGORY_REWARDS[category]))
    components = {"irm": value, **{f"irm_{c}": float(c == category) for c in CATEGORY_REWARDS}}
    return RewardResult(total=value, components=components, correct=category == "exact")
