"""Tool-call parsing: every block becomes a call or an error the model will see; never an exception."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tirl.chat.hermes import parse_tool_calls, render_tool_call
from tirl.types import ToolCall


def test_valid_call():
    [p] = parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {"expression": "1+2"}}</tool_call>')
    assert p.call == ToolCall("call_0", "calculator", {"expression": "1+2"}) and p.error is None


def test_several_calls_with_text_and_whitespace():
    text = 'Let me compute.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call> then <tool_call>{"name": "b"}</tool_call>'
    ps = parse_tool_calls(text, "call_3")
    assert [p.call.name for p in ps] == ["a", "b"]
    assert [p.call.id for p in ps] == ["call_3_0", "call_3_1"]
    assert ps[1].call.arguments == {}


def test_arguments_as_json_string_are_accepted():
    [p] = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert p.call.arguments == {"x": 1}


def test_no_call_means_no_blocks():
    assert parse_tool_calls("<answer>5</answer>") == []


def test_malformed_blocks_become_errors():
    cases = {
        '<tool_call>{"name": "f", "arguments": {"x": 1}</tool_call>': "invalid JSON",
        "<tool_call>[1, 2]</tool_call>": "must be a JSON object",
        '<tool_call>{"arguments": {}}</tool_call>': "must be a JSON object",
        '<tool_call>{"name": "", "arguments": {}}</tool_call>': "must be a JSON object",
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>': "arguments must be a JSON object",
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>': "not JSON",
        '<tool_call>{"name": "f", "args": {}}</tool_call>': "unexpected keys",
        '<tool_call>{"name": "f", "arguments": {}}': "unterminated",
    }
    for text, message in cases.items():
        [p] = parse_tool_calls(text)
        assert p.call is None and message in p.error, (text, p.error)


@given(name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
       args=st.dictionaries(st.text(min_size=1, max_size=8),
                            st.one_of(st.integers(), st.text(max_size=20), st.booleans(), st.none()), max_size=4))
def test_render_then_parse_round_trip(name, args):
    call = ToolCall("call_0", name, args)
    [p] = parse_tool_calls(render_tool_call(call))
    assert p.call == call


def test_fenced_json_call_is_read_when_no_tag_is_present():
    """Qwen2.5-Coder writes calls as fenced JSON; such a block is a call, other fenced blocks are text."""
    text = 'I will compute it.\n```json\n{"name": "python", "arguments": {"code": "print({1: 2})"}}\n```\nDone.'
    (call,) = parse_tool_calls(text)
    assert call.call is not None and call.call.name == "python"
    assert call.call.arguments == {"code": "print({1: 2})"}
    assert parse_tool_calls('```python\nprint(1)\n```\n```json\n{"a": 1}\n```') == []
    (bad,) = parse_tool_calls('```json\n{"name": "python", "arguments": {"code": "x" / 2}}\n```')
    assert bad.call is None and "invalid JSON" in bad.error


def test_fenced_json_is_ignored_when_tags_are_used():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call> ```json\n{"name": "b", "arguments": {}}\n```'
    assert [p.call.name for p in parse_tool_calls(text)] == ["a"]
