"""The multi-turn agent loop: generate, let the env react (run tools), append, repeat.

`run_trajectory` is a coroutine; many run concurrently and the backend batches their generations.
Token bookkeeping follows DESIGN.md invariants 1 and 2: sampled tokens are appended exactly as the
backend returned them (mask 1, with their sampling log-probs), observation tokens come from the chat
format (mask 0, log-prob 0), and nothing is re-tokenised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from tirl.backends.base import Completion, GenerationRequest, Generator, SamplingParams, derive_seed
from tirl.chat.format import ChatFormat
from tirl.envs.base import Env, StepResult
from tirl.rollout.checks import check_trajectory
from tirl.rollout.watchdog import Progress
from tirl.types import Message, StopReason, Trajectory, TrajectoryMeta, Turn


@dataclass(frozen=True)
class TurnLimits:
    """Budgets of one trajectory."""

    max_turns: int = 4
    """Assistant generations at most; a tool call in the last one ends the trajectory (`max_turns`)."""
    max_new_tokens_per_turn: int = 128
    """Sampled tokens per generation."""
    max_new_tokens: int = 384
    """Sampled tokens per trajectory, all turns together."""
    max_context: int = 8192
    """Prompt + response may not exceed this (the model's context window or less)."""
    timeout_s: float | None = None
    """Wall-clock seconds per trajectory, checked between turns (None: no limit)."""


@dataclass
class _Builder:
    """Mutable state while a trajectory is being built."""

    prompt_ids: list[int]
    response: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)

    def add_sampled(self, c: Completion) -> None:
        self.response += c.token_ids
        self.mask += [1] * len(c.token_ids)
        self.logprobs += c.logprobs

    def add_inserted(self, ids: list[int]) -> None:
        self.response += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)


async def run_trajectory(env: Env, backend: Generator, fmt: ChatFormat, sampling: SamplingParams,
                         limits: TurnLimits, meta: TrajectoryMeta, seed: int, key: tuple = (),
                         check: bool = True, progress: Progress | None = None) -> Trajectory:
    """Roll out one episode of `env` and return its trajectory (reward not yet set)."""
    start = time.monotonic()
    progress = progress or Progress()
    async with backend.participant():
        messages = await env.reset()
        b = _Builder(fmt.prompt_ids(messages, env.tool_schemas or None), messages=list(messages))
        stop, answer = StopReason.MAX_TURNS, None
        try:
            for t in range(limits.max_turns):
                budget = _budget(b, limits)
                if budget <= 0:
                    stop = _out_of_room(b, limits)
                    break
                if limits.timeout_s is not None and time.monotonic() - start > limits.timeout_s:
                    stop = StopReason.TIMEOUT
                    break
                stop, answer, observations = await _turn(env, backend, fmt, b, sampling, budget, seed, key, t,
                                                         progress)
                if stop is not None:
                    break
                if t == limits.max_turns - 1:
                    stop = StopReason.MAX_TURNS
                    break
                b.add_inserted(fmt.observation_ids(observations, sampled_eos=_ended_with_eos(b, fmt)))
                b.turns[-1] = _with_obs_end(b.turns[-1], len(b.response))
                b.messages += observations
        finally:
            progress.done(key)
            await env.close()
    traj = Trajectory(
        prompt_ids=tuple(b.prompt_ids), response_ids=tuple(b.response), loss_mask=tuple(b.mask),
        logprobs=tuple(b.logprobs), turns=tuple(b.turns), messages=tuple(b.messages), stop_reason=stop,
        meta=meta, final_answer=answer)
    if check:
        check_trajectory(traj, fmt)
    return traj


async def _turn(env: Env, backend: Generator, fmt: ChatFormat, b: _Builder, sampling: SamplingParams,
                budget: int, seed: int, key: tuple, t: int, progress: Progress):
    """One generation and the env's reaction; returns (stop reason or None, final answer, observations)."""
    request = GenerationRequest(
        prompt_ids=tuple(b.prompt_ids + b.response), max_new_tokens=budget,
        stop_strings=env.stop_strings or (fmt.tool_call_stop,),
        sampling=sampling, seed=derive_seed(seed, "turn", t), key=(*key, t))
    progress.mark(key, f"generating turn {t}")
    t0 = time.monotonic()
    completion = await backend.generate(request)
    gen_s = time.monotonic() - t0
    gen_start = len(b.response)
    b.add_sampled(completion)
    ids = completion.token_ids
    text = fmt.decode(ids[:-1] if completion.finish_reason == "eos" else ids)
    msg = Message("assistant", text)
    b.messages.append(msg)
    if completion.finish_reason == "length":
        b.turns.append(Turn(gen_start, len(b.response), len(b.response), text, "length", gen_seconds=gen_s))
        return StopReason.MAX_TOKENS, None, ()
    progress.mark(key, f"running tools of turn {t}")
    t1 = time.monotonic()
    res: StepResult = await env.step(msg)
    b.turns.append(Turn(gen_start, len(b.response), len(b.response), text, completion.finish_reason,
                        res.tool_calls, res.tool_results, gen_seconds=gen_s, tool_seconds=time.monotonic() - t1))
    if res.done:
        return res.stop_reason or StopReason.ANSWERED, res.final_answer, ()
    return None, None, list(res.observations)


def _budget(b: _Builder, limits: TurnLimits) -> int:
    sampled = sum(b.mask)
    room = limits.max_context - len(b.prompt_ids) - len(b.response)
    return min(limits.max_new_tokens_per_turn, limits.max_new_tokens - sampled, room)


def _out_of_room(b: _Builder, limits: TurnLimits) -> StopReason:
    if limits.max_context - len(b.prompt_ids) - len(b.response) <= 0:
        return StopReason.CONTEXT_OVERFLOW
    return StopReason.MAX_TOKENS


def _ended_with_eos(b: _Builder, fmt: ChatFormat) -> bool:
    t = b.turns[-1]
    return t.finish_reason == "eos" and b.response[t.gen_end - 1] == fmt.eos_token_id


def _with_obs_end(turn: Turn, obs_end: int) -> Turn:
    return replace(turn, obs_end=obs_end)
