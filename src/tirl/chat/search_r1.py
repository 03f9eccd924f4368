"""Search-R1-style search calls: `<search>query</search>` in the model's text.

Search-R1 (Jin et al., 2025) teaches a model to write its query between `<search>` tags; the
environment answers with the retrieved passages wrapped in `<information>...</information>` (the
`search` tool's `output_format: search_r1` writes exactly that text). `parse_search_calls` has the
shape of `tirl.chat.hermes.parse_tool_calls`, so it plugs into `ToolEnv(parser=...)`: every
`<search>` block becomes a call of the tool named `search` with `{"query": <text between the tags,
stripped>}`.

Parsing never raises (DESIGN.md invariant 4): a block without its closing tag becomes a `ParsedCall`
with an error, which the env returns to the model as an `invalid_call` result. An empty block is a
call with an empty query; the search tool answers it with an error the model sees.
"""

from __future__ import annotations

import re

from tirl.chat.hermes import ParsedCall
from tirl.types import ToolCall

OPEN, CLOSE = "<search>", "</search>"
"""The tags around a query; generation stops at `CLOSE` (the end of a call)."""
INFORMATION_OPEN, INFORMATION_CLOSE = "<information>", "</information>"
"""The tags around the passages the environment returns."""
TOOL_NAME = "search"
"""Name of the tool every block calls."""

_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def parse_search_calls(text: str, id_prefix: str = "call") -> list[ParsedCall]:
    """Every `<search>` block in `text`, in order; ids are `<id_prefix>_<k>`.

    A closed block is `ToolCall(name="search", arguments={"query": body.strip()})`; an unterminated
    one (the text ends before `</search>`) is a `ParsedCall` with an error.
    """
    out: list[ParsedCall] = []
    for k, m in enumerate(_BLOCK.finditer(text)):
        body, closed = m.group(1), bool(m.group(2))
        if not closed:
            out.append(ParsedCall(raw=body, error=f"unterminated {OPEN}: the query must end with {CLOSE}"))
            continue
        call = ToolCall(id=f"{id_prefix}_{k}", name=TOOL_NAME, arguments={"query": body.strip()})
        out.append(ParsedCall(raw=body, call=call))
    return out


def render_search_call(query: str) -> str:
    """The text a model writes to search for `query` (what `parse_search_calls` reads back).

    Raises `ValueError` if `query` contains the closing tag (it could not be read back).
    """
    if CLOSE in query:
        raise ValueError(f"a search query cannot contain {CLOSE!r}")
    return f"{OPEN}{query}{CLOSE}"
