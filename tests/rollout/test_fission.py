"""Fission-GRPO (reference 4.2) with a scripted model, real `ToolEnv`s and the real calculator tool.

What the strategy must get right: recovery groups start only from real tool errors (configured
statuses; not wrong answers, not failed rollouts); the corrective context is prompt (never under the
loss mask) and exactly the failed trajectory's tokens up to its error message; GRPO advantages are
normalised inside each recovery group; the buffer is LIFO and survives a checkpoint.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tirl.backends.scripted import ScriptedBackend
from tirl.envs.tool_env import ToolEnv
from tirl.rewards.base import RewardResult
from tirl.rollout.agent import TurnLimits
from tirl.rollout.fission import JUDGE_SYSTEM, Fission
from tirl.rollout.groups import RolloutContext, RolloutSpec, run_strategy
from tirl.rollout.io import to_dict
from tirl.tasks.base import Problem
from tirl.tools import ToolSet, calculator
from tirl.trainer.update import UpdateSettings, advantages_for
from tirl.types import StopReason

TOOLS = ToolSet([calculator])
RIGHT = "<answer>2</answer><|im_end|>"
WRONG = "<answer>3</answer><|im_end|>"
DIVIDE_BY_ZERO = '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'
BAD_ARGUMENT = '<tool_call>{"name": "calculator", "arguments": {"expr": "1+1"}}</tool_call>'
BROKEN_JSON = '<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>'
UNKNOWN_TOOL = '<tool_call>{"name": "abacus", "arguments": {"expression": "1+1"}}</tool_call>'
GOOD_CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'


def _reward(traj, problem, group):
    correct = traj.final_answer == f"<answer>{problem.answer}</answer>"
    return RewardResult(float(correct), {"correct": float(correct)}, correct)


def _problems(*kinds: str) -> list[Problem]:
    """One problem per kind; the question names what sample 0 of the flat group does first."""
    return [Problem(id=f"p{i}-{kind}", question=f"{kind}: 1+1?", answer="2") for i, kind in enumerate(kinds)]


FIRST_MOVE = {"exec": DIVIDE_BY_ZERO, "args": BAD_ARGUMENT, "json": BROKEN_JSON, "unknown": UNKNOWN_TOOL,
              "wrong": WRONG, "right": RIGHT}


def _script(recover: str = RIGHT):
    """Flat sample 0 plays the problem's first move, then answers wrong; other flat samples answer right.
    Recovery rollouts (keys starting with "fission") make a good call, then answer `recover` (a callable
    of the sample index, or a text)."""
    def script(request, turn):
        key, question = request.key, request.messages[1].content
        if key[0] == "fission":
            if turn == 1:
                return GOOD_CALL
            return recover(key[2]) if callable(recover) else recover
        if key[1] != 0:
            return RIGHT
        return FIRST_MOVE[question.split(":")[0]] if turn == 0 else WRONG
    return script


def _ctx(fmt, script, make_env=None, step=0, **spec):
    make_env = make_env or (lambda p: ToolEnv(p, "Solve it.", TOOLS))
    spec = {"group_size": 2, "limits": TurnLimits(max_turns=4), **spec}
    return RolloutContext(make_env, ScriptedBackend(fmt.tokenizer, script), fmt, RolloutSpec(**spec), _reward,
                          step=step)


def _fission_groups(out):
    return [g for g in out.groups if any(t.meta.origin for t in g.trajectories)]


def test_only_a_real_tool_error_starts_a_recovery_group(smol_format):
    problems = _problems("exec", "wrong", "json", "unknown", "right")
    ctx = _ctx(smol_format, _script())
    out = asyncio.run(run_strategy(Fission(), problems, ctx))
    assert len(out.groups) == 6  # five flat groups, one recovery group
    [recovery] = _fission_groups(out)
    assert recovery.task_id == "p0-exec" and recovery.group_id == "0-f0" and len(recovery.trajectories) == 2
    failed = out.groups[0].trajectories[0]
    assert failed.turns[0].tool_results[0].status == "execution_error"
    assert failed.reward == 0.0
    assert {t.meta.origin for t in recovery.trajectories} == {"fission:step=0,group=0-0,sample=0,turn=0"}
    assert out.metrics["fission/contexts"] == 1 and out.metrics["fission/groups"] == 1
    assert out.metrics["fission/buffer"] == 0
    assert out.metrics["fission/recovery_rate"] == 1.0 and out.metrics["fission/recovery_correct"] == 1.0
    # wrong answers (p1), unparseable JSON (p2) and unknown tools (p3) are not configured errors
    assert out.groups[1].trajectories[0].reward == 0.0 and not out.groups[1].trajectories[0].tool_results
    assert out.groups[2].trajectories[0].tool_results[0].status == "invalid_call"
    assert out.groups[3].trajectories[0].tool_results[0].status == "unknown_tool"


def test_the_corrective_context_is_prompt_and_ends_with_the_error_message(smol_format):
    ctx = _ctx(smol_format, _script())
    out = asyncio.run(run_strategy(Fission(), _problems("exec"), ctx))
    failed = out.groups[0].trajectories[0]
    [recovery] = _fission_groups(out)
    end = failed.turns[0].obs_end
    for t in recovery.trajectories:
        # the failed call and its error feedback are the prompt: no loss-mask entry covers them
        assert t.prompt_ids == failed.prompt_ids + failed.response_ids[:end]
        assert len(t.loss_mask) == len(t.response_ids)
        assert smol_format.decode([tok for tok, m in zip(t.response_ids, t.loss_mask) if m]) == GOOD_CALL + RIGHT
        assert t.stop_reason == StopReason.ANSWERED and len(t.turns) == 2
    prefix_text = smol_format.decode(recovery.trajectories[0].prompt_ids)
    assert prefix_text.endswith("Error: ValueError: division by zero<|im_end|>\n<|im_start|>assistant\n")
    assert DIVIDE_BY_ZERO in prefix_text
    # on-policy from the context: the first recovery request is exactly the context (turn 1 of the episode)
    first = next(r for r in ctx.backend.requests if r.key[0] == "fission")
    assert first.key[-1] == 1 and first.prompt_ids == recovery.trajectories[0].prompt_ids


def test_recovery_group_advantages_are_normalised_inside_the_group(smol_format):
    """Reference 4.2: fission-group rewards [1,0,0,0] -> A=[1.5,-0.5,-0.5,-0.5]; prefix tokens m=0."""
    ctx = _ctx(smol_format, _script(recover=lambda si: RIGHT if si == 0 else WRONG))
    out = asyncio.run(run_strategy(Fission(group_size=4), _problems("exec"), ctx))
    [recovery] = _fission_groups(out)
    assert recovery.rewards == [1.0, 0.0, 0.0, 0.0]
    batch = advantages_for(out.groups, UpdateSettings())
    rows = [i for i, t in enumerate(batch.trajs) if t.meta.origin]
    assert len(rows) == 4
    for row, expected in zip(rows, [1.5, -0.5, -0.5, -0.5]):
        traj = batch.trajs[row]
        on = batch.mask[row] == 1
        assert int(on.sum()) == sum(traj.loss_mask) == len(traj.response_ids) - _inserted(traj)
        assert batch.advantages[row][on].tolist() == pytest.approx([expected] * int(on.sum()), abs=1e-5)
    flat = [i for i, t in enumerate(batch.trajs) if not t.meta.origin]
    assert out.groups[0].rewards == [0.0, 1.0] and len(flat) == 2  # its own group: +-0.7071
    assert batch.advantages[flat[0]][batch.mask[flat[0]] == 1][0].item() == pytest.approx(-0.70710, abs=1e-4)


def _inserted(traj) -> int:
    return sum(t.obs_end - t.gen_end for t in traj.turns)


@pytest.mark.parametrize("kind,status,default_counts", [
    ("exec", "execution_error", True), ("args", "validation_error", True),
    ("json", "invalid_call", False), ("unknown", "unknown_tool", False)])
def test_a_status_counts_exactly_when_configured(smol_format, kind, status, default_counts):
    problems = _problems(kind)
    default = asyncio.run(run_strategy(Fission(), problems, _ctx(smol_format, _script())))
    assert default.groups[0].trajectories[0].turns[0].tool_results[0].status == status
    assert bool(_fission_groups(default)) == default_counts
    only = asyncio.run(run_strategy(Fission(statuses=[status]), problems, _ctx(smol_format, _script())))
    assert len(_fission_groups(only)) == 1
    others = [s for s in ("invalid_call", "unknown_tool", "validation_error", "execution_error") if s != status]
    none = asyncio.run(run_strategy(Fission(statuses=others), problems, _ctx(smol_format, _script())))
    assert not _fission_groups(none)


class _BreaksAfterTheError(ToolEnv):
    """The env's own code fails on the turn after a tool error: a failed rollout, not a tool error."""

    async def step(self, assistant):
        if self.turn == 1:
            raise KeyError("env bug")
        return await super().step(assistant)


