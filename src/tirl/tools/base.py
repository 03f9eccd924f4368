"""The tool contract: `Tool`, the `@tool` decorator and the `TOOLS` registry (execution: `tirl.tools.toolset`).

A tool has a `name`, a `description` and `parameters` (a JSON schema of type object) that the model
reads, a `validate` step that checks the model's arguments against that schema, and an async `run`.
`@tool` builds one from a typed Python function with a Google-style docstring through a single schema
path: signature -> pydantic model -> JSON schema, and the same pydantic model validates the arguments,
so what the model is told and what is accepted cannot disagree.

Limits of in-process tools: a synchronous tool runs in its own daemon thread. On timeout the call
returns a `timeout` result at once, but Python cannot kill a thread, so a hung synchronous tool keeps
running (abandoned) until it returns by itself; being a daemon thread it does not block event-loop
shutdown or interpreter exit. Async tools are cancelled on timeout (at their next `await`: an async
tool that computes without awaiting blocks the event loop and cannot be interrupted). Model-written code
belongs in the sandbox (`tirl.sandbox`), never in an in-process tool.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import json
import re
import threading
import time
import typing
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jsonschema
import pydantic
from pydantic.fields import FieldInfo

from tirl.registry import Registry
from tirl.types import ToolCall, ToolResult, ToolStatus

MAX_ERROR_MESSAGE_CHARS = 300
"""Exception messages shown to the model are cut to this many characters."""

_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI-compatible APIs accept


class ToolArgumentError(ValueError):
    """The arguments of a call do not match the tool's schema.

    The message is short, names the offending field, and is shown to the model.
    """


class TransientToolError(RuntimeError):
    """A failure worth retrying (a lost connection, a restarting server): `ToolSet` retries it with
    backoff when the tool's `ExecutionPolicy` allows retries. Never raise it for a timeout of
    model-written code or for anything the model's arguments caused."""


class Tool(ABC):
    """Something the model can call. Subclasses set the three attributes and implement `run`."""

    name: str
    """Name the model calls the tool by (letters, digits, `_` and `-`, at most 64 characters)."""
    description: str
    """What the tool does, for the model."""
    parameters: dict[str, Any]
    """JSON schema (type object) of the arguments."""
    timeout_s: float | None = None
    """Seconds a call may take; None means the caller's default."""

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The arguments to pass to `run`, checked against `parameters` (JSON schema Draft 2020-12).

        Raises `ToolArgumentError` naming the bad field.
        """
        _require_object(arguments)
        validator = jsonschema.Draft202012Validator(self.parameters)
        errors = sorted(validator.iter_errors(arguments), key=lambda e: e.json_path)
        if errors:
            raise ToolArgumentError("; ".join(_describe_schema_error(e) for e in errors[:3]))
        return dict(arguments)

    @abstractmethod
    async def run(self, **arguments: Any) -> str | ToolResult:
        """Run the tool on validated arguments; returns its output text (or a full `ToolResult`).

        Any other return value is JSON-encoded by `ToolSet.execute` (or `str()`-ed if it cannot be).
        """

    def session(self) -> Tool:
        """The instance one trajectory uses (default: this one, shared).

        A stateful tool (a persistent interpreter) returns a fresh per-trajectory object here; the
        env calls its `aclose` when the trajectory ends.
        """
        return self

    async def aclose(self) -> None:
        """Release what this instance holds (a session's interpreter; a provider's pool or connection)."""

    def describe(self) -> dict[str, Any]:
        """Properties of the tool that define the environment (isolation, statefulness, corpus, ...).

        Recorded in the run directory so that training and evaluation can be checked to match.
        """
        return {}

    def schema(self) -> dict[str, Any]:
        """The tool as an OpenAI function-tool dict, as chat templates and APIs expect it."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'name', '?')!r}>"


def _require_object(arguments: Any) -> None:
    if not isinstance(arguments, dict):
        raise ToolArgumentError(f"arguments must be a JSON object, got {_json_type(arguments)}")


