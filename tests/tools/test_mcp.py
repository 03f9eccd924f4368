"""MCP servers as tools: a real server (`mcp_demo_server.py`) over stdio and streamable HTTP, through
`build_toolset` and `ToolSet.execute`: schemas from the server, errors, crashes and reconnection,
timeouts, several event loops, startup failures and clean shutdown."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from tirl.tools import ToolSet, build_toolset, check_toolset
from tirl.tools.mcp import MCPStartupError, MCPTool
from tirl.types import ToolCall, ToolStatus

DEMO = Path(__file__).with_name("mcp_demo_server.py")
STDIO = {"command": [sys.executable, str(DEMO), "stdio"]}


def call(tool_name: str, /, **arguments) -> ToolCall:
    return ToolCall(id="c1", name=tool_name, arguments=arguments)


def execute(tools: ToolSet, tool_name: str, /, timeout_s: float = 30.0, **arguments):
    """One call in a fresh event loop (as each stage of a run has its own)."""
    return asyncio.run(tools.execute(call(tool_name, **arguments), default_timeout_s=timeout_s))


def calls_so_far(tools: ToolSet) -> int:
    """Tool calls the server process ran (it counts from 0 after a restart)."""
    return int(execute(tools, "calls").content)


def child_pids() -> set[int]:
    """Child processes of this process, zombies included."""
    try:
        import psutil
    except ImportError:
        children = set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{os.getpid()}\n" in status:
                children.add(int(pid))
        return children
    return {p.pid for p in psutil.Process().children()}


def mcp_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("tirl-mcp")}


@pytest.fixture(scope="module")
def demo() -> ToolSet:
    """The demo server's tools over stdio, shared by the tests that leave the server as they found it."""
    tools = build_toolset(["mcp"], {"mcp": STDIO})
    yield tools
    asyncio.run(tools.shutdown())


@pytest.fixture
def fresh() -> ToolSet:
    """A demo server of the test's own (for tests that crash it)."""
    tools = build_toolset(["mcp"], {"mcp": STDIO})
    yield tools
    asyncio.run(tools.shutdown())


