"""Hermes/Qwen-style tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Parsing never raises: every block the model opened becomes a `ParsedCall`, valid or with an error
message that the env returns to the model as an `invalid_call` result (DESIGN.md invariant 4).

Qwen2.5-Coder models often write a call as a fenced JSON block instead, ```` ```json {"name": ...,
"arguments": {...}} ``` ````. In an output with no `<tool_call>` tag, a fenced block whose JSON is an
object with a "name" key is read as a call (one whose "arguments" are wrong is an `invalid_call`);
fenced blocks of anything else (code, other JSON) are text, not call attempts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tirl.types import ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(" + re.escape(CLOSE) + r"|$)", re.DOTALL)
_FENCED = re.compile(r"```(?:json|JSON)?[ \t]*\n?(\{.*?\})\s*```", re.DOTALL)
_SHAPE = 'a tool call must be a JSON object {"name": "<tool name>", "arguments": {...}}'


@dataclass(frozen=True)
class ParsedCall:
    """One `<tool_call>` block: the call if it could be read, else the error the model will see."""

    raw: str
    """The text between the tags (or to the end of the output for an unterminated block)."""
    call: ToolCall | None = None
    """The parsed call, or None when the block is malformed."""
    error: str | None = None
    """Why the block could not be read (None when `call` is set)."""


def parse_tool_calls(text: str, id_prefix: str = "call") -> list[ParsedCall]:
    """Every tool-call block in `text`, in order; ids are `<id_prefix>_<k>`."""
    if OPEN not in text:
        return _fenced_calls(text, id_prefix)
    out: list[ParsedCall] = []
    for k, m in enumerate(_BLOCK.finditer(text)):
        body, closed = m.group(1), bool(m.group(2))
        if not closed:
            out.append(ParsedCall(raw=body, error=f"unterminated {OPEN}: the call must end with {CLOSE}"))
            continue
        out.append(_parse_body(body, f"{id_prefix}_{k}"))
    return out


def _fenced_calls(text: str, id_prefix: str) -> list[ParsedCall]:
    """Fenced JSON blocks shaped like a call (an object with a "name" key), in order."""
    out: list[ParsedCall] = []
    for m in _FENCED.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            if not re.match(r'\{\s*"name"\s*:', m.group(1)):
                continue  # JSON-looking text that is no call attempt
            obj = None
        if obj is not None and not (isinstance(obj, dict) and "name" in obj):
            continue
        out.append(_parse_body(m.group(1), f"{id_prefix}_{len(out)}"))
    return out


def _parse_body(body: str, call_id: str) -> ParsedCall:
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError as e:
        return ParsedCall(raw=body, error=f"invalid JSON in tool call ({e.msg} at position {e.pos}); {_SHAPE}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return ParsedCall(raw=body, error=_SHAPE)
    extra = set(obj) - {"name", "arguments"}
    if extra:
        return ParsedCall(raw=body, error=f"unexpected keys {sorted(extra)}; {_SHAPE}")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # OpenAI style: arguments as a JSON-encoded string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return ParsedCall(raw=body, error=f"arguments is a string that is not JSON; {_SHAPE}")
    if not isinstance(args, dict):
        return ParsedCall(raw=body, error=f"arguments must be a JSON object, got {type(args).__name__}; {_SHAPE}")
    return ParsedCall(raw=body, call=ToolCall(id=call_id, name=obj["name"], arguments=args))


def render_tool_call(call: ToolCall) -> str:
    """The compact form tirl's chatml-tools template writes (and SFT traces teach)."""
    return OPEN + json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False) + CLOSE