def _describe_schema_error(error: jsonschema.ValidationError) -> str:
    """One jsonschema error as 'field: message'."""
    prefix = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [r for r in error.validator_value if r not in error.instance]
        return "; ".join(f"{prefix + '.' if prefix else ''}{m}: missing required argument" for m in missing)
    return f"{prefix}: {error.message}" if prefix else error.message


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------
# @tool: typed function -> pydantic model -> JSON schema


class FunctionTool(Tool):
    """A tool made from a typed Python function (sync or async) by `@tool`.

    `arguments_model` is the pydantic model built from the signature: `parameters` is its JSON schema
    and `validate` uses it, in strict mode (no coercion, except that an integer is a valid float).
    Calling the object calls the function itself.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        description: str,
        arguments_model: type[pydantic.BaseModel],
        timeout_s: float | None = None,
    ):
        self.fn = fn
        self.name = name
        self.description = description
        self.arguments_model = arguments_model
        self.parameters = clean_schema(arguments_model.model_json_schema())
        self.timeout_s = timeout_s
        self.is_async = inspect.iscoroutinefunction(fn)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Validated arguments (defaults filled in); raises `ToolArgumentError` naming the bad field.

        Arguments are validated as the JSON they came from, so JSON arrays fill tuple fields and enum
        values fill enum fields.
        """
        _require_object(arguments)
        try:
            try:
                text = json.dumps(arguments)
            except (TypeError, ValueError):
                model = self.arguments_model.model_validate(arguments)
            else:
                model = self.arguments_model.model_validate_json(text)
        except pydantic.ValidationError as e:
            raise ToolArgumentError(_describe_pydantic_errors(e, self.arguments_model)) from None
        return dict(model)  # field values as validated (nested models stay models)

    async def run(self, **arguments: Any) -> Any:
        """Call the function: awaited if async, otherwise in a daemon thread (see the module doc)."""
        if self.is_async:
            return await self.fn(**arguments)
        return await run_in_daemon_thread(self.fn, **arguments)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
) -> Any:
    """Decorator: turn a typed function with a Google-style docstring into a `FunctionTool`.

    Usable bare (`@tool`) or with options (`@tool(name="calc", timeout_s=5)`). The tool description is
    the docstring's text before its first section (`Args:`, `Returns:`, ...) unless `description` is
    given; argument descriptions come from `Args:` or from `Annotated[T, Field(description=...)]`
    (which wins). Defaults make arguments optional. Raises `TypeError` at decoration time for a
    parameter without annotation, `*args`/`**kwargs`, positional-only parameters, a missing docstring
    (when no `description` is given) or an `Args:` entry that names no parameter.
    """

    def wrap(f: Callable[..., Any]) -> FunctionTool:
        return _function_tool(f, name=name, description=description, timeout_s=timeout_s)

    return wrap(fn) if fn is not None else wrap


def _function_tool(
    fn: Callable[..., Any], *, name: str | None, description: str | None, timeout_s: float | None
) -> FunctionTool:
    qualname = getattr(fn, "__qualname__", repr(fn))
    doc = inspect.getdoc(fn)
    if not doc and description is None:
        raise TypeError(f"tool function {qualname} needs a docstring (its text is the tool description)")
    doc_description, arg_docs = parse_docstring(doc or "")
    model = _arguments_model(fn, qualname, arg_docs)
    return FunctionTool(
        fn,
        name=name or fn.__name__,
        description=description if description is not None else doc_description,
        arguments_model=model,
        timeout_s=timeout_s,
    )


