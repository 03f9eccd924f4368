"""The `mcp` provider: the tools of an MCP (Model Context Protocol) server as tirl tools.

    task: {tools: [mcp]}
    tools:
      mcp: {command: [npx, -y, "@modelcontextprotocol/server-everything"], prefix: ev_, exclude: [longRunningOperation]}
      # or: mcp: {url: "http://127.0.0.1:8000/mcp", headers: {Authorization: "Bearer ..."}}

Building starts the stdio server (`command`) or connects to the streamable HTTP endpoint (`url`),
negotiates the protocol, lists the tools and returns one `MCPTool` per server tool: named `prefix` + the
server's name, with the server's description and its `inputSchema` as `parameters` (so `Tool.validate`
rejects bad arguments before they reach the server). Startup must finish within `startup_timeout_s`, else
the build fails with an error naming the command or url, the cause and the server's last stderr lines.

One client session per process, shared by all tools of the server, lives in a daemon thread with its own
event loop: `run` submits the call there and awaits it from any caller loop (a run has one loop per
stage); a cancelled caller (a `ToolSet` timeout) cancels the request and the session stays usable.

The model sees the result's text parts joined by newlines, other parts in brackets (`[image: image/png,
70 bytes]`), or the structured content as JSON when there is no content. An `isError` result raises
`MCPToolError` with the server's text. A crashed server or a lost connection raises `TransientToolError`
(retried by `ToolSet` when `retries` allows; never here) and the next call reconnects (a new server
process, or a new HTTP session); a stdio server that exits between calls is restarted on the next call.

`aclose()` on any tool (idempotent) closes the session, stops the stdio server (the SDK closes its stdin,
then signals its process group) and ends the thread; a later call starts them again. Connections never
closed are closed at interpreter exit. A pickled tool carries only its settings and reconnects on first use.
"""

from tirl.tools.mcp.connection import (
    CLOSE_TIMEOUT_S,
    MCPConnection,
    MCPStartupError,
    MCPToolError,
    logger,
)
from tirl.tools.mcp.settings import MCPSettings
from tirl.tools.mcp.stderr import ERROR_STDERR_CHARS, STDERR_TAIL_CHARS
from tirl.tools.mcp.tool import MCPTool, build_mcp, render_result, select_tools  # registers the `mcp` provider

__all__ = [
    "CLOSE_TIMEOUT_S",
    "ERROR_STDERR_CHARS",
    "MCPConnection",
    "MCPSettings",
    "MCPStartupError",
    "MCPTool",
    "MCPToolError",
    "STDERR_TAIL_CHARS",
    "build_mcp",
    "logger",
    "render_result",
    "select_tools",
]
