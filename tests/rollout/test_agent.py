"""The agent loop on the default model's format, with a scripted model (deterministic outputs).

Covers DESIGN.md invariant 2 (the loss mask is 1 exactly on sampled tokens), invariant 1 (sampled
tokens decode to the model's text; nothing is re-tokenised) and invariant 4 (malformed tool calls of
every kind become errors the model sees and counted metrics, never crashes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from tirl.backends.scripted import ScriptedBackend
from tirl.envs.tool_env import ToolEnv, ToolLimits
from tirl.errors import InvariantError
from tirl.rollout.agent import TurnLimits, run_trajectory
from tirl.rollout.checks import check_trajectory
from tirl.rollout.metrics import trajectory_metrics
from tirl.backends.base import SamplingParams
from tirl.tasks.base import Problem
from tirl.tools import ToolSet, calculator, tool
from tirl.types import StopReason, ToolStatus, TrajectoryMeta

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "4821 * 37"}}</tool_call>'
ANSWER = "<answer>178377</answer><|im_end|>"
PROBLEM = Problem(id="p0", question="What is 4821 * 37?", answer="178377")


@tool
def explode(x: int) -> str:
    """Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError("kaboom")


@tool(timeout_s=0.2)
def hang(x: int) -> str:
    """Sleeps past its timeout.

    Args:
        x: Anything.
    """
    time.sleep(1.0)
    return "late"


TOOLS = ToolSet([calculator, explode, hang])


def rollout(fmt, script, limits=TurnLimits(), tool_limits=ToolLimits(), tools=TOOLS):
    backend = ScriptedBackend(fmt.tokenizer, script)
    env = ToolEnv(PROBLEM, "Solve it.", tools, tool_limits)
    traj = asyncio.run(run_trajectory(env, backend, fmt, SamplingParams(), limits,
                                      TrajectoryMeta("p0", "g0"), seed=0))
    return traj, backend


def test_call_then_answer_masks_and_texts(smol_format):
    traj, backend = rollout(smol_format, [CALL, ANSWER])
    assert traj.stop_reason == StopReason.ANSWERED
    assert [t.finish_reason for t in traj.turns] == ["stop", "eos"]
    assert traj.turns[0].tool_results[0].content == "178377"
    sampled = [tok for tok, m in zip(traj.response_ids, traj.loss_mask) if m]
    inserted = [tok for tok, m in zip(traj.response_ids, traj.loss_mask) if not m]
    assert smol_format.decode(sampled) == CALL + ANSWER
    assert smol_format.decode(inserted) == "<|im_end|>\n<|im_start|>tool\n178377<|im_end|>\n<|im_start|>assistant\n"
    assert all(lp == -0.5 for lp, m in zip(traj.logprobs, traj.loss_mask) if m)
    assert all(lp == 0.0 for lp, m in zip(traj.logprobs, traj.loss_mask) if not m)
    # token-in/token-out: the second request is exactly prompt + what came before, no re-tokenisation
    assert list(backend.requests[1].prompt_ids) == list(traj.prompt_ids) + list(traj.response_ids[:traj.turns[1].gen_start])
    assert traj.final_answer == "<answer>178377</answer>"


def test_sampled_tokens_are_kept_even_when_not_canonical(smol_format):
    """A model may emit a non-canonical tokenisation; training must see exactly those ids."""
    canonical = smol_format.encode(CALL)
    by_char = [t for ch in "<tool_call>" for t in smol_format.encode(ch)]
    split = by_char + canonical[len(smol_format.encode("<tool_call>")):]
    assert split != canonical and smol_format.decode(split) == CALL

    class Fixed(ScriptedBackend):
        async def generate(self, request):
            if request.key[-1] == 0:
                from tirl.backends.base import Completion
                return Completion(tuple(split), tuple([-0.1] * len(split)), "stop")
            return await super().generate(request)

    backend = Fixed(smol_format.tokenizer, [CALL, ANSWER])
    env = ToolEnv(PROBLEM, "Solve it.", TOOLS)
    traj = asyncio.run(run_trajectory(env, backend, smol_format, SamplingParams(), TurnLimits(),
                                      TrajectoryMeta("p0", "g0"), seed=0))
    assert list(traj.response_ids[:len(split)]) == split
    assert traj.turns[0].tool_results[0].status == ToolStatus.OK


@pytest.mark.parametrize("bad_call, status, message", [
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}</tool_call>', ToolStatus.INVALID_CALL,
     "invalid JSON"),
    ('<tool_call>{"name": "web_search", "arguments": {"q": "x"}}</tool_call>', ToolStatus.UNKNOWN_TOOL,
     "unknown tool 'web_search'"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": 12}}</tool_call>', ToolStatus.VALIDATION_ERROR,
     "expression"),
    ('<tool_call>{"name": "calculator", "arguments": {}}</tool_call>', ToolStatus.VALIDATION_ERROR, "expression"),
    ('<tool_call>{"name": "explode", "arguments": {"x": 1}}</tool_call>', ToolStatus.EXECUTION_ERROR, "kaboom"),
    ('<tool_call>{"name": "hang", "arguments": {"x": 1}}</tool_call>', ToolStatus.TIMEOUT, "timed out"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>', ToolStatus.EXECUTION_ERROR,
     "division by zero"),
])
def test_bad_calls_become_visible_errors_and_metrics(smol_format, bad_call, status, message):
    traj, backend = rollout(smol_format, [bad_call, CALL, ANSWER])
    first = traj.turns[0].tool_results[0]
    assert first.status == status and message in first.content and first.content.startswith("Error:")
    # the model sees the error text in its next prompt, and the episode goes on to a correct answer
    seen = smol_format.decode(backend.requests[1].prompt_ids)
    assert first.content in seen
    assert traj.stop_reason == StopReason.ANSWERED and len(traj.turns) == 3
    check_trajectory(traj, smol_format)
    m = trajectory_metrics([dataclasses.replace(traj)])
    assert m[f"tool_status/{status.value}"] == 1.0 and m["tool_status/ok"] == 1.0
    assert m["tool_calls/invalid_rate"] == 0.5


