"""Execution control in one place: per-tool timeout, concurrency limit, retries of transient failures only;
configurable tools (`tools.<name>` settings) and per-trajectory sessions."""

from __future__ import annotations

import asyncio

import pytest

from tirl.config import load_config
from tirl.errors import ConfigError
from tirl.tools import ExecutionPolicy, Tool, ToolSet, TransientToolError, build_toolset, tool
from tirl.trainer.build import preflight
from tirl.types import ToolCall, ToolStatus


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(id="c", name=name, arguments=arguments)


class Flaky(Tool):
    name, description = "flaky", "Fails transiently a number of times, then answers."
    parameters = {"type": "object", "properties": {}}

    def __init__(self, failures: int, error: type[Exception] = TransientToolError):
        self.failures, self.error, self.attempts = failures, error, 0

    async def run(self) -> str:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error("connection reset")
        return "ok"


def test_transient_failures_are_retried_with_backoff():
    flaky = Flaky(failures=2)
    tools = ToolSet([flaky], {"flaky": ExecutionPolicy(retries=2, retry_backoff_s=0.01)})
    result = asyncio.run(tools.execute(call("flaky")))
    assert (result.status, result.content, flaky.attempts) == (ToolStatus.OK, "ok", 3)


def test_retries_stop_after_the_budget_and_never_apply_to_other_errors():
    flaky = Flaky(failures=5)
    result = asyncio.run(ToolSet([flaky], {"flaky": ExecutionPolicy(retries=1, retry_backoff_s=0)}).execute(call("flaky")))
    assert result.status == ToolStatus.EXECUTION_ERROR and flaky.attempts == 2
    broken = Flaky(failures=5, error=ValueError)
    asyncio.run(ToolSet([broken], {"flaky": ExecutionPolicy(retries=3, retry_backoff_s=0)}).execute(call("flaky")))
    assert broken.attempts == 1


def test_a_timeout_is_never_retried():
    attempts = []

    @tool
    async def slow() -> str:
        """Sleeps."""
        attempts.append(1)
        await asyncio.sleep(5)
        return "late"

    tools = ToolSet([slow], {"slow": ExecutionPolicy(timeout_s=0.05, retries=3, retry_backoff_s=0)})
    result = asyncio.run(tools.execute(call("slow")))
    assert result.status == ToolStatus.TIMEOUT and len(attempts) == 1


def test_concurrency_limit_is_shared_by_every_session_view():
    running, peak = [0], [0]

    @tool
    async def work() -> str:
        """Works for a while."""
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.01)
        running[0] -= 1
        return "done"

    tools = ToolSet([work], {"work": ExecutionPolicy(max_concurrency=2)})

    async def many():
        views = [tools.session() for _ in range(5)]
        return await asyncio.gather(*(v.execute(call("work")) for v in views for _ in range(4)))

    assert all(r.ok for r in asyncio.run(many()))
    assert peak[0] == 2
    asyncio.run(many())  # a second event loop gets its own semaphore: no "bound to a different loop"


class Counter(Tool):
    name, description = "counter", "Counts its calls within a trajectory."
    parameters = {"type": "object", "properties": {}}

    def __init__(self, shared: bool = True):
        self.count, self.closed, self.shared = 0, 0, shared

    def session(self) -> Counter:
        return Counter(shared=False)

    async def run(self) -> str:
        self.count += 1
        return str(self.count)

    async def aclose(self) -> None:
        self.closed += 1


def test_sessions_get_their_own_instances_and_close_them():
    shared = Counter()
    tools = ToolSet([shared])

    async def trajectory():
        view = tools.session()
        out = [(await view.execute(call("counter"))).content for _ in range(3)]
        instance = view.get("counter")
        await view.aclose()
        return out, instance

    (out1, inst1), (out2, inst2) = asyncio.run(trajectory()), asyncio.run(trajectory())
    assert out1 == out2 == ["1", "2", "3"]
    assert inst1 is not inst2 and inst1.closed == inst2.closed == 1 and shared.closed == 0
    asyncio.run(tools.shutdown())
    assert shared.closed == 1


@pytest.mark.parametrize("names, settings, message", [
    (["calculator"], {"calculator": {"timeout_s": -1}}, "tools.calculator.timeout_s"),
    (["calculator"], {"calculator": {"speed": 3}}, "tools.calculator.speed: unknown key"),
    (["python"], {"python": {"mode": "notebook"}}, "tools.python.mode"),
    (["calculator"], {"search": {}}, "tools.search: settings for a tool that is not used"),
])
def test_bad_tool_settings_name_the_key(names, settings, message):
    with pytest.raises(ValueError, match=message):
        build_toolset(names, settings)


