"""The `python` tool: what the model sees, persistent vs stateless interpreters, sessions under load,
and failing closed when the isolation cannot be set up."""

from __future__ import annotations

import asyncio
import os

import pytest

from tirl.sandbox import SandboxUnavailableError
from tirl.tools import build_toolset
from tirl.tools.python import RESTARTED, STATE_LOST
from tirl.types import ToolCall, ToolStatus

FAST = {"preload": ["math"], "timeout_s": 2}


def code(text: str) -> ToolCall:
    return ToolCall("c", "python", {"code": text})


@pytest.fixture(scope="module")
def persistent():
    tools = build_toolset(["python"], {"python": {**FAST, "max_sandboxes": 4}})
    yield tools
    asyncio.run(tools.shutdown())


async def calls(tools, *cells):
    view = tools.session()
    try:
        return [await view.execute(code(c)) for c in cells]
    finally:
        await view.aclose()


def test_output_is_stdout_then_stderr_then_the_last_value(persistent):
    (r,) = asyncio.run(calls(persistent, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7"))
    assert (r.status, r.content) == (ToolStatus.OK, "out\n[stderr]\nerr\n42")


def test_errors_are_short_tracebacks_of_the_cell(persistent):
    (r,) = asyncio.run(calls(persistent, "x = 1\ny = x / 0"))
    assert r.status == ToolStatus.EXECUTION_ERROR
    assert r.content.startswith("Error: Traceback") and 'File "<cell>", line 2' in r.content
    assert r.content.endswith("ZeroDivisionError: division by zero") and "worker.py" not in r.content
    (r,) = asyncio.run(calls(persistent, "def f(:\n  pass"))
    assert r.status == ToolStatus.EXECUTION_ERROR and "SyntaxError" in r.content


def test_persistent_mode_keeps_state_within_a_trajectory_only(persistent):
    first = asyncio.run(calls(persistent, "import math\nx = 41", "x + 1", "math.factorial(5)"))
    assert [r.content for r in first] == ["(no output)", "42", "120"]
    (other,) = asyncio.run(calls(persistent, "x"))
    assert other.status == ToolStatus.EXECUTION_ERROR and "NameError" in other.content


def test_a_timeout_restarts_the_interpreter_and_says_the_state_was_lost(persistent):
    r = asyncio.run(calls(persistent, "x = 1", "while True: pass", "x"))
    assert r[1].status == ToolStatus.TIMEOUT and STATE_LOST in r[1].content
    assert r[2].content.startswith(RESTARTED) and "NameError" in r[2].content


def test_files_do_not_leak_between_trajectories(persistent):
    asyncio.run(calls(persistent, "open('notes.txt', 'w').write('mine'); open('/tmp/t', 'w').write('x')"))
    (r,) = asyncio.run(calls(persistent, "import os\nsorted(os.listdir('.')) + sorted(os.listdir('/tmp'))"))
    assert r.content == "[]"


def test_many_concurrent_trajectories_each_keep_their_interpreter():
    tools = build_toolset(["python"], {"python": {**FAST, "max_sandboxes": 12}})

    async def trajectory(k: int):
        return await calls(tools, f"v = {k}", "await_me = None", "v * 2")

    async def all_of_them():
        return await asyncio.gather(*(trajectory(k) for k in range(12)))

    try:
        results = asyncio.run(all_of_them())
        assert [r[2].content for r in results] == [str(2 * k) for k in range(12)]
        assert tools.get("python").pool.started <= 12
    finally:
        asyncio.run(tools.shutdown())


def test_stateless_mode_forgets_everything_between_calls():
    tools = build_toolset(["python"], {"python": {**FAST, "mode": "stateless"}})
    try:
        r = asyncio.run(calls(tools, "x = 5\nx", "x"))
        assert r[0].content == "5" and "NameError" in r[1].content and RESTARTED not in r[1].content
        assert "Nothing persists" in tools.get("python").description
    finally:
        asyncio.run(tools.shutdown())


def test_an_evicted_session_is_told_its_state_is_gone():
    tools = build_toolset(["python"], {"python": {**FAST, "max_sandboxes": 1}})

    async def scenario():
        a, b = tools.session(), tools.session()
        await a.execute(code("x = 1"))
        await b.execute(code("y = 2"))  # takes the only sandbox from the idle session a
        r = await a.execute(code("x"))
        await a.aclose()
        await b.aclose()
        return r

    try:
        r = asyncio.run(scenario())
        assert r.content.startswith(RESTARTED) and "NameError" in r.content
    finally:
        asyncio.run(tools.shutdown())


def test_missing_bubblewrap_fails_closed_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap") as info:
        build_toolset(["python"], {"python": FAST})
    assert "isolation=landlock" in str(info.value)


def test_weaker_isolation_is_announced_loudly(capfd):
    tools = build_toolset(["python"], {"python": {**FAST, "isolation": "rlimits"}})
    try:
        assert "WARNING: python tool isolation=rlimits: NOT a security boundary" in capfd.readouterr().err
        assert tools.describe()["python"]["isolation"] == "rlimits"
    finally:
        asyncio.run(tools.shutdown())


def test_no_sandbox_process_outlives_shutdown():
    tools = build_toolset(["python"], {"python": FAST})
    asyncio.run(calls(tools, "1"))
    pool = tools.get("python").pool
    pids = [sb.proc.pid for sb in pool.holders]
    asyncio.run(tools.shutdown())
    assert pids and not any(os.path.exists(f"/proc/{pid}") for pid in pids)
