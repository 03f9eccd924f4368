"""The client session of one MCP server, owned by a daemon thread with its own event loop.

`MCPConnection` is shared by all tools of a server and may be used from any thread or event loop:
`start` connects (blocking) and lists the server's tools, `call_tool` runs one `tools/call` in the
connection's loop and awaits it from the caller's loop. A lost session (a stdio server that exited,
a dropped HTTP connection) raises `TransientToolError` and the next call opens a new one; a failed
start raises `MCPStartupError`. `aclose`/`close` (idempotent) end the session, the server and the
thread; connections never closed are closed at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import shlex
import threading
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from tirl.tools.base import TransientToolError
from tirl.tools.mcp.settings import MCPSettings
from tirl.tools.mcp.stderr import StderrTail

logger = logging.getLogger(__package__)  # one logger for the whole package

CLOSE_TIMEOUT_S = 15.0
"""Longest wait for a connection to close (the SDK gives a stdio server 2 s + 2 s before SIGKILL)."""
_T = TypeVar("_T")


class MCPToolError(RuntimeError):
    """The server answered the call with an error (an `isError` result or a protocol error)."""


class MCPStartupError(RuntimeError):
    """The server could not be started or connected to, or did not answer in time."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason
        """What happened, without the server's name and stderr (the message has both)."""


# ---------------------------------------------------------------------------------------------------
# Connection: a background event loop owning the client session


@dataclass(eq=False)
class _Link:
    """One client session (one server process, or one HTTP session) and the task that owns it.

    The owner task enters and exits the transport and the session, as anyio requires of one task.
    """

    stop: asyncio.Event
    """Set to make the owner close a live session gracefully."""
    ready: asyncio.Future[list[Any]]
    """The server's tools once initialized; the startup failure otherwise."""
    client: Any = None
    """The `mcp.Client`, once ready."""
    owner: asyncio.Task[None] | None = None
    scope: Any = None
    """The owner's anyio cancel scope: cancelled to abandon a startup that hangs."""
    stderr: StderrTail | None = None
    """stdio only: the server's latest stderr output."""
    broken: bool = False
    """The session ended (server exited, connection lost): the next call opens a new link."""

    @property
    def live(self) -> bool:
        """Initialized and not known to be broken."""
        ready = self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None
        return ready and not self.broken


@dataclass(eq=False)
class _LoopThread:
    """The connection's daemon thread and its event loop."""

    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    stopping: asyncio.Event
    """Set (from any thread, via the loop) to close the connection and end the thread."""
    finished: concurrent.futures.Future[None]
    """Done when the thread's loop has closed."""
    connecting: asyncio.Task[_Link] | None = None
    """The task that opened (or is opening) the current link; used only in this loop."""


