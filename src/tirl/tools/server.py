"""`tirl serve-tools`: tirl tools behind an HTTP API, for rollouts on other machines (client: `remote`).

    tirl serve-tools --tools calculator search --config tools.yaml --port 8765
    # tools.yaml: a recipe's `tools:` section ({search: {corpus: wiki.jsonl}}), or a whole recipe
    # (its task.tools and tools are used)

Endpoints (JSON; with a token set, every one needs `Authorization: Bearer <token>`):

    GET    /health          {"ok": true, "tools": [name, ...]}
    GET    /tools           {"tools": [{"name", "schema", "describe", "timeout_s", "stateful"}, ...]}
    POST   /call            {"name", "arguments", "id", "session"?} -> a ToolResult
    POST   /batch           [call, ...] -> [ToolResult, ...]: run concurrently, answered in order
    POST   /sessions        -> {"session": id}
    DELETE /sessions/{id}   -> {"closed": true}; closes the session's tool instances

A ToolResult is `{"call_id", "name", "content", "status", "latency_s"}` (`tirl.types.ToolResult`).
Every call runs through `ToolSet.execute` of the served set, so a result is exactly what a local call
gives, and bad model output (an unknown tool, arguments that are not an object or do not match the
schema, a tool that raises) is an error *result* with status 200, never an HTTP error. HTTP errors are
for malformed requests (422, with a message naming the field), a wrong token (401), an unknown
session (404) and a body over the size limit (413). Outputs are cut only at `SERVER_MAX_OUTPUT_CHARS`:
the client's own `ToolSet` applies the model-facing limit, as it would for a local tool.

Sessions: `POST /sessions` opens a `ToolSet.session()` view (per-trajectory instances of stateful
tools, such as a persistent interpreter); calls carrying its id use it; `DELETE` closes it (`aclose`).
A session idle for `session_ttl_s` (no call running and none started) is closed by a sweeper.
`stateful` in `/tools` says whether a tool has per-session instances (clients open sessions only then).

Security: the server binds 127.0.0.1 by default. Binding any other address requires a token (`--token`
or `$TIRL_TOOL_SERVER_TOKEN`, at least `MIN_TOKEN_CHARS` characters), compared in constant time. The
server speaks plain HTTP: across untrusted networks put it behind a TLS proxy or an SSH tunnel.
Request bodies are limited to `max_body_bytes` (default 8 MiB). The app owns the served `ToolSet`:
shutting the server down closes every session and then calls `ToolSet.shutdown()`.

fastapi and uvicorn are imported when an app is made (`pip install 'tirl[server]'`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import yaml

from tirl.errors import TirlError
from tirl.tools.base import Tool, describe_exception
from tirl.tools.providers import build_toolset
from tirl.tools.toolset import ToolSet
from tirl.types import ToolCall, ToolResult

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
"""Address served when none is given: this machine only."""
DEFAULT_PORT = 8765
"""Port served when none is given."""
TOKEN_ENV = "TIRL_TOOL_SERVER_TOKEN"
"""Environment variable holding the bearer token (server and `remote` client)."""
MIN_TOKEN_CHARS = 16
"""Shortest token accepted."""
DEFAULT_SESSION_TTL_S = 1800.0
"""Seconds an idle session lives."""
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
"""Largest request body accepted."""
DEFAULT_CALL_TIMEOUT_S = 10.0
"""Time limit of a tool that sets none (neither in `tools.<name>.timeout_s` nor on the tool)."""
SERVER_MAX_OUTPUT_CHARS = 1_000_000
"""Outputs are cut here (bounding a response); the client's `ToolSet` applies the model-facing limit."""
_RECIPE_SECTIONS = {"run", "model", "task", "rollout", "algorithm", "rl", "sft", "eval", "pipeline", "tools"}


class ToolServerError(TirlError):
    """The server cannot start as asked (no tools, bad config, missing token, address in use)."""


# ---------------------------------------------------------------------------------------------------
# Requests and sessions


class CallRequest(pydantic.BaseModel):
    """One tool call, as `/call` and `/batch` take it."""

    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(..., description="Tool name (an unknown one gives an `unknown_tool` result).")
    arguments: Any = pydantic.Field(default_factory=dict, description=(
        "The model's arguments, passed on as given: anything but a matching object gives an error result."))
    id: str = pydantic.Field(..., description="Call id, echoed as the result's `call_id`.")
    session: str | None = pydantic.Field(None, description="Session id from `POST /sessions` (default: none).")


@dataclasses.dataclass
class _Session:
    """One open session: the set's per-trajectory view and when it was last used."""

    view: ToolSet
    """`ToolSet.session()` of the served set."""
    last_used: float
    """`time.monotonic()` when a call last started or ended."""
    running: int = 0
    """Calls in progress (a session with running calls never expires)."""


