"""Tests for tirl.tools.base: schema generation, validation, safe execution, the registry."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from enum import Enum
from typing import Annotated, Any

import pytest
from pydantic import Field

from tirl.registry import RegistryError
from tirl.tools import TOOLS, Tool, ToolArgumentError, ToolSet, calculator, error_result, get_tools, tool
from tirl.tools.base import clean_schema, parse_docstring
from tirl.types import ToolCall, ToolResult, ToolStatus


def run(coro):
    return asyncio.run(coro)


def call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(id="call_1", name=name, arguments=arguments)


def _all_keys(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _all_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _all_keys(v)}
    return set()


@tool
def search(query: str, limit: int = 5) -> str:
    """Search the web for pages.

    Returns the top results as text.

    Args:
        query: What to look for. May span
            two lines in the docstring.
        limit (int): How many results to return.

    Returns:
        The results, one per line.
    """
    return f"{query}:{limit}"


# --- schema generation -------------------------------------------------------------------------------


def test_schema_from_signature_and_docstring():
    assert search.schema() == {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web for pages.\n\nReturns the top results as text.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {
                        "type": "string",
                        "description": "What to look for. May span two lines in the docstring.",
                    },
                    "limit": {"type": "integer", "description": "How many results to return.", "default": 5},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    }


def test_annotated_field_description_wins_over_docstring_and_options_override():
    @tool(name="lookup", description="Look a word up.", timeout_s=3.0)
    def f(word: Annotated[str, Field(description="The word.")], lang: Annotated[str, Field(min_length=2)] = "en"):
        """Ignored description.

        Args:
            word: Docstring text that loses.
            lang: Language code.
        """

    props = f.parameters["properties"]
    assert f.name == "lookup" and f.description == "Look a word up." and f.timeout_s == 3.0
    assert props["word"]["description"] == "The word."
    assert props["lang"] == {"type": "string", "description": "Language code.", "default": "en", "minLength": 2}


class Color(Enum):
    RED = "red"
    BLUE = "blue"


def test_no_titles_anywhere_but_properties_named_title_survive():
    @tool
    def f(
        title: str, colors: list[Color], extra: dict[str, int] | None = None, meta: dict = {"title": "x"}  # noqa: B006
    ):
        """Make a thing.

        Args:
            title: Its title.
        """

    params = f.parameters
    assert params["properties"]["title"] == {"type": "string", "description": "Its title."}  # kept, cleaned
    assert params["properties"]["meta"]["default"] == {"title": "x"}  # a default value is left alone
    stripped = {k: v for k, v in params["properties"].items() if k not in ("title", "meta")}
    assert "title" not in _all_keys({**params, "properties": stripped, "$defs": params["$defs"]})
    assert params["$defs"]["Color"] == {"enum": ["red", "blue"], "type": "string"}


def test_clean_schema_only_touches_schema_positions():
    schema = {
        "title": "M",
        "type": "object",
        "properties": {"title": {"title": "Title", "type": "string"}},
        "anyOf": [{"title": "A"}],
        "default": {"title": "keep"},
    }
    assert clean_schema(schema) == {
        "type": "object",
        "properties": {"title": {"type": "string"}},
        "anyOf": [{}],
        "default": {"title": "keep"},
    }


def test_parse_docstring_without_args_section():
    assert parse_docstring("Do it.\n\nReturns:\n    Nothing.") == ("Do it.", {})


def _no_annotation(x):  # noqa: ANN001
    """Doc."""


def _star_args(*xs: int):
    """Doc."""


def _star_kwargs(**kw: int):
    """Doc."""


def _positional_only(x: int, /):
    """Doc."""


def _no_docstring(x: int):
    pass


def _documents_unknown(x: int):
    """Doc.

    Args:
        y: A typo.
    """


@pytest.mark.parametrize(
    "fn, message",
    [
        (_no_annotation, "parameter 'x' has no type annotation"),
        (_star_args, "cannot take \\*args or \\*\\*kwargs"),
        (_star_kwargs, "cannot take \\*args or \\*\\*kwargs"),
        (_positional_only, "parameter 'x' is positional-only"),
        (_no_docstring, "needs a docstring"),
        (_documents_unknown, "documents unknown arguments: y"),
    ],
)
def test_decoration_time_errors(fn, message):
    with pytest.raises(TypeError, match=message):
        tool(fn)


# --- validation --------------------------------------------------------------------------------------


def test_validate_fills_defaults_and_accepts_int_for_float():
    @tool
    def scale(x: float, factor: float = 2.0) -> float:
        """Scale."""
        return x * factor

    assert scale.validate({"x": 3}) == {"x": 3, "factor": 2.0}


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({}, "query: missing required argument"),
        ({"query": "a", "color": 1}, "color: unexpected argument (valid arguments: query, limit)"),
        ({"query": 12}, "query: Input should be a valid string (got int 12)"),
        ({"query": "a", "limit": "5"}, "limit: Input should be a valid integer (got str '5')"),
        ({"query": "a", "limit": True}, "limit: Input should be a valid integer (got bool True)"),
        ({"query": "a", "limit": 2.5}, "limit: Input should be a valid integer"),
    ],
)
def test_validation_errors_name_the_field(arguments, message):
    with pytest.raises(ToolArgumentError) as info:
        search.validate(arguments)
    assert message in str(info.value)


def test_validation_converts_json_values_to_declared_types():
    @tool
    def paint(color: Color, point: tuple[int, int]) -> str:
        """Paint."""
        return f"{color.value}{point}"

    assert paint.validate({"color": "red", "point": [1, 2]}) == {"color": Color.RED, "point": (1, 2)}
    with pytest.raises(ToolArgumentError, match="color"):
        paint.validate({"color": "green", "point": [1, 2]})


def test_parameter_named_like_a_pydantic_method_works():
    @tool
    def describe(schema: str) -> str:
        """Describe a database schema."""
        return schema

    assert describe.validate({"schema": "main"}) == {"schema": "main"}


class Echo(Tool):
    """A hand-written tool validated by its JSON schema (the default `validate`)."""

    name = "echo"
    description = "Echo a message."
    parameters = {
        "type": "object",
        "properties": {"message": {"type": "string"}, "times": {"type": "integer", "minimum": 1}},
        "required": ["message"],
        "additionalProperties": False,
    }

    async def run(self, message: str, times: int = 1) -> str:
        return message * times


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({}, "message: missing required argument"),
        ({"message": 3}, "message: 3 is not of type 'string'"),
        ({"message": "a", "times": 0}, "times: 0 is less than the minimum of 1"),
        ({"message": "a", "loud": True}, "'loud' was unexpected"),
    ],
)
def test_default_jsonschema_validation(arguments, message):
    with pytest.raises(ToolArgumentError) as info:
        Echo().validate(arguments)
    assert message in str(info.value)


def test_non_object_arguments_are_a_validation_error():
    result = run(ToolSet([search]).execute(ToolCall(id="c", name="search", arguments=["a"])))  # type: ignore[arg-type]
    assert result.status is ToolStatus.VALIDATION_ERROR
    assert result.content == "Error: invalid arguments for search: arguments must be a JSON object, got array"


# --- execution ---------------------------------------------------------------------------------------


def test_sync_and_async_tools_run():
    @tool
    async def shout(text: str) -> str:
        """Shout."""
        await asyncio.sleep(0)
        return text.upper()

    tools = ToolSet([search, shout, Echo()])
    calls = [call("search", query="cats"), call("shout", text="hi"), call("echo", message="ab", times=2)]

    async def main() -> list[ToolResult]:
        return await asyncio.gather(*[tools.execute(c) for c in calls])

    results = run(main())
    assert [(r.status, r.content) for r in results] == [
        (ToolStatus.OK, "cats:5"), (ToolStatus.OK, "HI"), (ToolStatus.OK, "abab"),
    ]
    assert all(r.call_id == "call_1" and r.latency_s > 0 for r in results)
    assert [r.name for r in results] == ["search", "shout", "echo"]


def test_validation_failure_does_not_call_the_tool():
    calls = []

    @tool
    def record(n: int) -> str:
        """Record."""
        calls.append(n)
        return "ok"

    result = run(ToolSet([record]).execute(call("record", n="1")))
    assert result.status is ToolStatus.VALIDATION_ERROR
    assert result.content == "Error: invalid arguments for record: n: Input should be a valid integer (got str '1')"
    assert calls == []


def test_unknown_tool():
    result = run(ToolSet([calculator, search]).execute(call("foo", x=1)))
    assert result.status is ToolStatus.UNKNOWN_TOOL
    assert result.content == "Error: unknown tool 'foo'. Available tools: calculator, search."
    assert result.name == "foo" and not result.ok


@pytest.mark.parametrize("is_async", [False, True])
def test_exception_in_tool_becomes_short_execution_error(is_async):
    def boom(n: int) -> str:
        """Fail."""
        raise ValueError("bad value " + "x" * 1000)

    async def aboom(n: int) -> str:
        """Fail."""
        return boom(n)

    t = tool(aboom if is_async else boom, name="boom")
    result = run(ToolSet([t]).execute(call("boom", n=1)))
    assert result.status is ToolStatus.EXECUTION_ERROR
    assert result.content.startswith("Error: ValueError: bad value xxx")
    assert result.content.endswith("...") and len(result.content) < 340
    assert "Traceback" not in result.content


def test_tool_raising_timeout_error_is_not_reported_as_timeout():
    @tool
    async def flaky() -> str:
        """Fail like a network call."""
        raise TimeoutError("upstream timed out")

    result = run(ToolSet([flaky]).execute(call("flaky")))
    assert (result.status, result.content) == (ToolStatus.EXECUTION_ERROR, "Error: TimeoutError: upstream timed out")


def test_sync_tool_raising_stop_iteration_does_not_hang():
    @tool
    def first(items: list[int]) -> int:
        """First item."""
        return next(iter(items))

    result = run(ToolSet([first]).execute(call("first", items=[]), default_timeout_s=5))
    assert result.status is ToolStatus.EXECUTION_ERROR and "StopIteration" in result.content


def test_hung_sync_tool_times_out_promptly():
    @tool(timeout_s=0.2)
    def stuck() -> str:
        """Hang."""
        time.sleep(3)
        return "late"

    started = time.perf_counter()
    result = run(ToolSet([stuck]).execute(call("stuck")))
    elapsed = time.perf_counter() - started  # includes event-loop shutdown: the thread is not waited for
    assert (result.status, result.content) == (ToolStatus.TIMEOUT, "Error: tool 'stuck' timed out after 0.2 s")
    assert 0.2 <= elapsed < 1.5
    assert 0.2 <= result.latency_s < 1.0


def test_hung_async_tool_times_out_and_is_cancelled():
    cancelled = []

    @tool
    async def wait() -> str:
        """Hang."""
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "late"

    started = time.perf_counter()
    result = run(ToolSet([wait]).execute(call("wait"), default_timeout_s=0.25))
    assert result.status is ToolStatus.TIMEOUT
    assert result.content == "Error: tool 'wait' timed out after 0.25 s"
    assert time.perf_counter() - started < 1.5
    assert cancelled == [True]


def test_caller_cancellation_propagates():
    @tool
    async def wait() -> str:
        """Hang."""
        await asyncio.sleep(10)
        return "late"

    async def main():
        task = asyncio.create_task(ToolSet([wait]).execute(call("wait"), default_timeout_s=5))
        await asyncio.sleep(0.05)
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        run(main())


def test_output_truncation():
    @tool
    def long(n: int) -> str:
        """Long output."""
        return "x" * n

    tools = ToolSet([long])
    result = run(tools.execute(call("long", n=50), max_output_chars=10))
    assert result.status is ToolStatus.OUTPUT_TRUNCATED and result.ok
    assert result.content == "x" * 10 + "\n...[truncated 40 characters]"
    exact = run(tools.execute(call("long", n=10), max_output_chars=10))
    assert (exact.status, exact.content) == (ToolStatus.OK, "x" * 10)


def test_non_string_outputs_are_json_encoded_or_stringified():
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    @tool
    def data(kind: str) -> Any:
        """Return data."""
        return {"a": [1, 2.5, "é"]} if kind == "json" else Thing()

    tools = ToolSet([data])
    expected = json.dumps({"a": [1, 2.5, "é"]}, ensure_ascii=False)
    assert run(tools.execute(call("data", kind="json"))).content == expected
    assert run(tools.execute(call("data", kind="other"))).content == "a thing"


def test_tool_returning_a_tool_result_keeps_its_status_and_gets_the_call_id():
    class Strict(Echo):
        name = "strict"

        async def run(self, message: str, times: int = 1) -> ToolResult:
            return error_result("ignored", "ignored", ToolStatus.EXECUTION_ERROR, f"refused {message}")

    result = run(ToolSet([Strict()]).execute(call("strict", message="m")))
    assert (result.call_id, result.name) == ("call_1", "strict")
    assert (result.status, result.content) == (ToolStatus.EXECUTION_ERROR, "Error: refused m")


# --- ToolSet and registry ----------------------------------------------------------------------------


def test_toolset_duplicate_names_and_bad_tools():
    with pytest.raises(ValueError, match="duplicate tool name 'search'"):
        ToolSet([search, search])
    with pytest.raises(TypeError, match="expected a Tool"):
        ToolSet([lambda: 1])  # type: ignore[list-item]

    class NoObject(Echo):
        name = "bad"
        parameters = {"type": "string"}

    with pytest.raises(ValueError, match="type 'object'"):
        ToolSet([NoObject()])

    class BadName(Echo):
        name = "has space"

    with pytest.raises(ValueError, match="must be 1-64 letters"):
        ToolSet([BadName()])


def test_toolset_accessors():
    tools = ToolSet([calculator, search])
    assert tools.names == ["calculator", "search"]
    assert [s["function"]["name"] for s in tools.schemas()] == ["calculator", "search"]
    assert tools.get("search") is search and "search" in tools and len(tools) == 2
    with pytest.raises(KeyError, match="available: calculator, search"):
        tools.get("nope")


def test_registry_lookups(tmp_path, monkeypatch):
    module = tmp_path / "my_tools_for_test.py"
    module.write_text(textwrap.dedent('''
        from tirl.tools import Tool

        def add(a: int, b: int) -> int:
            """Add two integers.

            Args:
                a: First.
                b: Second.
            """
            return a + b

        def undocumented(a: int) -> int:
            return a

        class Ping(Tool):
            name = "ping"
            description = "Ping."
            parameters = {"type": "object", "properties": {}}

            async def run(self) -> str:
                return "pong"

        NOT_A_TOOL = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_tools_for_test", raising=False)

    assert TOOLS.get("calculator") is calculator
    assert "calculator" in TOOLS.describe()
    names = ["calculator", "tirl.tools.calculator:calculator", "my_tools_for_test:add", "my_tools_for_test:Ping"]
    found = get_tools(names)
    assert found[0] is calculator and found[1] is calculator
    assert [t.name for t in found[2:]] == ["add", "ping"]
    assert found[2].parameters["properties"]["a"] == {"type": "integer", "description": "First."}
    assert run(ToolSet(found[1:]).execute(call("add", a=2, b=3))).content == "5"

    with pytest.raises(RegistryError, match="valid names: .*calculator"):
        get_tools(["no_such_tool"])
    with pytest.raises(TypeError, match="needs a docstring"):
        get_tools(["my_tools_for_test:undocumented"])
    with pytest.raises(TypeError, match="is not a tool"):
        get_tools(["my_tools_for_test:NOT_A_TOOL"])
    with pytest.raises(RegistryError, match="cannot import"):
        get_tools(["no_such_module_xyz:f"])