def test_a_failed_rollout_starts_no_recovery_group(smol_format):
    make_env = lambda p: _BreaksAfterTheError(p, "Solve it.", TOOLS)  # noqa: E731
    ctx = _ctx(smol_format, _script(), make_env=make_env, max_failed_fraction=1.0)
    out = asyncio.run(run_strategy(Fission(), _problems("exec"), ctx))
    [failed] = out.failed
    assert failed.stop_reason == StopReason.ERROR and failed.turns[0].tool_results[0].status == "execution_error"
    assert not _fission_groups(out) and out.metrics["fission/contexts"] == 0


def test_an_error_in_the_last_turn_leaves_nothing_to_recover_in(smol_format):
    ctx = _ctx(smol_format, _script(), limits=TurnLimits(max_turns=1))
    out = asyncio.run(run_strategy(Fission(), _problems("exec"), ctx))
    assert out.groups[0].trajectories[0].stop_reason == StopReason.MAX_TURNS
    assert out.groups[0].trajectories[0].turns[0].tool_results[0].status == "execution_error"
    assert not _fission_groups(out) and out.metrics["fission/contexts"] == 0


def _origins(out) -> list[str]:
    return [g.task_id for g in _fission_groups(out)]


def test_the_buffer_is_lifo_and_keeps_the_newest(smol_format):
    fission = Fission(max_groups=1, buffer_size=3)
    steps = [_problems("exec", "exec", "exec"), _problems("right", "exec", "exec", "right"), _problems("right")]
    popped, buffers = [], []
    for step, problems in enumerate(steps):
        problems = [Problem(f"s{step}-{p.id}", p.question, p.answer) for p in problems]
        out = asyncio.run(run_strategy(fission, problems, _ctx(smol_format, _script(), step=step)))
        popped += _origins(out)
        buffers.append([d["problem"]["id"] for d in fission.state_dict()["buffer"]])
    # step 0 pushes p0 p1 p2 and pops p2; step 1 pushes p1 p2 on top, drops the oldest (s0-p0), pops s1-p2;
    # step 2 has no error and pops the newest left (s1-p1)
    assert popped == ["s0-p2-exec", "s1-p2-exec", "s1-p1-exec"]
    assert buffers == [["s0-p0-exec", "s0-p1-exec"], ["s0-p1-exec", "s1-p1-exec"], ["s0-p1-exec"]]