class SessionStore:
    """Open sessions by id; ids are random (`secrets.token_urlsafe`), so they cannot be guessed."""

    def __init__(self, toolset: ToolSet, ttl_s: float):
        """Sessions are views of `toolset`, closed after `ttl_s` seconds idle."""
        self.toolset = toolset
        self.ttl_s = ttl_s
        self._sessions: dict[str, _Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self) -> str:
        """A new session's id."""
        session_id = secrets.token_urlsafe(16)
        self._sessions[session_id] = _Session(self.toolset.session(), time.monotonic())
        return session_id

    def get(self, session_id: str) -> _Session | None:
        """The open session `session_id`, or None."""
        return self._sessions.get(session_id)

    @contextlib.contextmanager
    def using(self, session: _Session) -> Iterator[ToolSet]:
        """Mark a call running on `session` (it cannot expire meanwhile); yields its view."""
        session.running += 1
        session.last_used = time.monotonic()
        try:
            yield session.view
        finally:
            session.running -= 1
            session.last_used = time.monotonic()

    async def close(self, session_id: str) -> bool:
        """Close one session; False if it was not open. A tool failing to close is logged, not raised."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        try:
            await session.view.aclose()
        except Exception as e:
            logger.warning("closing a session's tools failed: %s", describe_exception(e))
        return True

    async def expire_idle(self) -> list[str]:
        """Close the sessions idle for longer than the TTL; their ids."""
        now = time.monotonic()
        idle = [i for i, s in self._sessions.items() if not s.running and now - s.last_used > self.ttl_s]
        for session_id in idle:
            await self.close(session_id)
        return idle

    async def close_all(self) -> None:
        """Close every session (server shutdown)."""
        for session_id in list(self._sessions):
            await self.close(session_id)


def result_json(result: ToolResult) -> dict[str, Any]:
    """A `ToolResult` as the JSON object the endpoints answer with."""
    return {"call_id": result.call_id, "name": result.name, "content": result.content,
            "status": str(result.status), "latency_s": result.latency_s}


async def _is_stateful(t: Tool) -> bool:
    """Whether `t.session()` gives per-session instances (probed once; a probe instance is closed)."""
    if type(t).session is Tool.session:
        return False
    probe = t.session()
    if probe is t:
        return False
    await probe.aclose()
    return True


# ---------------------------------------------------------------------------------------------------
# The app


def _require_server_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the tool server needs fastapi and uvicorn: pip install 'tirl[server]' ({e})") from e


class ToolService:
    """What the endpoints do, without HTTP: the served set, its sessions, and the execution options."""

    def __init__(self, toolset: ToolSet, session_ttl_s: float, default_timeout_s: float, max_output_chars: int):
        self.toolset = toolset
        self.sessions = SessionStore(toolset, session_ttl_s)
        self.execute_options = {"default_timeout_s": default_timeout_s, "max_output_chars": max_output_chars}
        self.stateful: dict[str, bool] = {}
        """Tool name -> whether it has per-session instances (probed at startup)."""

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> Any:
        """Startup: probe statefulness, start the session sweeper. Shutdown: close sessions, then the set."""
        for t in self.toolset:
            self.stateful[t.name] = await _is_stateful(t)
        sweeper = asyncio.create_task(_sweep(self.sessions))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await self.sessions.close_all()
            await self.toolset.shutdown()

    def listing(self) -> list[dict[str, Any]]:
        """The `/tools` entries."""
        described = self.toolset.describe()
        default_timeout_s = self.execute_options["default_timeout_s"]
        return [{"name": t.name, "schema": t.schema(), "describe": described[t.name],
                 "timeout_s": self.toolset.policy(t.name).timeout_s or t.timeout_s or default_timeout_s,
                 "stateful": self.stateful.get(t.name, False)} for t in self.toolset]

    def resolve_sessions(self, requests: Sequence[CallRequest]) -> list[_Session | None]:
        """The open session each request names (None: it names none); `KeyError(id)` for one not open."""
        found = []
        for r in requests:
            session = self.sessions.get(r.session) if r.session is not None else None
            if r.session is not None and session is None:
                raise KeyError(r.session)
            found.append(session)
        return found

    async def execute(self, request: CallRequest, session: _Session | None) -> dict[str, Any]:
        """Run one call through `ToolSet.execute`: on `session`'s view, or on the shared set."""
        call = ToolCall(id=request.id, name=request.name, arguments=request.arguments)
        if session is None:
            return result_json(await self.toolset.execute(call, **self.execute_options))
        with self.sessions.using(session) as view:
            return result_json(await view.execute(call, **self.execute_options))


