"""The `remote` provider: the tools of a `tirl serve-tools` server, called over HTTP.

    task: {tools: [remote]}
    tools:
      remote: {url: "http://10.0.0.5:8765", tools: [search], retries: 3}   # token: $TIRL_TOOL_SERVER_TOKEN

Building fetches `GET /tools` (within `connect_timeout_s`) and returns one `RemoteTool` per remote
tool (all, or those in `tools`), named `prefix` + the remote name, with the remote schema and
description. Arguments are validated by the server's tool, so a result (validation errors included)
is exactly what a local call of that tool gives; only its `latency_s` differs. Its `timeout_s`
is the server's limit for that tool plus `TIMEOUT_MARGIN_S`, so the server's own timeout result
normally arrives first (`tools.remote.timeout_s` overrides it as for any tool).

`run` POSTs one call to `/call` and returns the server's `ToolResult` unchanged (status and content:
an error result stays that error result). A connection that fails (refused, reset, lost mid-call) and
HTTP 502/503 raise `TransientToolError`, which `ToolSet` retries when `retries` is set; this module
never retries by itself. A retried call may have run on the server already (the connection was lost
after sending it): give stateful tools no retries where running a call twice matters. Any other
failure (a rejected token, a closed session, a malformed answer) raises `RemoteToolError`, an
`execution_error` the model sees.

Sessions: for a tool the server marks `stateful` (a persistent interpreter), `session()` returns a
per-trajectory instance that opens a server session on its first call and deletes it on `aclose()`.
A session the server closed (idle past its TTL, or server restarted) is an error, never silently
replaced, since its state is gone. Stateless tools share one instance and no session.

Connections: the tools built from one `url` share up to `max_connections` keep-alive connections
(httpx2 clients of `CONNECTIONS_PER_POOL` each), which live in a daemon thread with its own event loop,
so the tools work from any event loop (a run uses one per stage); cancelling a call (a `ToolSet`
timeout) cancels its request. `aclose()` on a shared tool closes the connections and stops the thread;
a later call starts them again. A pickled tool carries only its settings.
httpx2 is imported when a tool is built (`pip install 'tirl[server]'`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pydantic

from tirl.tools.base import Tool, TransientToolError, _require_object, describe_exception
from tirl.tools.providers import ToolSettings, register_provider
from tirl.tools.server import TOKEN_ENV
from tirl.types import ToolResult, ToolStatus

logger = logging.getLogger(__name__)

TIMEOUT_MARGIN_S = 5.0
"""Seconds added to the server's time limit of a tool to make the client-side limit."""
CONNECTIONS_PER_POOL = 32
"""Connections per `httpx2.AsyncClient`: its pool does work per connection on every request event, so
`max_connections` are split over several clients of at most this many (measured: 256 connections in
one pool cost about 2 ms of CPU per call; in pools of 32, about a third of that)."""
CLOSE_TIMEOUT_S = 10.0
"""Longest wait for the client's thread to finish closing."""
TRANSIENT_HTTP_STATUSES = (502, 503)
"""Answers meaning 'the server (or the proxy before it) is not available now': retryable."""
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{0,63}$")
_T = TypeVar("_T")
_on_client_thread = threading.local()
"""`.current`: the `_ClientThread` whose thread this is (set in that thread only)."""


class RemoteToolError(RuntimeError):
    """The tool server cannot be used as configured, or answered something other than a result."""


