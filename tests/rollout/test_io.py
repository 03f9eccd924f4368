"""Trajectories survive a round trip through JSON lines; damaged files are reported or repaired."""

from __future__ import annotations

import asyncio

import pytest

from tirl.backends.base import SamplingParams
from tirl.backends.scripted import ScriptedBackend
from tirl.envs.tool_env import ToolEnv, ToolLimits
from tirl.errors import DataError
from tirl.rollout.agent import TurnLimits, run_trajectory
from tirl.rollout.io import append_jsonl, drop_partial_tail, read_jsonl
from tirl.tasks.base import Problem
from tirl.tools import ToolSet, calculator
from tirl.types import TrajectoryMeta

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "4821 * 37"}}</tool_call>'
ANSWER = "<answer>178377</answer><|im_end|>"


@pytest.fixture
def trajs(smol_format):
    def one(script, i):
        env = ToolEnv(Problem(id=f"p{i}", question="What is 4821 * 37?", answer="178377"), "Solve it.",
                      ToolSet([calculator]), ToolLimits())
        return asyncio.run(run_trajectory(env, ScriptedBackend(smol_format.tokenizer, script), smol_format,
                                          SamplingParams(), TurnLimits(), TrajectoryMeta(f"p{i}", "g0"), seed=i))
    return [one([CALL, ANSWER], 0), one(["<tool_call>{bad", ANSWER], 1)]


def test_round_trip_keeps_every_field(tmp_path, trajs):
    path = tmp_path / "t.jsonl"
    append_jsonl(path, trajs)
    assert list(read_jsonl(path)) == trajs


def test_a_bad_line_names_the_file_and_line(tmp_path, trajs):
    path = tmp_path / "t.jsonl"
    append_jsonl(path, trajs[:1])
    with path.open("a") as f:
        f.write('{"prompt_ids": [1]}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: not a tirl trajectory"):
        list(read_jsonl(path))


def test_an_interrupted_last_line_is_dropped_and_complete_lines_kept(tmp_path, trajs):
    path = tmp_path / "t.jsonl"
    append_jsonl(path, trajs)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) - 40])  # killed while writing the second line
    assert drop_partial_tail(path) > 0
    assert list(read_jsonl(path)) == trajs[:1]
    assert drop_partial_tail(path) == 0 and drop_partial_tail(tmp_path / "missing.jsonl") == 0
