"""Tests for the tool server (tirl.tools.server) and its client tool `remote` (tirl.tools.remote).

Every test runs a real server (uvicorn, in a background thread on a free loopback port; one test
starts it through the CLI) and talks to it over real HTTP, through the `remote` tool or httpx2.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx2
import pytest

import tirl.tools.remote  # noqa: F401  (registers the `remote` provider)
from tirl.tools import Tool, ToolSet, build_toolset, calculator, check_toolset, tool
from tirl.tools.remote import RemoteToolError
from tirl.tools.server import ToolServer, ToolServerError, bind_socket, build_served_toolset, resolve_token
from tirl.types import ToolCall, ToolStatus

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_token_in_environment(monkeypatch):
    monkeypatch.delenv("TIRL_TOOL_SERVER_TOKEN", raising=False)


class Counter(Tool):
    """Stateful test tool: each session has its own count; `log` holds every instance made."""

    name = "counter"
    description = "Add `step` to a running count and return the count."
    parameters = {"type": "object", "properties": {"step": {"type": "integer"}}, "required": ["step"],
                  "additionalProperties": False}

    def __init__(self, log: list[Counter]):
        self.log, self.count, self.closed = log, 0, False
        log.append(self)

    async def run(self, step: int) -> str:
        self.count += step
        return str(self.count)

    def session(self) -> Counter:
        return Counter(self.log)

    async def aclose(self) -> None:
        self.closed = True


def make_echo(seen: list[str]):
    @tool
    async def echo(text: str) -> str:
        """Return the text after a short random wait (so that calls finish out of order).

        Args:
            text: what to return.
        """
        seen.append(text)
        await asyncio.sleep(random.uniform(0, 0.02))
        return text

    return echo


@tool(timeout_s=0.3)
async def sleepy(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: how long.
    """
    await asyncio.sleep(seconds)
    return "awake"


@tool
async def nap(seconds: float) -> str:
    """Sleep without blocking, then say so.

    Args:
        seconds: how long.
    """
    await asyncio.sleep(seconds)
    return "rested"


@pytest.fixture(scope="module")
def calculator_url():
    """The address of a server of the calculator, shared by the tests that only call it."""
    with ToolServer(ToolSet([calculator])) as server:
        yield server.url


def remote(url: str, **settings: Any) -> ToolSet:
    return build_toolset(["remote"], {"remote": {"url": url, **settings}})


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------------------
# Listing and round trips


def test_health_and_tools_list_the_served_tools_with_their_schemas():
    served = ToolSet([calculator, Counter([])])
    with ToolServer(served) as server:
        assert httpx2.get(f"{server.url}/health").json() == {"ok": True, "tools": ["calculator", "counter"]}
        listing = {t["name"]: t for t in httpx2.get(f"{server.url}/tools").json()["tools"]}
        client = remote(server.url)
    assert client.schemas() == served.schemas()  # the model sees the same tools
    assert client.get("calculator").describe() == {"url": server.url, "remote_tool": "calculator", "stateful": False,
                                                   "remote": served.describe()["calculator"]}
    assert listing["calculator"]["schema"] == calculator.schema()
    assert listing["counter"]["schema"] == Counter([]).schema()
    assert listing["calculator"]["describe"] == served.describe()["calculator"]
    assert (listing["calculator"]["stateful"], listing["counter"]["stateful"]) == (False, True)


@pytest.mark.parametrize("arguments", [
    {"expression": "2 + 3 * 4"},
    {"expression": "2 ** 0.5"},
    {"expression": "1 / 0"},          # the tool raises
    {"expression": 5},                # wrong type
    {"expr": "1"},                    # unknown and missing argument
])
def test_remote_result_equals_local_execution(calculator_url, arguments):
    client, local = remote(calculator_url), ToolSet([calculator])
    call = ToolCall("call-1", "calculator", arguments)
    got, expected = run(client.execute(call)), run(local.execute(call))
    run(client.shutdown())
    assert (got.call_id, got.name, got.status, got.content) == (expected.call_id, expected.name, expected.status,
                                                                expected.content)


def test_works_from_successive_event_loops_and_when_pickled(calculator_url):
    client = remote(calculator_url)
    first = run(client.execute(ToolCall("a", "calculator", {"expression": "6 * 7"})))
    copy = ToolSet([pickle.loads(pickle.dumps(client.get("calculator")))])  # as a worker process gets it
    second = run(client.execute(ToolCall("b", "calculator", {"expression": "6 * 8"})))
    third = run(copy.execute(ToolCall("c", "calculator", {"expression": "6 * 9"})))
    run(client.shutdown())
    run(copy.shutdown())
    assert (first.content, second.content, third.content) == ("42", "48", "54")