class RemoteSettings(ToolSettings):
    """Settings of the `remote` tool (`tools.remote.<key>`)."""

    url: str = pydantic.Field(..., description="The server's address, e.g. http://10.0.0.5:8765.")
    token: str | None = pydantic.Field(None, description=(
        "Bearer token. Prefer the environment variable (`token_env`): this value is saved with the run's config."))
    token_env: str = pydantic.Field(TOKEN_ENV, description="Environment variable read when `token` is not set.")
    tools: list[str] | None = pydantic.Field(None, description="Remote tool names to use (default: all).")
    prefix: str = pydantic.Field("", description="Prepended to every remote tool name (letters, digits, '_', '-').")
    connect_timeout_s: float = pydantic.Field(10.0, gt=0, description=(
        "Seconds to connect (each call), and to fetch the tool list at build."))
    max_connections: int = pydantic.Field(256, ge=1, le=4096, description=(
        "Connections to the server at most, so also the calls in flight at most (further calls wait)."))

    @pydantic.field_validator("url")
    @classmethod
    def _url_is_http(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: give the server's base address, without a query or fragment")
        return url.rstrip("/")

    @pydantic.field_validator("prefix")
    @classmethod
    def _prefix_is_a_name(cls, prefix: str) -> str:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"{prefix!r} may hold only letters, digits, '_' and '-' (at most 63)")
        return prefix

    @pydantic.field_validator("tools")
    @classmethod
    def _tools_named(cls, tools: list[str] | None) -> list[str] | None:
        if tools is not None and not tools:
            raise ValueError("empty list: leave `tools` out to use every remote tool")
        return tools

    def resolved_token(self) -> str | None:
        """`token`, else the value of `token_env`, else None."""
        return self.token if self.token is not None else (os.environ.get(self.token_env) or None)


# ---------------------------------------------------------------------------------------------------
# The connection to one server


