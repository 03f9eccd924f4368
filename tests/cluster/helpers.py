"""Worker builders for the cluster tests, pickled by value into the Ray workers."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from tirl.backends.scripted import ScriptedBackend
from tirl.cluster.workers import WorkerParts
from tirl.envs.tool_env import ToolEnv
from tirl.rewards.base import RewardResult
from tirl.tools import ToolSet, calculator, tool


def script(request, turn, bias=0):
    """Turn 0 calls the calculator on a number drawn from the request's seed; turn 1 answers with the
    seed's residue and the backend's weights version, so outputs depend on seeds and weights."""
    if turn == 0:
        expression = f"{request.seed % 1000} + 1"
        return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'
    return f"<answer>{request.seed % 7}</answer> w{bias}<|im_end|>"


class VersionedScripted(ScriptedBackend):
    """The scripted backend, slowed down by `delay_s` per call, whose output names the weights it holds
    (`{"bias": tensor}`): a worker generating with stale weights would show it."""

    def __init__(self, tokenizer, delay_s: float = 0.0):
        super().__init__(tokenizer, self._script)
        self.delay_s = delay_s
        self.bias = 0

    def _script(self, request, turn):
        return script(request, turn, self.bias)

    async def generate(self, request):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await super().generate(request)

    def update_weights(self, state_dict) -> None:
        self.bias = int(state_dict["bias"])


def make_env(problem):
    return ToolEnv(problem, "Solve it.", ToolSet([calculator]))


def reward(traj, problem, group):
    correct = traj.final_answer is not None and traj.final_answer.startswith(f"<answer>{problem.answer}<")
    return RewardResult(float(correct), {"correct": float(correct)}, correct)


@dataclass(frozen=True)
class ScriptedBuild:
    """A worker with the scripted backend and a calculator env."""

    tokenizer_dir: str
    delay_s: float = 0.0

    def __call__(self) -> WorkerParts:
        from tirl.chat.format import load_chat_format
        from tirl.models.loading import load_tokenizer

        tok = load_tokenizer(self.tokenizer_dir)
        return WorkerParts(make_env, VersionedScripted(tok, self.delay_s), load_chat_format(tok))


@tool(name="whoami")
async def whoami() -> str:
    """The process id of the process running this tool."""
    return str(os.getpid())


def pid_tools() -> ToolSet:
    return ToolSet([whoami, calculator])


@tool(name="sleepy")
async def sleepy(seconds: float) -> str:
    """Sleep, then give the process id.

    Args:
        seconds: How long to sleep.
    """
    await asyncio.sleep(seconds)
    return str(os.getpid())


def slow_tools() -> ToolSet:
    return ToolSet([sleepy])