def test_200_concurrent_calls_each_come_back_once_matched_to_their_call():
    seen: list[str] = []
    with ToolServer(ToolSet([make_echo(seen)])) as server:
        client = remote(server.url)

        async def all_calls():
            calls = [ToolCall(f"id-{i}", "echo", {"text": f"value-{i}"}) for i in range(200)]
            try:
                return await asyncio.gather(*(client.execute(c) for c in calls))
            finally:
                await client.shutdown()

        results = run(all_calls())
    assert [r.status for r in results] == [ToolStatus.OK] * 200
    assert [(r.call_id, r.content) for r in results] == [(f"id-{i}", f"value-{i}") for i in range(200)]
    assert sorted(seen) == sorted(f"value-{i}" for i in range(200))  # each ran exactly once


def test_calls_run_concurrently_on_the_server():
    with ToolServer(ToolSet([nap])) as server:
        client = remote(server.url)

        async def naps():
            start = time.perf_counter()
            results = await asyncio.gather(*(client.execute(ToolCall(f"n{i}", "nap", {"seconds": 0.5}))
                                             for i in range(100)))
            await client.shutdown()
            return results, time.perf_counter() - start

        results, seconds = run(naps())
    assert {r.content for r in results} == {"rested"}
    assert seconds < 5  # one after another: 50 s


def test_batch_keeps_order_and_turns_bad_calls_into_error_results(calculator_url):
    calls = [ToolCall("c0", "calculator", {"expression": "1 + 1"}), ToolCall("c1", "nope", {}),
             ToolCall("c2", "calculator", {"expression": 3}), ToolCall("c3", "calculator", {"expression": "1/0"}),
             ToolCall("c4", "calculator", ["not", "an", "object"]), ToolCall("c5", "calculator", {"expression": "9"})]
    local = ToolSet([calculator])
    body = [{"name": c.name, "arguments": c.arguments, "id": c.id} for c in calls]
    response = httpx2.post(f"{calculator_url}/batch", json=body)
    assert response.status_code == 200
    expected = [run(local.execute(c)) for c in calls]
    assert [(r["call_id"], r["status"], r["content"]) for r in response.json()] == \
        [(e.call_id, str(e.status), e.content) for e in expected]
    assert [r["status"] for r in response.json()] == ["ok", "unknown_tool", "validation_error", "execution_error",
                                                      "validation_error", "ok"]


def test_malformed_requests_get_a_4xx_naming_the_problem():
    with ToolServer(ToolSet([calculator]), max_body_bytes=1000) as server:
        missing_id = httpx2.post(f"{server.url}/call", json={"name": "calculator", "arguments": {}})
        broken_json = httpx2.post(f"{server.url}/call", content=b"{oops", headers={"Content-Type": "application/json"})
        too_big = httpx2.post(f"{server.url}/call", json={"name": "calculator", "id": "x",
                                                           "arguments": {"expression": "1+" * 1000 + "1"}})
        unknown_session = httpx2.post(f"{server.url}/call", json={"name": "calculator", "id": "x", "session": "nope"})
    assert (missing_id.status_code, missing_id.json()["detail"]) == (422, "body.id: Field required")
    assert broken_json.status_code == 422 and "invalid JSON" in broken_json.json()["detail"]
    assert too_big.status_code == 413 and "1000 bytes" in too_big.json()["detail"]
    assert unknown_session.status_code == 404 and "unknown session 'nope'" in unknown_session.json()["detail"]


def test_a_tool_timeout_on_the_server_comes_back_as_its_timeout_result():
    with ToolServer(ToolSet([sleepy])) as server:
        client = remote(server.url)
        assert client.get("sleepy").timeout_s > 0.3  # the client waits longer than the server
        result = run(client.execute(ToolCall("s", "sleepy", {"seconds": 5})))
        run(client.shutdown())
    assert result.status is ToolStatus.TIMEOUT and "timed out after 0.3 s" in result.content
    assert result.latency_s < 3


# ---------------------------------------------------------------------------------------------------
# Security


