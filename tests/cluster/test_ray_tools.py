"""Tool workers: calls routed to Ray actors run there and give what a local call gives; a trajectory's
stateful session stays on one worker."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

pytest.importorskip("ray")

from tests.cluster import helpers  # noqa: E402
from tirl.cluster.ray_pool import wait_ready  # noqa: E402
from tirl.cluster.tools import ray_toolset, start_tool_workers  # noqa: E402
from tirl.envs.tool_env import ToolEnv  # noqa: E402
from tirl.tasks.base import Problem  # noqa: E402
from tirl.tools import build_toolset  # noqa: E402
from tirl.types import Message, ToolCall, ToolStatus  # noqa: E402

PYTHON = {"python": {"preload": ["math"], "timeout_s": 5, "max_sandboxes": 4}}


@pytest.fixture(scope="module")
def tool_actors(local_ray):
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[helpers.__name__])
    actors = start_tool_workers(helpers.pid_tools, 2, num_cpus=0.5, max_restarts=1)
    wait_ready(actors, "tool workers")
    yield actors
    for a in actors:
        local_ray.kill(a)


async def _calls(tools, *calls):
    view = tools.session()
    try:
        return [await view.execute(c) for c in calls]
    finally:
        await view.aclose()


def _strip(results):
    return [(r.call_id, r.name, r.status, r.content) for r in results]


def test_calls_run_on_the_tool_workers(tool_actors, local_ray):
    tools = ray_toolset(tool_actors)
    worker_pids = {str(p) for p in local_ray.get([a.pid.remote() for a in tool_actors])}
    pids = {asyncio.run(_calls(tools, ToolCall("c", "whoami", {})))[0].content for _ in range(4)}
    assert pids == worker_pids and str(os.getpid()) not in pids  # round-robin over both workers, none here


def test_results_equal_local_calls_errors_included(tool_actors):
    calls = [ToolCall("a", "calculator", {"expression": "4821 * 37"}),
             ToolCall("b", "calculator", {"expression": "1 / 0"}),
             ToolCall("c", "calculator", {"expr": "1"}),
             ToolCall("d", "nope", {}),
             ToolCall("e", "calculator", ["not", "an", "object"])]
    remote = asyncio.run(_calls(ray_toolset(tool_actors), *calls))
    local = asyncio.run(_calls(helpers.pid_tools(), *calls))
    assert _strip(remote) == _strip(local)
    assert [r.status for r in remote][:4] == [ToolStatus.OK, ToolStatus.EXECUTION_ERROR, ToolStatus.VALIDATION_ERROR,
                                              ToolStatus.UNKNOWN_TOOL]


def test_injected_faults_with_tool_workers_follow_the_local_pattern(tool_actors):
    """rollout.tool_fault_rate with Ray tool workers (EnvFactory passes the rate and seed to the session):
    the same calls fail as with local tools, and the others run on the workers."""
    async def statuses(tools):
        view = tools.session(0.5, fault_seed=3)
        try:
            return [(await view.execute(ToolCall("c", "calculator", {"expression": "2 + 2"}))).status
                    for _ in range(12)]
        finally:
            await view.aclose()

    remote, local = asyncio.run(statuses(ray_toolset(tool_actors))), asyncio.run(statuses(helpers.pid_tools()))
    assert remote == local and {ToolStatus.OK, ToolStatus.EXECUTION_ERROR} == set(remote)


def test_a_tool_env_runs_its_calls_on_the_workers(tool_actors, local_ray):
    env = ToolEnv(Problem("p", "who?", "x"), "Use tools.", ray_toolset(tool_actors).session())
    reply = Message("assistant", '<tool_call>{"name": "whoami", "arguments": {}}</tool_call>')
    step = asyncio.run(env.step(reply))
    asyncio.run(env.close())
    assert step.tool_results[0].status is ToolStatus.OK
    assert int(step.observations[0].content) in local_ray.get([a.pid.remote() for a in tool_actors])
    assert int(step.observations[0].content) != os.getpid()


def test_a_stateful_python_session_stays_on_one_worker(local_ray):
    actors = start_tool_workers(lambda: build_toolset(["python"], PYTHON), 2, num_cpus=0.25, max_restarts=0)
    try:
        wait_ready(actors, "tool workers")
        tools = ray_toolset(actors)
        cells = [ToolCall("c", "python", {"code": c}) for c in ("import os\nx = 41", "x + 1", "os.getpid() > 0")]
        sessions = [asyncio.run(_calls(tools, *cells)) for _ in range(3)]
        local_tools = build_toolset(["python"], PYTHON)
        try:
            local = asyncio.run(_calls(local_tools, *cells))
        finally:
            asyncio.run(local_tools.shutdown())
        assert all(_strip(s) == _strip(local) for s in sessions)
        assert "42" in local[1].content
        asyncio.run(tools.shutdown())
    finally:
        for a in actors:
            local_ray.kill(a)


def test_a_tool_worker_killed_mid_call_is_an_error_the_model_sees_then_it_is_back(local_ray):
    (actor,) = start_tool_workers(helpers.slow_tools, 1, num_cpus=0.25, max_restarts=1)
    try:
        wait_ready([actor], "tool workers")
        tools = ray_toolset([actor])
        old_pid = local_ray.get(actor.pid.remote())

        async def call_and_kill():
            running = asyncio.ensure_future(_calls(tools, ToolCall("c", "sleepy", {"seconds": 30})))
            await asyncio.sleep(1.0)
            os.kill(old_pid, signal.SIGKILL)
            return await running

        (killed,) = asyncio.run(call_and_kill())
        assert killed.status is ToolStatus.EXECUTION_ERROR and "tool worker running 'sleepy' died" in killed.content
        deadline = time.monotonic() + 120
        while True:  # Ray restarts the worker; calls work again there
            (again,) = asyncio.run(_calls(tools, ToolCall("d", "sleepy", {"seconds": 0})))
            if again.status is ToolStatus.OK or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert again.status is ToolStatus.OK and int(again.content) != old_pid
    finally:
        local_ray.kill(actor)