def create_app(
    toolset: ToolSet,
    *,
    token: str | None = None,
    session_ttl_s: float = DEFAULT_SESSION_TTL_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    max_output_chars: int = SERVER_MAX_OUTPUT_CHARS,
) -> Any:
    """The FastAPI app serving `toolset` (see the module doc); `token` None means no authentication.

    The app owns `toolset`: its shutdown closes the open sessions, then calls `toolset.shutdown()`.
    `app.state.service` is its `ToolService`.
    """
    _require_server_packages()
    from fastapi import FastAPI, HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    service = ToolService(toolset, session_ttl_s, default_timeout_s, max_output_chars)
    app = FastAPI(title="tirl tool server", lifespan=service.lifespan)
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(BearerAuth, token=token)  # added last: runs first

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Any, error: RequestValidationError) -> Any:
        detail = describe_request_errors(error.errors())
        if "json" not in request.headers.get("content-type", ""):
            detail = f"send the body as JSON, with 'Content-Type: application/json' ({detail})"
        return JSONResponse(status_code=422, content={"detail": detail})

    def unknown_session(session_id: str) -> HTTPException:
        return HTTPException(404, f"unknown session {session_id!r}: never opened, deleted, or closed after "
                                  f"{session_ttl_s:g} s idle")

    def sessions_of(requests: list[CallRequest]) -> list[_Session | None]:
        try:
            return service.resolve_sessions(requests)
        except KeyError as e:
            raise unknown_session(e.args[0]) from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "tools": toolset.names}

    @app.get("/tools")
    async def tools() -> dict[str, Any]:
        return {"tools": service.listing()}

    @app.post("/call")
    async def call(request: CallRequest) -> dict[str, Any]:
        return await service.execute(request, sessions_of([request])[0])

    @app.post("/batch")
    async def batch(requests: list[CallRequest]) -> list[dict[str, Any]]:
        found = sessions_of(requests)
        return list(await asyncio.gather(*(service.execute(r, s) for r, s in zip(requests, found))))

    @app.post("/sessions")
    async def open_session() -> dict[str, str]:
        return {"session": service.sessions.open()}

    @app.delete("/sessions/{session_id}")
    async def close_session(session_id: str) -> dict[str, bool]:
        if not await service.sessions.close(session_id):
            raise unknown_session(session_id)
        return {"closed": True}

    return app


async def _sweep(sessions: SessionStore) -> None:
    """Close idle sessions, checking a few times per TTL (at most every 30 s)."""
    interval_s = min(max(sessions.ttl_s / 4, 0.05), 30.0)
    while True:
        await asyncio.sleep(interval_s)
        await sessions.expire_idle()


def describe_request_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """Pydantic/FastAPI request errors as 'body.field: message' parts (at most five)."""
    parts = []
    for e in list(errors)[:5]:
        loc = tuple(e.get("loc", ()))
        detail = (e.get("ctx") or {}).get("error")
        if e.get("type") == "json_invalid":
            parts.append(f"{loc[0] if loc else 'body'}: invalid JSON ({detail})")
            continue
        where = ".".join(str(p) for p in loc) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}" + (f" ({detail})" if detail else ""))
    return "; ".join(parts)