def _arguments_model(fn: Callable[..., Any], qualname: str, arg_docs: dict[str, str]) -> type[pydantic.BaseModel]:
    """The strict pydantic model of `fn`'s parameters."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as e:
        raise TypeError(f"cannot resolve the type annotations of tool function {qualname}: {e}") from e
    params = inspect.signature(fn).parameters
    unknown = sorted(set(arg_docs) - set(params))
    if unknown:
        raise TypeError(f"docstring of tool function {qualname} documents unknown arguments: {', '.join(unknown)}")
    fields: dict[str, Any] = {}
    for p in params.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"tool function {qualname} cannot take *args or **kwargs (parameter {p.name!r})")
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"tool function {qualname}: parameter {p.name!r} is positional-only")
        if p.name not in hints:
            raise TypeError(f"tool function {qualname}: parameter {p.name!r} has no type annotation")
        default = ... if p.default is p.empty else p.default
        doc = arg_docs.get(p.name)
        use_doc = doc is not None and _annotated_description(hints[p.name]) is None
        field = pydantic.Field(default, description=doc) if use_doc else pydantic.Field(default)
        fields[p.name] = (hints[p.name], field)
    config = pydantic.ConfigDict(extra="forbid", strict=True)
    with warnings.catch_warnings():  # a parameter called e.g. `schema` shadows a BaseModel method: harmless
        warnings.filterwarnings("ignore", message=".*shadows an attribute in parent.*")
        return pydantic.create_model(f"{fn.__name__}_arguments", __config__=config, **fields)


def _annotated_description(annotation: Any) -> str | None:
    if typing.get_origin(annotation) is typing.Annotated:
        for meta in annotation.__metadata__:
            if isinstance(meta, FieldInfo) and meta.description:
                return meta.description
    return None


def _describe_pydantic_errors(error: pydantic.ValidationError, model: type[pydantic.BaseModel]) -> str:
    """Pydantic errors as 'field: message' parts, at most three."""
    parts = []
    for e in error.errors()[:3]:
        where = ".".join(str(p) for p in e["loc"]) or "arguments"
        if e["type"] == "missing":
            parts.append(f"{where}: missing required argument")
        elif e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
            valid = ", ".join(model.model_fields) or "none"
            parts.append(f"{where}: unexpected argument (valid arguments: {valid})")
        else:
            shown = repr(e["input"])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            parts.append(f"{where}: {e['msg']} (got {type(e['input']).__name__} {shown})")
    return "; ".join(parts)


_SECTION_RE = re.compile(
    r"^(Args|Arguments|Parameters|Params|Keyword Args|Returns?|Yields?|Raises|Examples?|Notes?|"
    r"Attributes|See Also|Warnings?|Todo|References?)\s*:\s*$",
    re.IGNORECASE,
)
_ARGS_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args"}
_ARG_RE = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (description, {argument: description}).

    The description is the text before the first section header, as written. In `Args:` each entry is
    `name: text` or `name (type): text`; more deeply indented lines continue the entry and are joined
    with spaces. Other sections (`Returns:`, `Raises:`, ...) are ignored.
    """
    lines = inspect.cleandoc(doc).splitlines()
    first_section = next((i for i, line in enumerate(lines) if _SECTION_RE.match(line)), len(lines))
    description = "\n".join(lines[:first_section]).strip()
    args: dict[str, str] = {}
    section, entry, entry_indent = None, None, None
    for line in lines[first_section:]:
        header = _SECTION_RE.match(line)
        if header:
            section, entry, entry_indent = header.group(1).lower(), None, None
            continue
        if section not in _ARGS_SECTIONS or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        entry_indent = indent if entry_indent is None else entry_indent
        match = _ARG_RE.match(line.strip())
        if indent <= entry_indent and match:
            entry = match.group(1)
            args[entry] = match.group(2).strip()
        elif entry is not None:
            args[entry] = f"{args[entry]} {line.strip()}".strip()
    return description, args


_SUBSCHEMA_KEYS = ("items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames")
_SCHEMA_LIST_KEYS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_MAP_KEYS = ("properties", "$defs", "definitions", "patternProperties")


def clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a JSON schema without pydantic's `title` keys.

    Only schema positions are cleaned: a property that is *named* `title`, or a default value holding
    a `title` key, is kept.
    """
    out = {k: v for k, v in schema.items() if k != "title"}
    for key in _SUBSCHEMA_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = clean_schema(out[key])
    for key in _SCHEMA_LIST_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [clean_schema(s) if isinstance(s, dict) else s for s in out[key]]
    for key in _SCHEMA_MAP_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = {k: clean_schema(s) if isinstance(s, dict) else s for k, s in out[key].items()}
    return out


async def run_in_daemon_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking function in a new daemon thread and await its result.

    Like `asyncio.to_thread` (context variables are copied), except that a call that never returns
    does not block event-loop shutdown or interpreter exit; cancelling the await abandons the thread.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: tuple[bool, Any]) -> None:
        if not future.done():
            future.set_result(outcome)

    def target() -> None:
        try:
            outcome = (True, context.run(fn, *args, **kwargs))
        except BaseException as e:  # re-raised in the awaiting task
            outcome = (False, e)
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop closed while the thread ran: nobody is waiting any more
            pass

    name = f"tirl-tool-{getattr(fn, '__name__', 'call')}"
    threading.Thread(target=target, name=name, daemon=True).start()
    ok, value = await future
    if ok:
        return value
    if isinstance(value, StopIteration):  # cannot propagate through a coroutine as itself
        raise RuntimeError(f"StopIteration raised by {getattr(fn, '__name__', 'call')}") from value
    raise value


# ---------------------------------------------------------------------------------------------------
# Checks and errors


def error_result(call_id: str, name: str, status: ToolStatus, message: str) -> ToolResult:
    """A failed call's result; the model sees `"Error: " + message`."""
    return ToolResult(call_id=call_id, name=name, content=f"Error: {message}", status=status)


def describe_exception(error: BaseException) -> str:
    """'ExceptionType: message', the message cut to `MAX_ERROR_MESSAGE_CHARS`; no traceback."""
    message = str(error).strip()
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def check_tool(t: Tool) -> None:
    """Raise `TypeError`/`ValueError` unless `t` is a usable tool (valid name, description, schema)."""
    if not isinstance(t, Tool):
        raise TypeError(f"expected a Tool, got {type(t).__name__} ({t!r}); wrap functions with @tool")
    name = getattr(t, "name", None)
    if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
        raise ValueError(f"tool name {name!r} must be 1-64 letters, digits, '_' or '-'")
    if not isinstance(getattr(t, "description", None), str) or not t.description.strip():
        raise ValueError(f"tool {name!r} has no description")
    parameters = getattr(t, "parameters", None)
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise ValueError(f"tool {name!r}: parameters must be a JSON schema of type 'object'")
    try:
        jsonschema.Draft202012Validator.check_schema(parameters)
    except jsonschema.SchemaError as e:
        raise ValueError(f"tool {name!r}: parameters is not a valid JSON schema: {e.message}") from e


# ---------------------------------------------------------------------------------------------------
# Registry

TOOLS: Registry[Tool] = Registry("tool", entry_point_group="tirl.tools")
"""Tool instances by name. Built-in tools register themselves when `tirl.tools` is imported."""


def register_tool(t: Tool) -> Tool:
    """Add a tool instance to `TOOLS` under its own name (usable as a decorator above `@tool`)."""
    check_tool(t)
    TOOLS.add(t.name, t, t.description.strip().splitlines()[0])
    return t


def get_tools(names: Iterable[str]) -> list[Tool]:
    """Resolve registry names or `module:attr` paths to tool instances, in order.

    A path may point to a `Tool` instance, a `Tool` subclass (instantiated without arguments) or a
    typed function with a docstring (wrapped with `tool`). Unknown names raise `RegistryError`
    listing the valid ones; anything else raises `TypeError`.
    """
    return [_as_tool(TOOLS.get(name), name) for name in names]


def _as_tool(obj: Any, name: str) -> Tool:
    if isinstance(obj, Tool):
        return obj
    if hasattr(obj, "settings_model") and hasattr(obj, "build"):  # a configurable tool (providers.py)
        raise TypeError(f"{name!r} is a configurable tool: build it with tirl.tools.build_toolset([{name!r}], "
                        f"{{{name!r}: {{...settings}}}})")
    if isinstance(obj, type) and issubclass(obj, Tool):
        return obj()
    if inspect.isroutine(obj):
        return tool(obj)
    raise TypeError(
        f"{name!r} is not a tool: expected a Tool instance, a Tool subclass or a typed function with a "
        f"docstring, got {type(obj).__name__}"
    )