def test_the_newest_contexts_span_the_groups(smol_format):
    """A group with many errors does not crowd out a group with one: the last round pushed holds each
    group's first error."""
    def script(request, turn):
        if request.key[0] == "fission":
            return RIGHT
        busy = request.messages[1].content.startswith("busy")
        return (DIVIDE_BY_ZERO if busy or request.key[1] == 0 else RIGHT) if turn == 0 else WRONG
    problems = [Problem("p0", "busy: 1+1?", "2"), Problem("p1", "calm: 1+1?", "2")]
    ctx = _ctx(smol_format, script, group_size=3)
    fission = Fission(max_groups=2, buffer_size=10)
    out = asyncio.run(run_strategy(fission, problems, ctx))
    assert out.metrics["fission/contexts"] == 4 and _origins(out) == ["p1", "p0"]
    assert [t.meta.origin for g in _fission_groups(out) for t in g.trajectories[:1]] == [
        "fission:step=0,group=0-1,sample=0,turn=0", "fission:step=0,group=0-0,sample=0,turn=0"]
    assert [d["trajectory"]["meta"]["sample_index"] for d in fission.state_dict()["buffer"]] == [2, 1]


def _untimed(d):
    """A trajectory dict without its wall-clock readings (the only fields two identical runs may differ in)."""
    if isinstance(d, dict):
        return {k: _untimed(v) for k, v in d.items() if k not in ("gen_seconds", "tool_seconds", "latency_s")}
    if isinstance(d, list):
        return [_untimed(v) for v in d]
    return d


