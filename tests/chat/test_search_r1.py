"""Search-R1 `<search>` calls: parsing (never raising) and a ToolEnv episode with the real search tool."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tirl.chat.search_r1 import CLOSE, parse_search_calls, render_search_call
from tirl.envs.tool_env import ToolEnv
from tirl.tasks.base import Problem
from tirl.tools import build_toolset
from tirl.tools import search as _search  # noqa: F401  (registers the `search` provider)
from tirl.types import Message, StopReason, ToolCall, ToolStatus


@given(st.text().filter(lambda q: CLOSE not in q and "<search>" not in q))
def test_round_trip(query):
    text = f"<think>I should look this up.</think>\n{render_search_call(query)}"
    [parsed] = parse_search_calls(text, "call_2")
    assert parsed.call == ToolCall("call_2_0", "search", {"query": query.strip()}) and parsed.error is None


def test_render_refuses_a_query_it_could_not_read_back():
    with pytest.raises(ValueError):
        render_search_call("a </search> b")


def test_several_blocks_in_order_with_whitespace_stripped():
    text = "<search> capital of France </search> then\n<search>\nEiffel Tower height\n</search>"
    calls = [p.call for p in parse_search_calls(text, "call_0")]
    assert calls == [ToolCall("call_0_0", "search", {"query": "capital of France"}),
                     ToolCall("call_0_1", "search", {"query": "Eiffel Tower height"})]


def test_unterminated_block_is_an_error_after_the_valid_ones():
    parsed = parse_search_calls("<search>first</search> <search>second, never closed", "c")
    assert parsed[0].call.arguments == {"query": "first"}
    assert parsed[1].call is None and "unterminated <search>" in parsed[1].error
    assert parsed[1].raw == "second, never closed"


def test_no_block_means_no_calls():
    assert parse_search_calls("") == []
    assert parse_search_calls("<think>I know this.</think><answer>Paris</answer>") == []


def test_empty_block_is_a_call_with_an_empty_query():
    [parsed] = parse_search_calls("<search>  </search>")
    assert parsed.call.arguments == {"query": ""}


@pytest.fixture
def search_toolset(tmp_path):
    rows = [{"title": "Paris", "text": "Paris is the capital of France."},
            {"title": "Berlin", "text": "Berlin is the capital of Germany."},
            {"title": "Eiffel Tower", "text": "The Eiffel Tower in Paris is 330 metres tall."}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"corpus": str(corpus), "cache_dir": str(tmp_path / "cache"), "top_k": 2, "output_format": "search_r1"}
    return build_toolset(["search"], {"search": settings})


def test_tool_env_episode_with_the_search_r1_parser(search_toolset):
    problem = Problem(id="q0", question="How tall is the Eiffel Tower?", answer="330 metres")
    env = ToolEnv(problem, "Search with <search>query</search>.", search_toolset.session(), parser=parse_search_calls)

    async def episode():
        await env.reset()
        searched = await env.step(Message("assistant", "<think>Look it up.</think>\n"
                                                        "<search>Eiffel Tower tall</search>"))
        broken = await env.step(Message("assistant", "<search>  </search><search>unfinished"))
        answered = await env.step(Message("assistant", "<answer>330 metres</answer>"))
        await env.close()
        return searched, broken, answered

    searched, broken, answered = asyncio.run(episode())
    assert searched.tool_calls == (ToolCall("call_0_0", "search", {"query": "Eiffel Tower tall"}),)
    [observation] = searched.observations
    assert observation.role == "tool" and observation.tool_call_id == "call_0_0"
    assert observation.content.startswith("<information>Doc 1(Title: Eiffel Tower) The Eiffel Tower in Paris is 330")
    assert observation.content.endswith("</information>") and not searched.done
    assert [r.status for r in broken.tool_results] == [ToolStatus.EXECUTION_ERROR, ToolStatus.INVALID_CALL]
    assert "query is empty" in broken.tool_results[0].content
    assert "unterminated <search>" in broken.tool_results[1].content
    assert answered.done and answered.stop_reason is StopReason.ANSWERED
    assert answered.final_answer == "<answer>330 metres</answer>"


def test_generation_stops_at_the_end_of_a_search_block(search_toolset, smol_format):
    """With the Search-R1 parser and stop string, a turn ends right after `</search>` (text the model would
    have gone on writing is never sampled), and the passages come back in the next observation."""
    from tirl.backends.base import SamplingParams
    from tirl.backends.scripted import ScriptedBackend
    from tirl.rollout.agent import TurnLimits, run_trajectory
    from tirl.types import TrajectoryMeta

    problem = Problem(id="q", question="Where is the Eiffel Tower?", answer="Paris")
    env = ToolEnv(problem, "Search, then answer.", search_toolset.session(), parser=parse_search_calls,
                  stop_strings=(CLOSE,))
    script = ["<search>Eiffel Tower</search> I think it is in Rome", "<answer>Paris</answer><|im_end|>"]
    backend = ScriptedBackend(smol_format.tokenizer, script)
    traj = asyncio.run(run_trajectory(env, backend, smol_format, SamplingParams(), TurnLimits(),
                                      TrajectoryMeta("q", "g"), seed=0))
    first = traj.turns[0]
    assert first.finish_reason == "stop" and backend.requests[0].stop_strings == (CLOSE,)
    sampled = smol_format.decode([t for t, m in zip(traj.response_ids, traj.loss_mask) if m])
    assert "Rome" not in sampled and sampled.startswith("<search>Eiffel Tower</search>")
    assert first.tool_results[0].status == ToolStatus.OK and "<information>" in first.tool_results[0].content
    assert traj.stop_reason == StopReason.ANSWERED