def test_token_is_required_when_set(monkeypatch):
    with ToolServer(ToolSet([calculator]), token=TOKEN) as server:
        assert httpx2.get(f"{server.url}/tools").status_code == 401
        wrong = httpx2.post(f"{server.url}/call", json={"name": "calculator", "id": "x"},
                            headers={"Authorization": "Bearer wrong-token-0123456789"})
        assert wrong.status_code == 401
        assert httpx2.get(f"{server.url}/tools", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        with pytest.raises(RemoteToolError, match="rejected the token"):
            remote(server.url)
        monkeypatch.setenv("TIRL_TOOL_SERVER_TOKEN", TOKEN)
        client = remote(server.url)
        result = run(client.execute(ToolCall("t", "calculator", {"expression": "2 + 2"})))
        run(client.shutdown())
    assert (result.status, result.content) == (ToolStatus.OK, "4")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_refuses_to_serve_beyond_loopback_without_a_token(host):
    with pytest.raises(ToolServerError, match="without a token") as error:
        ToolServer(ToolSet([calculator]), host=host)
    assert "--token" in str(error.value) and "TIRL_TOOL_SERVER_TOKEN" in str(error.value)
    assert resolve_token(host, TOKEN) == TOKEN
    assert resolve_token("127.0.0.1", None) is None
    with pytest.raises(ToolServerError, match="at least 16 characters"):
        resolve_token(host, "short")


# ---------------------------------------------------------------------------------------------------
# Failures of the server


def test_server_down_is_an_execution_error_and_retries_reach_a_server_that_comes_back():
    server = ToolServer(ToolSet([calculator])).start()
    port = int(server.url.rsplit(":", 1)[1])
    once = remote(server.url)
    patient = remote(server.url, retries=6, retry_backoff_s=0.1)
    server.stop()
    down = run(once.execute(ToolCall("d", "calculator", {"expression": "1 + 1"})))
    assert down.status is ToolStatus.EXECUTION_ERROR and "TransientToolError" in down.content
    assert "unreachable" in down.content and down.latency_s < 5

    restarted: list[ToolServer] = []
    timer = threading.Timer(0.4, lambda: restarted.append(ToolServer(ToolSet([calculator]), port=port).start()))
    timer.start()
    try:
        back = run(patient.execute(ToolCall("r", "calculator", {"expression": "1 + 1"})))
    finally:
        timer.join()
        run(once.shutdown())
        run(patient.shutdown())
        for s in restarted:
            s.stop()
    assert (back.status, back.content) == (ToolStatus.OK, "2")


class FlakyServer:
    """A bare ASGI server whose `/call` answers 503 `failures` times, then a result (over real HTTP)."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0
        function = {"name": "flaky", "description": "Fails, then works.", "parameters": {"type": "object"}}
        self.listing = {"tools": [{"name": "flaky", "schema": {"type": "function", "function": function}}]}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, content = 200, self.listing
        if scope["path"] == "/call":
            self.calls += 1
            call_id = json.loads(body)["id"]
            status, content = (503, {"detail": "restarting"}) if self.calls <= self.failures else \
                (200, {"call_id": call_id, "name": "flaky", "content": "done", "status": "ok", "latency_s": 0.0})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(content).encode()})

    def __enter__(self):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self, log_level="warning", lifespan="off"))
        sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info):
        self.server.should_exit = True
        self.thread.join(10)


def test_a_503_is_transient_retried_by_the_toolset_never_by_the_client():
    with FlakyServer(failures=2) as flaky:
        once = remote(flaky.url)
        failed = run(once.execute(ToolCall("f", "flaky", {})))
        assert flaky.calls == 1  # no retry inside the client
        patient = remote(flaky.url, retries=3, retry_backoff_s=0.05)
        recovered = run(patient.execute(ToolCall("g", "flaky", {})))
        run(once.shutdown())
        run(patient.shutdown())
    assert failed.status is ToolStatus.EXECUTION_ERROR
    assert "TransientToolError" in failed.content and "503: restarting" in failed.content
    assert (recovered.status, recovered.content, flaky.calls) == (ToolStatus.OK, "done", 3)


def test_bad_settings_and_unreachable_servers_fail_at_build_naming_the_problem():
    with pytest.raises(ValueError, match="tools.remote.url: .*not an http"):
        check_toolset(["remote"], {"remote": {"url": "ftp://host/x"}})
    with pytest.raises(ValueError, match="tools.remote.url: Field required"):
        check_toolset(["remote"], {"remote": {}})
    with ToolServer(ToolSet([calculator])) as server:
        with pytest.raises(ValueError, match=r"\['nope'\] not served .*it serves: calculator"):
            remote(server.url, tools=["nope"])
        url = server.url
    with pytest.raises(RemoteToolError, match=f"{re.escape(url)}: cannot fetch its tools"):
        remote(url, connect_timeout_s=2)


# ---------------------------------------------------------------------------------------------------
# Sessions


def test_sessions_keep_state_within_and_not_across_and_close_on_delete():
    log: list[Counter] = []
    with ToolServer(ToolSet([Counter(log), calculator])) as server:
        client = remote(server.url)
        store = server_store(server)
        assert client.session().get("calculator") is client.get("calculator")  # stateless: no session

        async def trajectories():
            a, b, idle = client.session(), client.session(), client.session()
            counts = [(await a.execute(ToolCall("1", "counter", {"step": 1}))).content,
                      (await a.execute(ToolCall("2", "counter", {"step": 1}))).content,
                      (await b.execute(ToolCall("3", "counter", {"step": 5}))).content,
                      (await a.execute(ToolCall("4", "counter", {"step": 1}))).content]
            open_before = len(store)
            await a.aclose()
            open_after = len(store)
            closed = {c.count: c.closed for c in log[1:] if c.count}  # log[0] is the shared instance
            after_close = await a.execute(ToolCall("5", "counter", {"step": 1}))
            await idle.aclose()  # never called: never opened a session
            await b.aclose()
            open_at_end = len(store)
            await client.shutdown()
            return counts, (open_before, open_after, open_at_end), closed, after_close

        counts, open_sessions, closed, after_close = run(trajectories())
    assert counts == ["1", "2", "5", "3"]
    assert open_sessions == (2, 1, 0)
    assert closed == {3: True, 5: False}  # a's instance closed by its DELETE, b's still open
    assert after_close.status is ToolStatus.EXECUTION_ERROR and "already closed" in after_close.content


def test_idle_sessions_expire_and_a_call_on_an_expired_session_is_an_error():
    log: list[Counter] = []
    with ToolServer(ToolSet([Counter(log)]), session_ttl_s=0.3) as server:
        client = remote(server.url)
        store = server_store(server)

        async def trajectory():
            view = client.session()
            first = await view.execute(ToolCall("1", "counter", {"step": 1}))
            opened = len(store)
            await asyncio.sleep(1.0)
            left, closed = len(store), [c.closed for c in log[1:] if c.count]  # log[0] is the shared instance
            expired = await view.execute(ToolCall("2", "counter", {"step": 1}))
            await view.aclose()
            await client.shutdown()
            return first, (opened, left), closed, expired

        first, open_sessions, closed, expired = run(trajectory())
    assert first.content == "1"
    assert open_sessions == (1, 0) and closed == [True]
    assert expired.status is ToolStatus.EXECUTION_ERROR and "session is gone" in expired.content


def server_store(server: ToolServer):
    """The session store of a running in-process server."""
    return server.app.state.service.sessions


# ---------------------------------------------------------------------------------------------------
# Configuration and the command line


def test_served_tools_come_from_names_or_a_tools_section_or_a_recipe(tmp_path):
    section = tmp_path / "tools.yaml"
    section.write_text("calculator: {timeout_s: 3}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: {name: arithmetic, tools: [calculator]}\ntools: {calculator: {retries: 2}}\n")
    assert build_served_toolset(None, section).policy("calculator").timeout_s == 3
    assert build_served_toolset(None, recipe).policy("calculator").retries == 2
    assert build_served_toolset(["calculator"], None).names == ["calculator"]
    with pytest.raises(ToolServerError, match="no tools to serve"):
        build_served_toolset(None, None)
    with pytest.raises(ToolServerError, match="tools.calculator.retrys: unknown key"):
        section.write_text("calculator: {retrys: 3}\n")
        build_served_toolset(None, section)
    with pytest.raises(ToolServerError, match="does not exist"):
        build_served_toolset(None, tmp_path / "missing.yaml")


def test_cli_serves_the_configured_tools_until_interrupted(tmp_path):
    config = tmp_path / "tools.yaml"
    config.write_text("calculator: {timeout_s: 3}\n")
    env = {k: v for k, v in os.environ.items() if k != "TIRL_TOOL_SERVER_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "tirl.cli", "serve-tools", "--config", str(config), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url and "calculator" in line, line
        client = remote(url.group())
        assert client.get("calculator").timeout_s == 3 + tirl.tools.remote.TIMEOUT_MARGIN_S
        result = run(client.execute(ToolCall("c", "calculator", {"expression": "3 * 3"})))
        run(client.shutdown())
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=20)
    assert (result.status, result.content) == (ToolStatus.OK, "9")
    assert proc.returncode == 0, output