class MCPConnection:
    """The client session of one MCP server for this process, shared by all tools of that server.

    Thread-safe: `start`, `call_tool`, `aclose` and `close` may be called from any thread or event loop.
    Everything async runs in the connection's own thread and event loop.
    """

    def __init__(self, settings: MCPSettings):
        self.settings = settings
        self.target = shlex.join(settings.command) if settings.command else _without_userinfo(settings.url or "")
        """The server as named in messages: its command line or its url."""
        self.tool_names: list[str] = []
        """Names of the tirl tools built on this connection (for `describe`)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._runtime: _LoopThread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "tool_names": self.tool_names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])  # type: ignore[misc]
        self.tool_names = state["tool_names"]

    def describe(self) -> dict[str, Any]:
        """The server (command, cwd and env names, or url and header names) and the tools built on it."""
        s = self.settings
        if s.command is not None:
            server = {"transport": "stdio", "command": list(s.command), "cwd": s.cwd, "env": sorted(s.env or {})}
        else:
            server = {"transport": "streamable-http", "url": self.target, "headers": sorted(s.headers or {})}
        return {**server, "tools": list(self.tool_names)}

    # --- public, any thread ---------------------------------------------------------------------------

    def start(self) -> list[Any]:
        """Connect (blocking) and return the server's tools; `MCPStartupError` if that fails."""
        future = self._submit(self._link)
        return future.result(self.settings.startup_timeout_s + CLOSE_TIMEOUT_S).ready.result()

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        """The server's `CallToolResult` for one call, awaited from the caller's event loop."""
        future = asyncio.wrap_future(self._submit(lambda runtime: self._call(runtime, name, arguments)))
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller cancelled (a timeout): the request was cancelled with it
            raise TransientToolError("the connection to the MCP server was closed during the call") from None

    async def aclose(self) -> None:
        """Close the session, stop the server and end the thread; idempotent."""
        runtime = self._request_stop()
        if runtime is not None and runtime.thread is not threading.current_thread():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.shield(asyncio.wrap_future(runtime.finished))
            runtime.thread.join(1.0)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """`aclose` for synchronous code (blocks until closed or `timeout_s` passed)."""
        runtime = self._request_stop()
        if runtime is not None and runtime.thread is not threading.current_thread():
            runtime.thread.join(timeout_s)

    # --- the loop thread --------------------------------------------------------------------------

    def _submit(self, job: Callable[[_LoopThread], Coroutine[Any, Any, _T]]) -> concurrent.futures.Future[_T]:
        """Run `job(runtime)` in the connection's loop, starting the thread if needed."""
        with self._lock:
            if os.getpid() != self._pid:  # a forked child: the parent's thread does not exist here
                self._pid, self._runtime = os.getpid(), None
            if self._runtime is None:
                started: concurrent.futures.Future[_LoopThread] = concurrent.futures.Future()
                thread = threading.Thread(target=self._thread_main, args=(started,), daemon=True,
                                          name=f"tirl-mcp {self.target[:40]}")
                thread.start()
                self._runtime = started.result()
                _LIVE_CONNECTIONS.add(self)
            return asyncio.run_coroutine_threadsafe(job(self._runtime), self._runtime.loop)

    def _request_stop(self) -> _LoopThread | None:
        """Tell the loop to close everything and end; its thread (None if none was running)."""
        with self._lock:
            runtime, self._runtime = self._runtime, None
            if os.getpid() != self._pid:  # a forked child: the parent's thread is not ours to stop
                self._pid, runtime = os.getpid(), None
        if runtime is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                runtime.loop.call_soon_threadsafe(runtime.stopping.set)
        return runtime

    def _thread_main(self, started: concurrent.futures.Future[_LoopThread]) -> None:
        finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            with asyncio.Runner() as runner:  # at the end: cancels leftover tasks, shuts down async generators
                runner.run(self._serve(started, finished))
        finally:
            finished.set_result(None)
            if not started.done():
                started.set_exception(RuntimeError(f"the event loop of MCP server {self.target} failed to start"))

    async def _serve(self, started: concurrent.futures.Future[_LoopThread],
                     finished: concurrent.futures.Future[None]) -> None:
        runtime = _LoopThread(threading.current_thread(), asyncio.get_running_loop(), asyncio.Event(), finished)
        started.set_result(runtime)
        try:
            await runtime.stopping.wait()
        finally:
            connecting, runtime.connecting = runtime.connecting, None
            if connecting is not None:
                connecting.cancel()
                link = await _settled(connecting)
                if link is not None:
                    await self._discard(link)

    # --- links (in the loop thread) ----------------------------------------------------------------

    async def _link(self, runtime: _LoopThread) -> _Link:
        """The live link, opening one if there is none (concurrent callers share one attempt)."""
        while (task := runtime.connecting) is not None:
            if not task.done():
                return await asyncio.shield(task)
            link = None if task.cancelled() or task.exception() is not None else task.result()
            if link is not None and not link.broken:
                return link
            if link is not None:
                await self._discard(link)
            if runtime.connecting is task:  # nobody opened a new one meanwhile
                break
        if runtime.stopping.is_set():
            raise TransientToolError(f"the connection to MCP server {self.target} is closing")
        task = runtime.connecting = asyncio.get_running_loop().create_task(self._open())
        task.add_done_callback(_retrieve_exception)
        return await asyncio.shield(task)

    async def _open(self) -> _Link:
        loop = asyncio.get_running_loop()
        link = _Link(stop=asyncio.Event(), ready=loop.create_future())
        link.owner = loop.create_task(self._own(link))
        timeout_s = self.settings.startup_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(link.ready)
        except BaseException as error:
            link.ready.cancel()
            await self._discard(link)
            if isinstance(error, asyncio.CancelledError):
                raise
            what = (f"no answer within {timeout_s:g} s (startup_timeout_s: connect, initialize, list tools)"
                    if isinstance(error, TimeoutError) else _describe_failure(error, starting=True))
            message = f"MCP server {self.target} failed to start: {what}{_stderr_note(link)}"
            raise MCPStartupError(message, what) from None
        return link

    async def _own(self, link: _Link) -> None:
        """Open the transport and the session, publish the tools, hold the session until `link.stop`."""
        import anyio
        import mcp

        try:
            with anyio.CancelScope() as link.scope:
                async with contextlib.AsyncExitStack() as stack:
                    transport = await self._transport(stack, link)
                    link.client = await stack.enter_async_context(mcp.Client(transport, mode="auto", cache=None))
                    tools = await _list_all_tools(link.client)
                    if not link.ready.done():
                        link.ready.set_result(tools)
                    await link.stop.wait()
        except Exception as error:  # the session ended: a failed startup, or a lost HTTP connection
            if not link.ready.done():
                link.ready.set_exception(error)
            elif not link.stop.is_set():
                logger.warning("MCP server %s: connection lost (%s)", self.target, _describe_failure(error))
        finally:
            link.broken = True
            if not link.ready.done():
                link.ready.set_exception(RuntimeError("the connection was closed during startup"))

    async def _transport(self, stack: contextlib.AsyncExitStack, link: _Link) -> Any:
        """The transport for `mcp.Client`: stdio streams already opened on `stack`, or an HTTP transport."""
        s = self.settings
        if s.url is not None:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            timeout = httpx2.Timeout(30.0, read=300.0)  # the SDK's defaults: a response stream may stay open
            http_client = await stack.enter_async_context(httpx2.AsyncClient(headers=s.headers, timeout=timeout))
            return streamable_http_client(s.url, http_client=http_client)
        from mcp import StdioServerParameters, stdio_client

        assert s.command is not None
        params = StdioServerParameters(command=s.command[0], args=s.command[1:], env=s.env, cwd=s.cwd)
        link.stderr = stderr = StderrTail(self.target, on_eof=lambda: self._on_server_exit(link))
        stack.push_async_callback(stderr.aclose)
        try:
            # `errlog` becomes the server's stderr: any file descriptor will do
            streams = await stack.enter_async_context(stdio_client(params, errlog=stderr.write_fd))  # type: ignore
        finally:
            stderr.close_write_end()  # the server holds its own copy now
        await stderr.start()
        return _opened(streams)

    def _on_server_exit(self, link: _Link) -> None:
        if link.live and not link.stop.is_set():
            logger.warning("MCP server %s exited; it is restarted on the next call%s", self.target, _stderr_note(link))
            link.broken = True
            link.stop.set()  # the owner closes the dead session now

    async def _discard(self, link: _Link) -> None:
        """Close a link and wait for its owner (bounded; never raises but a caller's cancellation)."""
        if not link.live and link.scope is not None:
            link.scope.cancel()  # still starting: abandon the handshake
        link.stop.set()
        link.broken = True
        if link.owner is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await _settled(asyncio.shield(link.owner))

    async def _call(self, runtime: _LoopThread, name: str, arguments: dict[str, Any]) -> Any:
        """One `tools/call` on the live link; connection failures become `TransientToolError`."""
        from mcp import MCPError

        try:
            link = await self._link(runtime)
        except MCPStartupError as e:
            logger.warning("%s", e)
            raise TransientToolError(f"the MCP server is unavailable: {e.reason}") from None
        try:
            return await link.client.call_tool(name, arguments)
        except MCPError as e:
            if not _is_lost_connection(e):
                raise MCPToolError(f"MCP error {e.error.code}: {e.error.message}") from None
            error: BaseException = e
        except Exception as e:
            if not _is_lost_connection(e):
                raise
            error = e
        if runtime.stopping.is_set():
            raise TransientToolError("the connection to the MCP server was closed during the call (shutdown)")
        reported = link.broken  # the exit or the lost connection was logged when it happened
        await self._discard(link)
        cause = _describe_failure(error)
        if not reported:
            logger.warning("MCP server %s: connection lost during a call of %r (%s)%s", self.target, name, cause,
                           _stderr_note(link))
        raise TransientToolError(f"the connection to the MCP server was lost during the call ({cause}); "
                                 "the next call reconnects")


