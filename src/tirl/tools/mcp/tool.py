"""The `mcp` provider: one `MCPTool` per server tool, all calling through one shared `MCPConnection`.

`build_mcp` starts the connection, keeps the server tools that `include`/`exclude` select and names
them `prefix` + the server's name; `MCPTool.run` returns the result rendered as text
(`render_result`) or raises `MCPToolError` for an error result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from tirl.tools.base import Tool
from tirl.tools.mcp.connection import MCPConnection, MCPToolError
from tirl.tools.mcp.settings import MCPSettings
from tirl.tools.providers import register_provider

_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# ---------------------------------------------------------------------------------------------------
# Provider and tool


@register_provider("mcp", MCPSettings)
def build_mcp(settings: MCPSettings) -> list[Tool]:
    """Tools of an MCP server (stdio command or streamable HTTP url), one per server tool."""
    _require_mcp_sdk()
    connection = MCPConnection(settings)
    try:
        server_tools = select_tools(connection.start(), settings, connection.target)
        tools: list[Tool] = [MCPTool(connection, t, settings.prefix) for t in server_tools]
    except BaseException:
        connection.close()
        raise
    connection.tool_names = [t.name for t in tools]
    return tools


def select_tools(server_tools: Sequence[Any], settings: MCPSettings, target: str) -> list[Any]:
    """The server tools that `include`/`exclude` keep, in server order; `ValueError` naming a bad entry.

    Every name in `include` or `exclude` must exist on the server, every kept name with `prefix` must be
    a valid tool name, and at least one tool must remain.
    """
    names = [t.name for t in server_tools]
    for key, wanted in (("include", settings.include or []), ("exclude", settings.exclude)):
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ValueError(f"tools.mcp.{key}: MCP server {target} has no tool {unknown[0]!r}; it has: {names}")
    kept = [t for t in server_tools if (settings.include is None or t.name in settings.include)
            and t.name not in settings.exclude]
    if not kept:
        raise ValueError(f"MCP server {target}: no tools left (server tools: {names}; see tools.mcp.include/exclude)")
    for t in kept:
        if not _TOOL_NAME_RE.match(settings.prefix + t.name):
            raise ValueError(f"MCP server {target}: tool name {settings.prefix + t.name!r} is not a valid tool name "
                             "(1-64 letters, digits, '_' or '-'); leave it out with tools.mcp.exclude")
    return kept


class MCPTool(Tool):
    """One tool of an MCP server, called through the server's shared `MCPConnection`."""

    def __init__(self, connection: MCPConnection, server_tool: Any, prefix: str = ""):
        self.connection = connection
        self.server_tool_name: str = server_tool.name
        """The name the server knows the tool by (`name` without the prefix)."""
        self.name = prefix + server_tool.name
        self.description = server_tool.description or server_tool.title or f"The {server_tool.name} tool."
        self.parameters = dict(server_tool.input_schema)

    async def run(self, **arguments: Any) -> str:
        """Call the server tool; its content as text. `MCPToolError` for an error result,
        `TransientToolError` for a lost connection (the next call reconnects)."""
        result = await self.connection.call_tool(self.server_tool_name, arguments)
        text = render_result(result)
        if result.is_error:
            raise MCPToolError(text or f"the MCP tool {self.server_tool_name!r} failed without a message")
        return text

    async def aclose(self) -> None:
        """Close the server's shared connection (idempotent; a later call reconnects)."""
        await self.connection.aclose()

    def describe(self) -> dict[str, Any]:
        return {**self.connection.describe(), "server_tool": self.server_tool_name}


def render_result(result: Any) -> str:
    """A `CallToolResult` as the text the model reads (see the module doc)."""
    parts = [_render_part(part) for part in result.content]
    if not parts and result.structured_content is not None:
        parts = [json.dumps(result.structured_content, ensure_ascii=False)]
    return "\n".join(parts)


def _render_part(part: Any) -> str:
    kind = getattr(part, "type", None)
    if kind == "text":
        return part.text
    if kind in ("image", "audio"):
        return f"[{kind}: {part.mime_type}, {_base64_size(part.data)} bytes]"
    if kind == "resource_link":
        return f"[resource link: {part.name} <{part.uri}>]"
    if kind == "resource":
        inner = part.resource
        if getattr(inner, "text", None) is not None:
            return inner.text
        return f"[resource: {inner.uri}, {inner.mime_type or 'binary'}, {_base64_size(inner.blob)} bytes]"
    return f"[{kind or type(part).__name__} content]"


def _base64_size(data: str) -> int:
    return len(data) * 3 // 4 - data[-2:].count("=")


def _require_mcp_sdk() -> None:
    try:
        from mcp import Client  # noqa: F401  (added in the SDK's 2.0)
    except ImportError as e:
        raise ImportError("the mcp tool needs the MCP Python SDK 2.x: pip install -U 'tirl[mcp]'") from e