def test_preflight_checks_tool_settings_without_starting_anything():
    cfg = load_config(overrides=["tools.calculator.max_concurrency=0"])
    with pytest.raises(ConfigError, match="tools.calculator.max_concurrency"):
        preflight(cfg)
    cfg = load_config(overrides=["task.tools=[python]", "tools.python.isolaton=none"])
    with pytest.raises(ConfigError, match="tools.python.isolaton: unknown key"):
        preflight(cfg)


def test_policy_settings_reach_the_tool_set():
    tools = build_toolset(["calculator"], {"calculator": {"timeout_s": 3, "max_concurrency": 2, "retries": 1}})
    assert tools.policy("calculator") == ExecutionPolicy(3.0, 2, 1, 0.5)
    assert tools.describe()["calculator"]["policy"]["max_concurrency"] == 2


class Counting(Tool):
    name, description = "count", "Counts its runs."
    parameters = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}

    def __init__(self):
        self.runs = 0

    async def run(self, x: int) -> str:
        self.runs += 1
        return str(x)


def _statuses(tools: ToolSet, n: int) -> list[ToolStatus]:
    async def calls():
        return [(await tools.execute(call("count", x=i))).status for i in range(n)]
    return asyncio.run(calls())


def test_injected_faults_follow_the_sessions_seeded_generator_and_never_run_the_tool():
    """Call i fails iff the i-th draw of random.Random(seed) is below the rate; a failed call does not run."""
    import random

    counting = Counting()
    shared = ToolSet([counting])
    got = _statuses(shared.session(0.3, fault_seed=7), 40)
    rng = random.Random(7)
    expected = [ToolStatus.EXECUTION_ERROR if rng.random() < 0.3 else ToolStatus.OK for _ in range(40)]
    assert got == expected and 5 <= expected.count(ToolStatus.EXECUTION_ERROR) <= 20
    assert counting.runs == expected.count(ToolStatus.OK)
    assert _statuses(shared.session(0.3, fault_seed=7), 40) == expected        # reproducible
    assert _statuses(shared.session(0.3, fault_seed=8), 40) != expected        # per-seed
    assert set(_statuses(shared, 10)) == {ToolStatus.OK}                        # the shared set: no faults
    assert set(_statuses(shared.session(1.0), 5)) == {ToolStatus.EXECUTION_ERROR}
    result = asyncio.run(shared.session(1.0).execute(call("count", x=1)))
    assert result.content == ("Error: the count service is temporarily unavailable (503); the call did not run, "
                              "try it again")
    bad = asyncio.run(shared.session(1.0).execute(call("count", x="one")))      # invalid calls fail as before
    assert bad.status == ToolStatus.VALIDATION_ERROR
    with pytest.raises(ValueError, match="fault_rate"):
        shared.session(1.5)


def test_tool_fault_rate_config_reaches_every_env_with_a_seed_per_problem_and_sample(monkeypatch):
    """rollout.tool_fault_rate: the n-th env of a problem gets the seed of (problem id, n) whatever came
    in between, so two runs that sample a problem in the same order see the same faults."""
    import tirl.trainer.build as build
    from tirl.tasks import TASKS

    with pytest.raises(ConfigError, match="tool_fault_rate"):
        load_config(overrides=["rollout.tool_fault_rate=1.5"])
    task = TASKS.get("arithmetic")()
    cfg = load_config(overrides=["rollout.tool_fault_rate=0.5"])
    [p, q] = task.heldout()[:2]
    monkeypatch.setattr(build, "template_supports_tools", lambda tokenizer, template: True)
    fmt = type("Fmt", (), {"tokenizer": None, "template": "", "name": "chatml-tools"})()

    def pattern(order):
        make = build.EnvFactory(task, build_toolset(["calculator"], {}), cfg, fmt)
        return [[s == ToolStatus.OK for s in _statuses_of(make(problem).tools, "calculator", 12)] for problem in order]

    a, b = pattern([p, p, q]), pattern([q, p, p])
    assert a[0] == b[1] and a[1] == b[2] and a[2] == b[0] and a[0] != a[1]
    assert 0 < sum(map(sum, a)) < 36


def _statuses_of(tools: ToolSet, name: str, n: int) -> list[ToolStatus]:
    async def calls():
        return [(await tools.execute(ToolCall(id="c", name=name, arguments={"expression": "1+1"}))).status
                for _ in range(n)]
    return asyncio.run(calls())
