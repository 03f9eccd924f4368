"""A small real MCP server for the tests of `tirl.tools.mcp`.

    python mcp_demo_server.py stdio [--crash-once MARKER]
    python mcp_demo_server.py http --port N [--crash-once MARKER]

Tools: `add(a, b)`, `echo(text)`, `fail(message)` (an error result), `crash(after_s)` (the process
exits with `os._exit`, at once or `after_s` seconds after answering), `sleep(seconds)`, `pixel()` (an
image part), `header(name)` (an HTTP request header; empty over stdio) and `calls()` (how many tool calls
this process ran before, so a test can tell whether a call reached the server or the server restarted).
With `--crash-once MARKER`, `crash` exits only if the file MARKER does not exist yet (creating it
first), so a restarted server answers the same call. In `http` mode the server listens on 127.0.0.1
(`--port 0`: a free port) and prints `listening on <port>` on stdout once the socket accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
from pathlib import Path

from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

_PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201d5a1a3a90000000049454e44ae426082"
)


def build_server(crash_once_marker: Path | None) -> MCPServer:
    """The demo server; `crash_once_marker` makes `crash` exit only the first time."""
    server = MCPServer("tirl-demo")
    ran = [0]

    @server.tool()
    def calls() -> int:
        """How many tool calls this server process ran before this one."""
        ran[0] += 1
        return ran[0] - 1

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        ran[0] += 1
        return a + b

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        ran[0] += 1
        return text

    @server.tool()
    def fail(message: str = "this tool always fails") -> str:
        """Fail with the given message (an error result, the server keeps running)."""
        ran[0] += 1
        raise ToolError(message)

    @server.tool()
    def crash(after_s: float = 0.0) -> str:
        """Kill the server process, at once or `after_s` seconds after answering."""
        ran[0] += 1
        if crash_once_marker is not None and crash_once_marker.exists():
            return "survived: the server crashed once already"
        if crash_once_marker is not None:
            crash_once_marker.touch()
        if after_s > 0:
            threading.Timer(after_s, os._exit, args=(3,)).start()
            return f"exiting in {after_s:g} s"
        print("demo server: crashing on request", file=sys.stderr, flush=True)
        os._exit(3)

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Sleep for the given number of seconds, then answer."""
        ran[0] += 1
        await asyncio.sleep(seconds)
        return f"slept {seconds:g} s"

    @server.tool()
    def pixel() -> Image:
        """Return a 1x1 PNG image."""
        ran[0] += 1
        return Image(data=_PNG_1x1, format="png")

    @server.tool()
    def header(name: str, ctx: Context) -> str:
        """The value of an HTTP request header ('' if absent or not over HTTP)."""
        ran[0] += 1
        return (ctx.headers or {}).get(name.lower(), "")

    return server


async def serve_http(server: MCPServer, port: int) -> None:
    """Serve streamable HTTP at http://127.0.0.1:<port>/mcp; print the port once listening."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    print(f"listening on {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning")
    await uvicorn.Server(config).serve(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=0, help="http: port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--crash-once", type=Path, default=None, metavar="MARKER")
    args = parser.parse_args(argv)
    server = build_server(args.crash_once)
    if args.transport == "stdio":
        server.run("stdio")
    else:
        asyncio.run(serve_http(server, args.port))


if __name__ == "__main__":
    main()
