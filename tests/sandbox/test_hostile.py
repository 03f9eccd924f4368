"""Hostile payloads against every isolation level, one property per test (DESIGN.md invariant 5).

The default level (`bwrap`) must contain every payload. For the weaker levels, the payloads they do
not contain are expected failures (strict: if a level starts containing one, the table below must be
updated), so this file also documents what each level protects against. After each payload the
host is checked from outside (a sentinel process, a listening socket, files, the process table) and
the same tool must still answer the next call.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import tirl
from tirl.sandbox.isolation import check_requirements, running_as_root
from tirl.tools import build_toolset
from tirl.types import ToolCall, ToolStatus

TIMEOUT_S = 2.0
ROOT = running_as_root()
NOT_CONTAINED = {
    # level -> properties it does not protect (see tirl.sandbox.isolation)
    "bwrap": set(),
    "landlock": set() if ROOT else {"fork_bomb"},
    "rlimits": {"project_checkout", "loopback"} | (
        set() if ROOT else {"host_secret", "write_outside", "kill_host_process", "fork_bomb", "parent_environ"}),
    "none": {"host_secret", "project_checkout", "write_outside", "loopback", "kill_host_process",
             "parent_environ", "fork_bomb"},
}
LEVELS = list(NOT_CONTAINED)


def _available(level: str) -> bool:
    try:
        check_requirements(level)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module", params=LEVELS)
def tools(request):
    level = request.param
    if not _available(level):
        if level == "bwrap":
            pytest.fail("bubblewrap is required for the default isolation: apt-get install bubblewrap")
        pytest.skip(f"isolation={level} is not available on this host")
    os.environ["TIRL_TEST_SECRET"] = "parent-secret-7f3a"
    ts = build_toolset(["python"], {"python": {
        "isolation": level, "timeout_s": TIMEOUT_S, "preload": ["math"], "memory_mb": 256, "file_mb": 16,
        "processes": 32, "max_output_bytes": 4096, "max_sandboxes": 2}})
    ts.level = level
    yield ts
    asyncio.run(ts.shutdown())


def run(ts, code: str):
    async def go():
        view = ts.session()
        try:
            return await view.execute(ToolCall("c", "python", {"code": code}), max_output_chars=10_000)
        finally:
            await view.aclose()
    return asyncio.run(go())


def expect(ts, prop: str, request) -> None:
    """Mark the test as an expected failure where the level does not contain `prop`."""
    if prop in NOT_CONTAINED[ts.level]:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"isolation={ts.level} does not contain {prop}"))


def still_works(ts) -> None:
    result = run(ts, "6 * 7")
    assert (result.status, result.content) == (ToolStatus.OK, "42"), result


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry))
    return found


# --- limits (every level) ----------------------------------------------------------------------------


def test_infinite_loop_times_out(tools):
    start = time.monotonic()
    result = run(tools, "while True:\n    pass")
    assert result.status == ToolStatus.TIMEOUT
    assert time.monotonic() - start < TIMEOUT_S + 3
    still_works(tools)


def test_ten_gigabyte_allocation_fails(tools):
    result = run(tools, "b = bytearray(10 * 2**30)\nlen(b)")
    assert result.status == ToolStatus.EXECUTION_ERROR
    assert "MemoryError" in result.content or "died" in result.content
    still_works(tools)


def test_one_gigabyte_file_is_refused(tools):
    code = ("chunk = b'x' * 2**20\nwritten = 0\ntry:\n    with open('big.bin', 'wb') as f:\n"
            "        for _ in range(1024):\n            f.write(chunk); written += 1\nexcept OSError as e:\n"
            "    print(type(e).__name__)\nwritten")
    result = run(tools, code)
    written_mb = int(result.content.strip().splitlines()[-1])
    assert written_mb <= 16, result.content
    still_works(tools)


def test_hundred_megabytes_of_output_are_capped(tools):
    result = run(tools, "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2**20)\n'done'")
    assert result.ok
    assert len(result.content) < 10_000
    assert "more bytes of stdout not shown" in result.content
    still_works(tools)


def test_detached_process_does_not_outlive_its_timeout(tools):
    marker = f"{4000 + os.getpid() % 1000}.{uuid.uuid4().int % 10**6}"
    code = (f"import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\nwhile True:\n    pass")
    result = run(tools, code)
    assert result.status == ToolStatus.TIMEOUT
    time.sleep(0.3)
    assert processes_with(f"sleep {marker}") == []
    still_works(tools)


# --- isolation (what the weaker levels give up) -----------------------------------------------------


def test_bounded_fork_bomb_is_stopped(tools, request):
    expect(tools, "fork_bomb", request)
    code = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(20)\n        os._exit(0)\n"
            "    n += 1\nn")
    result = run(tools, code)
    assert result.ok, result.content
    assert int(result.content.splitlines()[-1]) < 64
    still_works(tools)


def test_host_secret_file_is_unreadable(tools, tmp_path, request):
    expect(tools, "host_secret", request)
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret-token")
    secret.chmod(0o600)
    result = run(tools, f"open({str(secret)!r}).read()")
    assert "s3cret-token" not in result.content


def test_project_checkout_is_invisible(tools, request):
    expect(tools, "project_checkout", request)
    source = Path(tirl.__file__).resolve().parent
    result = run(tools, f"import os\nsorted(os.listdir({str(source)!r}))")
    assert "sandbox" not in result.content, result.content


def test_cannot_write_outside_the_workspace(tools, tmp_path, request):
    expect(tools, "write_outside", request)
    tmp_path.chmod(0o755)
    target = tmp_path / "planted.txt"
    run(tools, f"open({str(target)!r}, 'w').write('pwned')")
    assert not target.exists()


def test_cannot_connect_to_a_host_loopback_port(tools, request):
    expect(tools, "loopback", request)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        run(tools, f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.send(b'hi')")
        with pytest.raises(TimeoutError):
            server.accept()


def test_cannot_signal_the_trainer_or_other_host_processes(tools, request):
    expect(tools, "kill_host_process", request)
    if tools.level == "none":
        pytest.xfail("isolation=none would kill the host processes (not run)")
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        code = (f"import os, signal\nfor pid in ({sentinel.pid}, {os.getpid()}):\n    try:\n"
                f"        os.kill(pid, signal.SIGKILL if pid == {sentinel.pid} else 0)\n        print('reached', pid)\n"
                f"    except OSError as e:\n        print(type(e).__name__)")
        result = run(tools, code)
        time.sleep(0.1)
        assert sentinel.poll() is None, "the sandbox killed a host process"
        assert "reached" not in result.content, result.content
    finally:
        sentinel.kill()
        sentinel.wait()


def test_parent_environment_is_unreadable(tools, request):
    """The trainer's environment is not passed in, and /proc/<pid>/environ of host processes (a sentinel
    started with a secret in its initial environment, which is what /proc shows) cannot be read."""
    expect(tools, "parent_environ", request)
    sentinel = subprocess.Popen(["sleep", "60"], env={**os.environ, "TIRL_TEST_SECRET": "parent-secret-7f3a"})
    try:
        code = (f"import os\nleaks = [k for k, v in os.environ.items() if 'parent-secret' in v]\n"
                f"for pid in ({sentinel.pid}, {os.getpid()}):\n    try:\n"
                f"        if b'parent-secret' in open(f'/proc/{{pid}}/environ', 'rb').read():\n"
                f"            leaks.append(pid)\n    except OSError:\n        pass\nprint('LEAKS', leaks)")
        result = run(tools, code)
    finally:
        sentinel.kill()
        sentinel.wait()
    assert "LEAKS []" in result.content, result.content


def test_trainer_survives_a_sandbox_killing_itself(tools):
    result = run(tools, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(os.getpid(), signal.SIGKILL)")
    assert result.status == ToolStatus.EXECUTION_ERROR
    still_works(tools)