class BearerAuth:
    """ASGI middleware: with a token set, an HTTP request without `Authorization: Bearer <token>` gets 401.

    The token is compared with `hmac.compare_digest` (constant time). No token: every request passes.
    """

    def __init__(self, app: Any, token: str | None):
        self.app = app
        self.expected = token.encode() if token else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.expected is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected):
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        response = JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"},
                                content={"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"})
        return await response(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app sees it.

    The body is read (up to the limit) and handed to the app from memory.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        body, delivered = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from fastapi.responses import JSONResponse

        detail = f"request body over the server's limit of {self.max_bytes} bytes (or a bad Content-Length)"
        await JSONResponse(status_code=413, content={"detail": detail})(scope, receive, send)


# ---------------------------------------------------------------------------------------------------
# What to serve, and serving it


def read_tools_config(path: str | Path) -> tuple[list[str] | None, dict[str, dict[str, Any]]]:
    """(tool names, settings by tool) from a YAML file: a recipe's `tools:` section or a whole recipe.

    A file with recipe sections (`task`, `tools`, `model`, ...) is a recipe: its `task.tools` (None when
    absent) and `tools`. Any other mapping is a `tools:` section ({tool name: settings}); names are None.
    Raises `ToolServerError` naming the file for a missing file, bad YAML or a wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise ToolServerError(f"tool config {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ToolServerError(f"tool config {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ToolServerError(f"tool config {str(path)!r} must be a mapping ({{tool name: settings}} or a recipe)")
    if not _RECIPE_SECTIONS & set(data):
        return None, data
    task = data.get("task") or {}
    names = task.get("tools") if isinstance(task, dict) else None
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ToolServerError(f"{str(path)!r}: task.tools must be a list of tool names")
    settings = data.get("tools") or {}
    if not isinstance(settings, dict):
        raise ToolServerError(f"{str(path)!r}: tools must be a mapping {{tool name: settings}}")
    return names, settings


def build_served_toolset(names: Sequence[str] | None, config: str | Path | None) -> ToolSet:
    """The tools to serve: `names` (else the config's task.tools, else the config's tool names),
    built by `build_toolset` with the config's settings. Every problem is a `ToolServerError`."""
    config_names, settings = read_tools_config(config) if config is not None else (None, {})
    chosen = list(names or config_names or settings)
    if not chosen:
        raise ToolServerError("no tools to serve: name them with --tools NAME ... or give --config FILE")
    try:
        return build_toolset(chosen, settings)
    except (ValueError, TypeError, KeyError, ImportError) as e:
        raise ToolServerError(str(e)) from e


def resolve_token(host: str, token: str | None) -> str | None:
    """The token to require: `token`, else `$TIRL_TOOL_SERVER_TOKEN`, else None.

    Raises `ToolServerError` for a token shorter than `MIN_TOKEN_CHARS`, and when `host` is not a
    loopback address and there is no token.
    """
    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    how = f"pass --token TOKEN or set {TOKEN_ENV} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ToolServerError(f"the token must have at least {MIN_TOKEN_CHARS} characters; {how}")
    if token is None and not is_loopback(host):
        raise ToolServerError(f"refusing to serve tools on {host!r} without a token: anyone who can reach it could "
                              f"run them; {how}, or bind {DEFAULT_HOST}")
    return token


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) (port 0: a free one); `ToolServerError` if that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY on accepted sockets only then (without it,
    # Nagle's algorithm and delayed ACKs add about 40 ms to every request on a kept-alive connection)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ToolServerError(f"cannot listen on {host}:{port}: {e}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(app: Any) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


def serve(toolset: ToolSet, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
          **app_options: Any) -> None:
    """Serve `toolset` in the foreground until interrupted (SIGINT/SIGTERM), then shut it down.

    The token rule of `resolve_token` applies; prints the address and the tool names once listening.
    `app_options` go to `create_app`.
    """
    token = resolve_token(host, token)
    _serve_on(bind_socket(host, port), toolset, token, **app_options)


def serve_from_command_line(names: Sequence[str] | None, config: str | None, host: str, port: int,
                            token: str | None) -> int:
    """`tirl serve-tools`: check the token and take the address before building the tools, then serve."""
    token = resolve_token(host, token)
    _require_server_packages()
    sock = bind_socket(host, port)
    try:
        toolset = build_served_toolset(names, config)
    except BaseException:
        sock.close()
        raise
    try:
        _serve_on(sock, toolset, token)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        print("tool server stopped", flush=True)
    return 0


def _serve_on(sock: socket.socket, toolset: ToolSet, token: str | None, **app_options: Any) -> None:
    server = _uvicorn_server(create_app(toolset, token=token, **app_options))
    auth = "bearer token required" if token else "no token"
    print(f"serving {len(toolset)} tools ({', '.join(toolset.names)}) at {_url(sock)} ({auth}); Ctrl-C stops",
          flush=True)
    server.run(sockets=[sock])


class ToolServer:
    """A tool server in a background thread (tests, notebooks): `with ToolServer(toolset) as server:`.

    Serves like `serve` (same token rule) on `port` (0: a free one) and stops on exit; `url` is its
    address. Stopping shuts the toolset down, like any server shutdown.
    """

    def __init__(self, toolset: ToolSet, *, host: str = DEFAULT_HOST, port: int = 0, token: str | None = None,
                 **app_options: Any):
        self.toolset, self.host, self.port = toolset, host, port
        self.token = resolve_token(host, token)
        self.app_options = app_options
        self.url: str | None = None
        """`http://host:port` once started."""
        self.app: Any = None
        """The FastAPI app once started (`app.state.service` is its `ToolService`)."""
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> ToolServer:
        """Start listening; returns once the server accepts requests (`ToolServerError` otherwise)."""
        self.app = create_app(self.toolset, token=self.token, **self.app_options)
        sock = bind_socket(self.host, self.port)
        self.url, self._server = _url(sock), _uvicorn_server(self.app)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="tirl-tool-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ToolServerError(f"the tool server at {self.url} did not start within {timeout_s:g} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving and wait for the shutdown (sessions closed, toolset shut down)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._server = self._thread = None

    def __enter__(self) -> ToolServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