def test_turn_limit(smol_format):
    traj, _ = rollout(smol_format, [CALL, CALL, CALL], limits=TurnLimits(max_turns=2))
    assert traj.stop_reason == StopReason.MAX_TURNS and len(traj.turns) == 2
    assert traj.loss_mask[-1] == 1  # the last turn's observation is not inserted


def test_token_budget(smol_format):
    traj, _ = rollout(smol_format, ["word " * 50 + "<|im_end|>"],
                      limits=TurnLimits(max_new_tokens_per_turn=10, max_new_tokens=10))
    assert traj.stop_reason == StopReason.MAX_TOKENS and sum(traj.loss_mask) == 10
    assert traj.final_answer is None


def test_total_token_budget_across_turns(smol_format):
    traj, backend = rollout(smol_format, [CALL, CALL, ANSWER],
                            limits=TurnLimits(max_new_tokens_per_turn=40, max_new_tokens=45))
    assert backend.requests[1].max_new_tokens == 45 - traj.turns[0].gen_end
    assert traj.stop_reason == StopReason.MAX_TOKENS


def test_tool_budget(smol_format):
    traj, _ = rollout(smol_format, [CALL, CALL, ANSWER], tool_limits=ToolLimits(max_tool_calls=1))
    assert traj.stop_reason == StopReason.TOOL_BUDGET
    assert traj.turns[1].tool_results[0].status == ToolStatus.BUDGET_EXCEEDED


def test_context_overflow(smol_format):
    traj, _ = rollout(smol_format, [ANSWER], limits=TurnLimits(max_context=20))
    assert traj.stop_reason == StopReason.CONTEXT_OVERFLOW and traj.response_ids == ()


def test_no_tools_means_no_parsing(smol_format):
    traj, _ = rollout(smol_format, [CALL + "<|im_end|>"], tools=ToolSet([]))
    assert traj.stop_reason == StopReason.ANSWERED and traj.turns[0].tool_results == ()
    assert "tools" not in smol_format.decode(traj.prompt_ids).split("<|im_end|>")[0]


def test_check_trajectory_catches_corruption(smol_format):
    traj, _ = rollout(smol_format, [CALL, ANSWER])
    bad_mask = list(traj.loss_mask)
    bad_mask[-3] = 0
    with pytest.raises(InvariantError, match="mask"):
        check_trajectory(dataclasses.replace(traj, loss_mask=tuple(bad_mask)), smol_format)
    bad_ids = list(traj.response_ids)
    bad_ids[0] = bad_ids[0] + 1
    with pytest.raises(InvariantError, match="text differs"):
        check_trajectory(dataclasses.replace(traj, response_ids=tuple(bad_ids)), smol_format)
    bad_lp = list(traj.logprobs)
    bad_lp[traj.turns[0].gen_end] = -1.0  # an inserted token with a log-prob
    with pytest.raises(InvariantError, match="log-prob"):
        check_trajectory(dataclasses.replace(traj, logprobs=tuple(bad_lp)), smol_format)


def test_per_tool_metrics_count_calls_latency_and_statuses():
    from tirl.rollout.metrics import MAX_TOOL_KEYS, per_tool_metrics
    from tirl.types import ToolResult

    results = [ToolResult("a", "python", "1", ToolStatus.OK, 0.5), ToolResult("b", "python", "E", ToolStatus.TIMEOUT, 1.5),
               ToolResult("c", "search", "x", ToolStatus.OK, 0.25),
               ToolResult("d", "made_up", "E", ToolStatus.UNKNOWN_TOOL, 0.0),
               ToolResult("e", "", "E", ToolStatus.INVALID_CALL, 0.0)]
    m = per_tool_metrics(results)
    assert m["tool/python/calls"] == 2 and m["tool/search/calls"] == 1
    assert m["time/tool/python/latency_mean_s"] == 1.0 and m["time/tool/python/latency_max_s"] == 1.5
    assert m["tool/python/status/ok"] == 1 and m["tool/python/status/timeout"] == 1
    assert m["tool/_unresolved/calls"] == 2  # names the model invented do not become metric keys
    assert not any("made_up" in k for k in m)
    over = [ToolResult("f", "invented", "E", ToolStatus.BUDGET_EXCEEDED, 0.0),
            ToolResult("g", "python", "E", ToolStatus.BUDGET_EXCEEDED, 0.0)]
    m = per_tool_metrics(results + over)  # past the budget: a name counts only if a call of it ran
    assert m["tool/python/status/budget_exceeded"] == 1 and m["tool/_unresolved/calls"] == 3
    assert not any("invented" in k for k in m)
    many = [ToolResult(f"h{i}", f"f{i:02d}", "1", ToolStatus.OK, 0.0) for i in range(MAX_TOOL_KEYS + 3)]
    m = per_tool_metrics(results + many)  # thousands of functions (BFCL) must not become thousands of keys
    # kept: the most called (python), then by name f00..f14; search and f15..f18 go under _other
    assert m["tool/python/calls"] == 2 and m["tool/_other/calls"] == 5 and "tool/search/calls" not in m
    assert len({k.split("/")[1] for k in m if k.startswith("tool/")}) == MAX_TOOL_KEYS + 2