def _is_lost_connection(error: BaseException) -> bool:
    """Whether `error` (from a call) means the session is gone rather than that the call failed."""
    from mcp import MCPError
    from mcp_types import CONNECTION_CLOSED

    if isinstance(error, MCPError):
        return error.error.code == CONNECTION_CLOSED or error.error.message == "Session terminated"
    import anyio
    import httpx2

    return isinstance(error, (OSError, httpx2.TransportError, anyio.BrokenResourceError, anyio.ClosedResourceError,
                              anyio.EndOfStream))


async def _list_all_tools(client: Any) -> list[Any]:
    tools, cursor = [], None
    for _ in range(1000):  # a server whose cursor never ends cannot hang the startup
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


@contextlib.asynccontextmanager
async def _opened(streams: Any) -> Any:
    """A transport that hands `mcp.Client` streams opened (and closed) elsewhere."""
    yield streams


async def _settled(awaitable: Any) -> Any:
    """The result of `awaitable`, or None if it failed or was cancelled (its owner reports failures)."""
    try:
        return await awaitable
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return None
    except Exception:
        return None


def _retrieve_exception(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved: callers that gave up waiting get no "never retrieved" warning


def _describe_failure(error: BaseException, starting: bool = False) -> str:
    """The innermost meaningful cause of a connection failure, in a few words."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    from mcp import MCPError
    from mcp_types import CONNECTION_CLOSED

    if isinstance(error, MCPError) and error.error.code == CONNECTION_CLOSED:
        return ("the server closed the connection before answering (it exited, or is not an MCP server)"
                if starting else "the server closed the connection")
    if isinstance(error, FileNotFoundError):
        return f"cannot run the command: {error}"
    message = str(error).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _stderr_note(link: _Link) -> str:
    tail = link.stderr.tail() if link.stderr is not None else ""
    return f"; server stderr (last lines): {tail}" if tail else ""


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# ---------------------------------------------------------------------------------------------------
# Interpreter exit

_LIVE_CONNECTIONS: weakref.WeakSet[MCPConnection] = weakref.WeakSet()


@atexit.register
def _close_connections_at_exit() -> None:
    """Close connections never closed (atexit runs before daemon threads are stopped)."""
    for connection in list(_LIVE_CONNECTIONS):
        connection.close()