def test_state_dict_round_trip_continues_identically(smol_format):
    steps = [_problems("exec", "exec", "args"), _problems("right", "exec")]
    uninterrupted = Fission(max_groups=1, buffer_size=4)
    asyncio.run(run_strategy(uninterrupted, steps[0], _ctx(smol_format, _script(), step=0)))
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # what a checkpoint holds
    assert len(state["buffer"]) == 2
    resumed = Fission(max_groups=1, buffer_size=4)
    resumed.load_state_dict(state)
    outs = [asyncio.run(run_strategy(s, steps[1], _ctx(smol_format, _script(), step=1)))
            for s in (uninterrupted, resumed)]
    dumps = [[_untimed(to_dict(t)) for t in o.trajectories] for o in outs]
    assert dumps[0] == dumps[1] and len(_fission_groups(outs[0])) == 1
    assert uninterrupted.state_dict() == resumed.state_dict()
    assert len(resumed.state_dict()["buffer"]) == 2


def test_the_policy_as_judge_adds_a_diagnosis_to_the_error(smol_format):
    diagnosis = {"text": "The expression divides by zero; use a nonzero divisor."}

    def script(request, turn):
        if request.messages[0].content == JUDGE_SYSTEM:
            assert "1/0" in request.messages[1].content and "division by zero" in request.messages[1].content
            return diagnosis["text"] + "<|im_end|>"
        return _script()(request, turn)

    ctx = _ctx(smol_format, script)
    out = asyncio.run(run_strategy(Fission(judge="policy"), _problems("exec"), ctx))
    [recovery] = _fission_groups(out)
    failed = out.groups[0].trajectories[0]
    prompt = smol_format.decode(recovery.trajectories[0].prompt_ids)
    assert prompt.endswith("Error: ValueError: division by zero\nDiagnosis: The expression divides by zero; "
                           "use a nonzero divisor.<|im_end|>\n<|im_start|>assistant\n")
    end = failed.turns[0].gen_end
    assert recovery.trajectories[0].prompt_ids[:len(failed.prompt_ids) + end] == \
        failed.prompt_ids + failed.response_ids[:end]
    assert out.metrics["fission/judge_leaks"] == 0
    judged = [r for r in ctx.backend.requests if r.key[0] == "fission-judge"]
    assert len(judged) == 1 and judged[0].max_new_tokens == 64

    diagnosis["text"] = "Divide differently; the answer is 2."  # leaks the gold answer: thrown away
    leaky = asyncio.run(run_strategy(Fission(judge="policy"), _problems("exec"), _ctx(smol_format, script)))
    [recovery] = _fission_groups(leaky)
    assert recovery.trajectories[0].prompt_ids == failed.prompt_ids + failed.response_ids[:failed.turns[0].obs_end]
    assert leaky.metrics["fission/judge_leaks"] == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"statuses": ["invalid_arguments"]}, r"statuses: \['invalid_arguments'\] are not tool error statuses"),
    ({"statuses": []}, "statuses is empty"),
    ({"judge": "gpt"}, "judge: 'gpt' is not one of"),
    ({"group_size": 1}, "group_size=1: must be at least 2"),
    ({"buffer_size": 0}, "buffer_size=0: must be at least 1"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Fission(**kwargs)


def test_config_builds_fission_and_names_a_bad_status():
    from tirl.config import load_config
    from tirl.errors import ConfigError
    from tirl.rollout.step import build_strategy

    strategy = build_strategy(load_config(None, ["rollout.strategy=fission", "rollout.fission.max_groups=2"]))
    assert isinstance(strategy, Fission) and strategy.max_groups == 2
    assert sorted(strategy.statuses) == ["execution_error", "timeout", "validation_error"]
    with pytest.raises(ConfigError, match="rollout.fission.statuses.0"):
        load_config(None, ["rollout.fission.statuses=[invalid_arguments]"])