@pytest.fixture
def http_url():
    """The demo server over streamable HTTP on a free loopback port."""
    server = subprocess.Popen([sys.executable, str(DEMO), "http", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([server.stdout], [], [], 30)
        line = server.stdout.readline() if ready else ""
        assert line.startswith("listening on "), f"demo HTTP server did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[-1])}/mcp"
    finally:
        server.terminate()
        server.wait(10)
        server.stdout.close()


def test_a_call_round_trips_over_stdio(demo):
    result = execute(demo, "add", a=2, b=40)
    assert (result.status, result.content) == (ToolStatus.OK, "42")
    assert execute(demo, "echo", text="héllo\nworld").content == "héllo\nworld"


def test_parameters_and_descriptions_are_the_servers(demo):
    spec = importlib.util.spec_from_file_location("mcp_demo_server", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server_tools = asyncio.run(module.build_server(None).list_tools())
    assert demo.names == [t.name for t in server_tools]
    for server_tool in server_tools:
        tool = demo.get(server_tool.name)
        assert tool.parameters == server_tool.input_schema
        assert tool.description == server_tool.description


def test_a_wrong_argument_type_is_a_validation_error_and_never_reaches_the_server(demo):
    before = calls_so_far(demo)
    result = execute(demo, "add", a="2", b=3)  # the server would coerce "2"; the schema says integer
    assert result.status == ToolStatus.VALIDATION_ERROR and "a: '2' is not of type 'integer'" in result.content
    assert calls_so_far(demo) == before + 1  # only the first `calls` ran in between


def test_a_server_side_error_is_an_execution_error_the_model_sees(demo):
    result = execute(demo, "fail", message="the disk is full")
    assert result.status == ToolStatus.EXECUTION_ERROR
    assert result.content.startswith("Error: MCPToolError:") and "the disk is full" in result.content


def test_non_text_content_is_described_briefly(demo):
    result = execute(demo, "pixel")
    assert (result.status, result.content) == (ToolStatus.OK, "[image: image/png, 70 bytes]")


def test_a_call_timeout_is_a_timeout_result_and_the_session_stays_usable(demo):
    before = calls_so_far(demo)
    start = time.perf_counter()
    result = execute(demo, "sleep", timeout_s=0.3, seconds=10)
    assert result.status == ToolStatus.TIMEOUT and time.perf_counter() - start < 2
    assert execute(demo, "echo", text="still here").content == "still here"
    assert calls_so_far(demo) == before + 3  # the same server process: calls, sleep, echo


def test_the_tools_work_from_one_event_loop_after_another(demo):
    async def add_twice() -> list[str]:
        results = await asyncio.gather(*(demo.execute(call("add", a=i, b=1)) for i in range(2)))
        return [r.content for r in results]

    before = calls_so_far(demo)
    assert asyncio.run(add_twice()) == ["1", "2"]
    assert asyncio.run(add_twice()) == ["1", "2"]
    assert calls_so_far(demo) == before + 5  # one session for all loops


def test_a_crash_mid_call_is_an_error_and_the_next_call_reconnects(fresh):
    children_before = child_pids()
    result = execute(fresh, "crash")
    assert result.status == ToolStatus.EXECUTION_ERROR
    assert "TransientToolError" in result.content and "connection" in result.content
    assert execute(fresh, "echo", text="back").content == "back"
    assert calls_so_far(fresh) == 1  # a new server process
    children_after = child_pids()
    assert len(children_before - children_after) == 1 and len(children_after - children_before) == 1  # reaped


def test_a_server_that_exits_between_calls_is_restarted_without_an_error(fresh):
    children_before = child_pids()
    assert execute(fresh, "crash", after_s=0.1).content == "exiting in 0.1 s"
    deadline = time.monotonic() + 10
    while children_before <= child_pids() and time.monotonic() < deadline:  # until the server is gone
        time.sleep(0.05)
    result = execute(fresh, "echo", text="restarted")
    assert (result.status, result.content) == (ToolStatus.OK, "restarted")
    assert calls_so_far(fresh) == 1  # a new server process


def test_with_one_retry_the_crashed_call_succeeds_on_a_restarted_server(tmp_path):
    marker = tmp_path / "crashed-once"
    settings = {"command": [*STDIO["command"], "--crash-once", str(marker)], "retries": 1, "retry_backoff_s": 0,
                "timeout_s": 30}
    tools = build_toolset(["mcp"], {"mcp": settings})
    try:
        result = execute(tools, "crash")
        assert (result.status, result.content) == (ToolStatus.OK, "survived: the server crashed once already")
        assert marker.exists()
    finally:
        asyncio.run(tools.shutdown())


def test_a_round_trip_over_streamable_http(http_url):
    tools = build_toolset(["mcp"], {"mcp": {"url": http_url, "headers": {"X-Run-Id": "run-7"}}})
    try:
        assert execute(tools, "add", a=1, b=2).content == "3"
        assert execute(tools, "header", name="X-Run-Id").content == "run-7"
        assert execute(tools, "fail").status == ToolStatus.EXECUTION_ERROR
        assert tools.describe()["add"]["url"] == http_url
    finally:
        asyncio.run(tools.shutdown())


def test_a_server_that_exits_at_once_fails_the_build_quickly_with_its_stderr():
    command = [sys.executable, "-c", "import sys; sys.exit('no config file: giving up')"]
    threads_before, start = mcp_threads(), time.perf_counter()
    with pytest.raises(MCPStartupError, match="failed to start") as error:
        build_toolset(["mcp"], {"mcp": {"command": command, "startup_timeout_s": 20}})
    assert time.perf_counter() - start < 10
    assert "no config file: giving up" in str(error.value) and sys.executable in str(error.value)
    assert mcp_threads() == threads_before


def test_a_url_nobody_listens_on_fails_the_build_quickly():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    start = time.perf_counter()
    with pytest.raises(MCPStartupError, match="failed to start") as error:
        build_toolset(["mcp"], {"mcp": {"url": url, "startup_timeout_s": 20}})
    assert time.perf_counter() - start < 10 and url in str(error.value)


def test_a_server_that_never_answers_fails_after_startup_timeout_s():
    command = [sys.executable, "-c", "import sys; sys.stdin.read()"]  # reads requests, never answers
    children_before, threads_before = child_pids(), mcp_threads()
    with pytest.raises(MCPStartupError, match=r"no answer within 0\.5 s"):
        build_toolset(["mcp"], {"mcp": {"command": command, "startup_timeout_s": 0.5}})
    assert child_pids() == children_before and mcp_threads() == threads_before


def test_aclose_stops_the_server_and_the_thread_without_warnings(caplog):
    children_before, threads_before = child_pids(), mcp_threads()
    tools = build_toolset(["mcp"], {"mcp": STDIO})
    assert execute(tools, "echo", text="up").content == "up"
    assert len(child_pids() - children_before) == 1 and len(mcp_threads() - threads_before) == 1
    with caplog.at_level(logging.WARNING):
        asyncio.run(tools.shutdown())
        asyncio.run(tools.shutdown())  # idempotent
        gc.collect()
    assert child_pids() == children_before and mcp_threads() == threads_before
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.name.startswith("tirl")]
    assert not problems  # e.g. "Task was destroyed but it is pending", "exception was never retrieved"


def test_prefix_include_and_describe():
    tools = build_toolset(["mcp"], {"mcp": {**STDIO, "prefix": "demo_", "include": ["add", "echo"]}})
    try:
        assert tools.names == ["demo_add", "demo_echo"]
        assert execute(tools, "demo_add", a=1, b=1).content == "2"
        described = tools.describe()["demo_echo"]
        assert described["command"] == STDIO["command"] and described["server_tool"] == "echo"
        assert described["tools"] == ["demo_add", "demo_echo"]
    finally:
        asyncio.run(tools.shutdown())


def test_an_unpickled_tool_opens_its_own_session(demo):
    original = demo.get("echo")
    copy = pickle.loads(pickle.dumps(original))  # what a worker process receives
    assert isinstance(copy, MCPTool) and copy.connection is not original.connection
    assert (copy.name, copy.parameters, copy.describe()) == (original.name, original.parameters, original.describe())
    children_before = child_pids()
    try:
        assert asyncio.run(copy.run(text="worker")) == "worker"
        assert len(child_pids() - children_before) == 1  # its own server process
    finally:
        asyncio.run(copy.aclose())
    assert child_pids() == children_before


@pytest.mark.parametrize(("settings", "message"), [
    ({}, "exactly one of `command`"),
    ({**STDIO, "url": "http://127.0.0.1:1/mcp"}, "exactly one of `command`"),
    ({"command": ["no-such-mcp-server-binary"]}, "tools.mcp.command: .*not found"),
    ({**STDIO, "cwd": "no/such/dir"}, "tools.mcp.cwd: .*does not exist"),
    ({"url": "127.0.0.1:8000/mcp"}, "tools.mcp.url: .*not an http"),
    ({**STDIO, "headers": {"A": "b"}}, "`headers` apply to a `url` server"),
    ({**STDIO, "prefix": "my.tools"}, "tools.mcp.prefix"),
    ({**STDIO, "include": ["add"], "exclude": ["add"]}, "both included and excluded"),
    ({**STDIO, "startup_timeout_s": 0}, "tools.mcp.startup_timeout_s"),
])
def test_bad_settings_are_errors_naming_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        check_toolset(["mcp"], {"mcp": settings})


def test_including_a_tool_the_server_lacks_fails_the_build_and_stops_the_server():
    children_before, threads_before = child_pids(), mcp_threads()
    with pytest.raises(ValueError, match=r"tools.mcp.include: .* has no tool 'ad'; it has: \['calls', 'add'"):
        build_toolset(["mcp"], {"mcp": {**STDIO, "include": ["ad"]}})
    assert child_pids() == children_before and mcp_threads() == threads_before


def test_a_connection_never_closed_is_closed_at_interpreter_exit(tmp_path):
    marker = f"tirl-mcp-test-{os.getpid()}-{time.monotonic_ns()}"
    settings = {**STDIO, "env": {"TIRL_MCP_TEST_MARKER": marker}}
    script = tmp_path / "no_aclose.py"
    script.write_text(
        "import asyncio\n"
        "import tirl.tools.mcp\n"
        "from tirl.tools import build_toolset\n"
        "from tirl.types import ToolCall\n"
        f"tools = build_toolset(['mcp'], {{'mcp': {settings!r}}})\n"
        "print(asyncio.run(tools.execute(ToolCall(id='1', name='add', arguments={'a': 1, 'b': 1}))).content)\n")
    done = subprocess.run([sys.executable, "-X", "dev", str(script)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "2\n"), done.stderr
    assert not processes_with_environment(f"TIRL_MCP_TEST_MARKER={marker}")  # stopped before the client exited
    assert "Traceback" not in done.stderr and "destroyed" not in done.stderr and "Exception ignored" not in done.stderr


def processes_with_environment(entry: str) -> list[int]:
    """Processes of this user whose environment holds `entry` ("NAME=value")."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.encode() in environment:
            found.append(int(pid))
    return found