class _ClientThread:
    """A daemon thread running an event loop and the `httpx2.AsyncClient`s used on it."""

    def __init__(self, connect_timeout_s: float, max_connections: int):
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._clients: list[Any] = []
        self._in_flight: list[int] = []
        self._thread = threading.Thread(target=self._run, name="tirl-remote-tools", daemon=True)
        self._thread.start()

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        """One request, on the client with the fewest requests in flight (call only on this thread)."""
        if not self._clients:
            self._clients = self._make_clients()
            self._in_flight = [0] * len(self._clients)
        i = min(range(len(self._clients)), key=self._in_flight.__getitem__)
        self._in_flight[i] += 1
        try:
            return await self._clients[i].request(method, url, **kwargs)
        finally:
            self._in_flight[i] -= 1

    def _make_clients(self) -> list[Any]:
        import httpx2

        timeout = httpx2.Timeout(None, connect=self.connect_timeout_s)  # ToolSet limits the call as a whole
        full, rest = divmod(self.max_connections, CONNECTIONS_PER_POOL)
        sizes = [CONNECTIONS_PER_POOL] * full + ([rest] if rest else [])
        return [httpx2.AsyncClient(timeout=timeout, limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n))
                for n in sizes]

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule `coro` on this thread's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def _run(self) -> None:
        _on_client_thread.current = self
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            for client in self._clients:
                self.loop.run_until_complete(client.aclose())
            self.loop.close()

    def stop(self) -> None:
        """Cancel what is running, close the client, end the thread (blocks up to `CLOSE_TIMEOUT_S`)."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CLOSE_TIMEOUT_S)


class RemoteServer:
    """One tool server: its address and token, and the client thread shared by its tools."""

    def __init__(self, url: str, token: str | None, connect_timeout_s: float, max_connections: int = 256):
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._lock = threading.Lock()
        self._thread: _ClientThread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "connect_timeout_s": self.connect_timeout_s, "max_connections": self.max_connections,
                "_headers": self._headers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _thread=None)

    def fetch_tools(self) -> list[dict[str, Any]]:
        """`GET /tools`, synchronously (at build); `RemoteToolError` saying what failed."""
        import httpx2

        try:
            with httpx2.Client(timeout=self.connect_timeout_s, headers=self._headers) as client:
                response = client.get(f"{self.url}/tools")
        except httpx2.HTTPError as e:
            raise RemoteToolError(f"tool server {self.url}: cannot fetch its tools ({describe_exception(e)}); "
                                  f"is `tirl serve-tools` running there?") from None
        self._check_status(response)
        listing = _json(response)
        if not isinstance(listing, dict) or not isinstance(listing.get("tools"), list):
            raise RemoteToolError(f"tool server {self.url}: /tools answered something other than a tool list")
        return listing["tools"]

    async def call(self, tool: str, arguments: dict[str, Any], session: str | None) -> ToolResult:
        """Run one call on the server (`POST /call`); its `ToolResult`."""
        return await self._in_thread(self._post_call(tool, arguments, session))

    async def open_session(self) -> str:
        """A new session's id (`POST /sessions`); runs on the client thread."""
        data = _json(await self._request("POST", "/sessions"))
        if not isinstance(data, dict) or not isinstance(data.get("session"), str):
            raise RemoteToolError(f"tool server {self.url}: /sessions answered without a session id")
        return data["session"]

    async def delete_session(self, session: str) -> None:
        """Close a session on the server (`DELETE /sessions/{id}`); a session already gone is fine."""
        await self._in_thread(self._request("DELETE", f"/sessions/{session}", missing_ok=True))

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule `coro` on the client thread (started if needed)."""
        with self._lock:
            if self._thread is None or self._thread.pid != os.getpid():
                self._thread = _ClientThread(self.connect_timeout_s, self.max_connections)
            return self._thread.submit(coro)

    async def _in_thread(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return await asyncio.wrap_future(self.submit(coro))

    async def aclose(self) -> None:
        """Close the client and stop its thread (idempotent; a later call starts them again)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.pid == os.getpid():
            await asyncio.to_thread(thread.stop)

    async def _post_call(self, tool: str, arguments: dict[str, Any], session: str | None) -> ToolResult:
        call_id = uuid.uuid4().hex
        payload: dict[str, Any] = {"name": tool, "arguments": arguments, "id": call_id}
        if session is not None:
            payload["session"] = session
        response = await self._request("POST", "/call", missing_ok=session is not None, json=payload)
        if response.status_code == 404:
            raise RemoteToolError(f"the remote session is gone, and its state with it: {_detail(response)}")
        data = _json(response)
        try:
            result = ToolResult(call_id=data["call_id"], name=data["name"], content=data["content"],
                                status=ToolStatus(data["status"]), latency_s=float(data.get("latency_s", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise RemoteToolError(f"tool server {self.url}: malformed result ({describe_exception(e)})") from None
        if not isinstance(result.content, str) or result.call_id != call_id:
            raise RemoteToolError(f"tool server {self.url}: answered call {call_id!r} with {result.call_id!r}")
        return result

    async def _request(self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
        """One request on the client thread; failures raised as described in the module doc (a 404 is
        returned when `missing_ok`)."""
        import httpx2

        try:
            response = await _on_client_thread.current.request(method, f"{self.url}{path}", headers=self._headers,
                                                               **kwargs)
        except httpx2.TransportError as e:
            raise TransientToolError(f"tool server {self.url} unreachable: {describe_exception(e)}") from None
        if response.status_code in TRANSIENT_HTTP_STATUSES:
            raise TransientToolError(f"tool server {self.url} answered {response.status_code}: {_detail(response)}")
        if not (response.status_code == 404 and missing_ok):
            self._check_status(response)
        return response

    def _check_status(self, response: Any) -> None:
        if response.status_code == 401:
            raise RemoteToolError(f"tool server {self.url} rejected the token: set tools.<name>.token or "
                                  f"the variable named by token_env (default {TOKEN_ENV})")
        if response.status_code != 200:
            raise RemoteToolError(f"tool server {self.url} answered {response.status_code}: {_detail(response)}")


def _json(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        raise RemoteToolError(f"tool server answered with something other than JSON: {response.text[:200]!r}") from None


def _detail(response: Any) -> str:
    """The server's error message (`detail`), or the start of the body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else response.text[:300]


# ---------------------------------------------------------------------------------------------------
# Tools


class _LazySession:
    """One trajectory's session on the server: opened by the first call, deleted by `close`."""

    def __init__(self, server: RemoteServer):
        self.server = server
        self._lock = threading.Lock()
        self._opening: concurrent.futures.Future[str] | None = None
        self._closed = False

    async def id(self) -> str:
        """The session id, opening the session if this is the first call (concurrent calls share it)."""
        with self._lock:
            if self._closed:
                raise RemoteToolError("this trajectory's remote session was already closed")
            if self._opening is None:
                self._opening = self.server.submit(self.server.open_session())
            opening = self._opening
        try:  # shielded: a caller timing out must not cancel the opening that other calls wait for
            return await asyncio.shield(asyncio.wrap_future(opening))
        except Exception:
            with self._lock:
                if self._opening is opening:
                    self._opening = None  # the next call tries again
            raise

    async def close(self) -> None:
        """Delete the session on the server, if it was opened (idempotent; failures only logged:
        the server closes sessions idle past its TTL)."""
        with self._lock:
            opening, self._opening, self._closed = self._opening, None, True
        if opening is None or opening.cancelled():
            return
        try:
            session = await asyncio.wrap_future(opening)
        except Exception:
            return
        try:
            await self.server.delete_session(session)
        except Exception as e:
            logger.warning("could not delete session on tool server %s: %s", self.server.url, describe_exception(e))


class RemoteTool(Tool):
    """A tool of a `tirl serve-tools` server (see the module doc)."""

    def __init__(self, server: RemoteServer, listing: dict[str, Any], prefix: str = "",
                 session: _LazySession | None = None):
        """`listing` is the tool's entry in the server's `/tools` answer."""
        function = listing["schema"]["function"]
        self.server = server
        self.listing = listing
        self.prefix = prefix
        self.remote_name: str = listing["name"]
        self.name = prefix + self.remote_name
        self.description = function.get("description") or ""
        self.parameters = function.get("parameters") or {"type": "object", "properties": {}}
        remote_timeout_s = listing.get("timeout_s")
        self.timeout_s = remote_timeout_s + TIMEOUT_MARGIN_S if isinstance(remote_timeout_s, (int, float)) else None
        self.stateful = bool(listing.get("stateful"))
        self._session = session

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Checks only that the arguments are an object: the server's tool validates them, so errors
        read exactly as for a local call."""
        _require_object(arguments)
        return dict(arguments)

    async def run(self, **arguments: Any) -> ToolResult:
        session = await self._session.id() if self._session is not None else None
        return await self.server.call(self.remote_name, arguments, session)

    def session(self) -> RemoteTool:
        """A per-trajectory instance with its own server session for a stateful tool; else this one."""
        if not self.stateful:
            return self
        return RemoteTool(self.server, self.listing, self.prefix, _LazySession(self.server))

    async def aclose(self) -> None:
        """A session instance deletes its server session; a shared one closes the connection."""
        if self._session is not None:
            await self._session.close()
        else:
            await self.server.aclose()

    def describe(self) -> dict[str, Any]:
        return {"url": self.server.url, "remote_tool": self.remote_name, "stateful": self.stateful,
                "remote": self.listing.get("describe", {})}


def _check_listing(entry: Any, url: str) -> dict[str, Any]:
    """`entry` if it is a usable `/tools` entry; `RemoteToolError` otherwise."""
    schema = entry.get("schema") if isinstance(entry, dict) else None
    function = schema.get("function") if isinstance(schema, dict) else None
    if not isinstance(function, dict) or not isinstance(entry.get("name"), str) or not _NAME_RE.match(entry["name"]):
        raise RemoteToolError(f"tool server {url}: malformed tool entry {str(entry)[:200]}")
    return entry


@register_provider("remote", RemoteSettings)
def build_remote(settings: RemoteSettings) -> list[Tool]:
    """The tools of a `tirl serve-tools` server, called over HTTP (url, token, tools)."""
    try:
        import httpx2  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the remote tool needs httpx2: pip install 'tirl[server]' ({e})") from e
    server = RemoteServer(settings.url, settings.resolved_token(), settings.connect_timeout_s,
                          settings.max_connections)
    listings = {e["name"]: e for e in (_check_listing(e, settings.url) for e in server.fetch_tools())}
    wanted = settings.tools if settings.tools is not None else list(listings)
    missing = [name for name in wanted if name not in listings]
    if missing:
        raise ValueError(f"tools.remote.tools: {missing} not served by {settings.url} "
                         f"(it serves: {', '.join(listings) or 'nothing'})")
    return [RemoteTool(server, listings[name], settings.prefix) for name in wanted]
