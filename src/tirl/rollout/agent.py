"""The multi-turn agent loop: generate, let the env react (run tools), append, repeat.

A trajectory in progress is an `Episode`; `advance` plays one turn of it (generation, then the env's
reaction). `run_trajectory` plays an episode to its end; rollout strategies (`tirl.rollout.strategies`)
drive episodes turn by turn instead, so that they can fork them (`fork`: tree and entropy-guided
branching) or start them from another trajectory's prefix (`start_episode(prefix=...)`: fission).

Token bookkeeping follows DESIGN.md invariants 1 and 2: sampled tokens are appended exactly as the
backend returned them (mask 1, with their sampling log-probs), observation tokens come from the chat
format (mask 0, log-prob 0), and nothing is re-tokenised. An observation that would overflow the
context is shortened (head, tail or middle of its text, with a marker), never dropped silently.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Literal

from tirl.backends.base import Completion, GenerationRequest, Generator, SamplingParams, derive_seed
from tirl.chat.format import ChatFormat
from tirl.envs.base import Env, StepResult
from tirl.rollout.checks import check_trajectory
from tirl.rollout.watchdog import Progress
from tirl.types import Message, StopReason, Trajectory, TrajectoryMeta, Turn

Truncation = Literal["head", "tail", "middle"]


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
    observation_truncation: Truncation = "middle"
    """Which part of a tool output to keep when it must be shortened to fit the context."""
    min_generation_room: int = 16
    """An observation is shortened so that at least this many tokens remain for the next turn."""
    deadline: float | None = None
    """Monotonic-clock time after which no new turn starts (the rollout step's own budget)."""


@dataclass
class Episode:
    """A trajectory in progress: its env, its tokens so far, and where it stands."""

    env: Env
    meta: TrajectoryMeta
    seed: int
    key: tuple
    prompt_ids: list[int]
    messages: list[Message]
    response: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    entropies: list[tuple[float, ...]] = field(default_factory=list)
    """Per turn, the entropies of its sampled positions (only when asked for)."""
    replay: list[Message] = field(default_factory=list)
    """Assistant messages that bring a fresh env to this episode's state (see `fork`)."""
    turn_offset: int = 0
    """Turns already played before this episode's prompt (fission prefixes count against max_turns)."""
    stop: StopReason | None = None
    answer: str | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.stop is not None

    @property
    def t(self) -> int:
        """Index of the next turn (turns played, prefix included)."""
        return self.turn_offset + len(self.turns)

    def add_sampled(self, c: Completion) -> None:
        self.response += c.token_ids
        self.mask += [1] * len(c.token_ids)
        self.logprobs += c.logprobs

    def add_inserted(self, ids: list[int]) -> None:
        self.response += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)


@dataclass(frozen=True)
class Prefix:
    """Where a new episode starts: another trajectory's first turns, all of it prompt (mask 0)."""

    prompt_ids: tuple[int, ...]
    """The original prompt plus the prefix's response tokens (observations included)."""
    messages: tuple[Message, ...]
    """The conversation up to the end of the prefix."""
    replay: tuple[Message, ...]
    """The prefix's assistant messages, replayed into a fresh env to restore its state."""
    turns: int
    """Turns the prefix played."""


def prefix_of(traj: Trajectory, turns: int, fmt: ChatFormat,
              last_observations: tuple[Message, ...] | None = None) -> Prefix:
    """The first `turns` turns of `traj`, with their observations, as a `Prefix`.

    `last_observations` replaces the observations after the last of those turns (fission puts a
    diagnosis into the failed call's error message this way); they are rendered with `fmt`.
    """
    if not 0 < turns <= len(traj.turns):
        raise ValueError(f"prefix of {turns} turns from a trajectory of {len(traj.turns)}")
    last = traj.turns[turns - 1]
    first_assistant = next(i for i, m in enumerate(traj.messages) if m.role == "assistant")
    messages, replay = list(traj.messages[:first_assistant]), []
    for m in traj.messages[first_assistant:]:
        if m.role == "assistant":
            if len(replay) == turns:
                break
            replay.append(m)
        messages.append(m)
    if last_observations is None:
        ids = list(traj.prompt_ids) + list(traj.response_ids[:last.obs_end])
    else:
        eos = last.finish_reason == "eos" and traj.response_ids[last.gen_end - 1] == fmt.eos_token_id
        ids = (list(traj.prompt_ids) + list(traj.response_ids[:last.gen_end])
               + fmt.observation_ids(list(last_observations), sampled_eos=eos))
        while messages and messages[-1].role != "assistant":
            messages.pop()
        messages += last_observations
    return Prefix(tuple(ids), tuple(messages), tuple(replay), turns)


async def start_episode(env: Env, fmt: ChatFormat, meta: TrajectoryMeta, seed: int, key: tuple = (),
                        prefix: Prefix | None = None) -> Episode:
    """Reset `env` (and replay `prefix` into it) and return the episode, ready for its first turn."""
    messages = await env.reset()
    if prefix is None:
        return Episode(env, meta, seed, key, fmt.prompt_ids(messages, env.tool_schemas or None), list(messages))
    for m in prefix.replay:
        await env.step(m)
    return Episode(env, meta, seed, key, list(prefix.prompt_ids), list(prefix.messages), replay=list(prefix.replay),
                   turn_offset=prefix.turns)


async def fork(ep: Episode, env: Env, meta: TrajectoryMeta, seed: int, key: tuple) -> Episode:
    """A copy of `ep` that continues on its own (own env, restored by replaying ep's assistant turns)."""
    await env.reset()
    for m in ep.replay:
        await env.step(m)
    return Episode(env, meta, seed, key, list(ep.prompt_ids), list(ep.messages), list(ep.response), list(ep.mask),
                   list(ep.logprobs), list(ep.turns), list(ep.entropies), list(ep.replay), ep.turn_offset,
                   started=ep.started)


async def run_trajectory(env: Env, backend: Generator, fmt: ChatFormat, sampling: SamplingParams,
                         limits: TurnLimits, meta: TrajectoryMeta, seed: int, key: tuple = (),
                         check: bool = True, progress: Progress | None = None,
                         prefix: Prefix | None = None) -> Trajectory:
    """Roll out one episode of `env` and return its trajectory (reward not yet set).

    An exception in the env or the backend does not propagate: the trajectory comes back with stop
    reason `error`, its turns so far and the error in `meta.error` (see `is_failed`).
    """
    progress = progress or Progress()
    async with backend.participant():
        ep = None
        try:
            ep = await start_episode(env, fmt, meta, seed, key, prefix)
            while not ep.done:
                await advance(ep, backend, fmt, sampling, limits, progress)
        except Exception as e:  # noqa: BLE001 - recorded on the trajectory, counted by the caller
            ep = ep or Episode(env, meta, seed, key, [], [])
            record_error(ep, e)
        finally:
            progress.done(key)
            await env.close()
    return finish(ep, fmt, check)


async def play_turn(ep: Episode, backend: Generator, fmt: ChatFormat, sampling: SamplingParams,
                    limits: TurnLimits, progress: Progress, want_entropies: bool = False) -> None:
    """`advance` under `backend.participant()`, held for this turn only; an exception in the env or
    the backend is recorded on `ep` (failed, see `record_error`) instead of propagating."""
    try:
        async with backend.participant():
            await advance(ep, backend, fmt, sampling, limits, progress, want_entropies)
    except Exception as e:  # noqa: BLE001 - recorded on the trajectory, counted by the caller
        record_error(ep, e)


async def advance(ep: Episode, backend: Generator, fmt: ChatFormat, sampling: SamplingParams,
                  limits: TurnLimits, progress: Progress, want_entropies: bool = False) -> None:
    """Play one turn of `ep`: check budgets, generate, let the env react, append the observations."""
    stop = _stop_before_turn(ep, limits)
    if stop is not None:
        ep.stop = stop
        return
    t = ep.t
    request = GenerationRequest(
        prompt_ids=tuple(ep.prompt_ids + ep.response), max_new_tokens=_budget(ep, limits),
        stop_strings=ep.env.stop_strings or (fmt.tool_call_stop,), sampling=sampling,
        seed=derive_seed(ep.seed, "turn", t), key=(*ep.key, t), messages=tuple(ep.messages),
        tools=tuple(ep.env.tool_schemas), want_entropies=want_entropies)
    progress.mark(ep.key, f"generating turn {t}")
    t0 = time.monotonic()
    completion = await backend.generate(request)
    gen_s = time.monotonic() - t0
    gen_start = len(ep.response)
    ep.add_sampled(completion)
    ep.entropies.append(completion.entropies)
    ids = completion.token_ids
    text = fmt.decode(ids[:-1] if completion.finish_reason == "eos" else ids)
    msg = Message("assistant", text)
    ep.messages.append(msg)
    if completion.finish_reason == "length":
        ep.turns.append(Turn(gen_start, len(ep.response), len(ep.response), text, "length", gen_seconds=gen_s))
        ep.stop = StopReason.MAX_TOKENS
        return
    progress.mark(ep.key, f"env step after turn {t}", ep.env.activity)
    t1 = time.monotonic()
    res: StepResult = await ep.env.step(msg)
    ep.replay.append(msg)
    ep.turns.append(Turn(gen_start, len(ep.response), len(ep.response), text, completion.finish_reason,
                         res.tool_calls, res.tool_results, gen_seconds=gen_s, tool_seconds=time.monotonic() - t1))
    if res.done:
        ep.stop, ep.answer = res.stop_reason or StopReason.ANSWERED, res.final_answer
    elif ep.t >= limits.max_turns:
        ep.stop = StopReason.MAX_TURNS
    else:
        _insert_observations(ep, fmt, list(res.observations), limits)


def _stop_before_turn(ep: Episode, limits: TurnLimits) -> StopReason | None:
    if ep.t >= limits.max_turns:
        return StopReason.MAX_TURNS
    if limits.max_context - len(ep.prompt_ids) - len(ep.response) <= 0:
        return StopReason.CONTEXT_OVERFLOW
    if _budget(ep, limits) <= 0:
        return StopReason.MAX_TOKENS
    now = time.monotonic()
    if limits.timeout_s is not None and now - ep.started > limits.timeout_s:
        return StopReason.TIMEOUT
    if limits.deadline is not None and now > limits.deadline:
        return StopReason.TIMEOUT
    return None


def _insert_observations(ep: Episode, fmt: ChatFormat, observations: list[Message], limits: TurnLimits) -> None:
    eos = _ended_with_eos(ep, fmt)
    room = limits.max_context - len(ep.prompt_ids) - len(ep.response) - limits.min_generation_room
    ids = fmt.observation_ids(observations, sampled_eos=eos)
    if len(ids) > room:
        observations, ids = fit_observations(fmt, observations, eos, room, limits.observation_truncation)
        if ids is None:
            ep.stop = StopReason.CONTEXT_OVERFLOW
            return
    ep.add_inserted(ids)
    ep.turns[-1] = replace(ep.turns[-1], obs_end=len(ep.response))
    ep.messages += observations


def fit_observations(fmt: ChatFormat, observations: list[Message], sampled_eos: bool, room: int,
                     mode: Truncation) -> tuple[list[Message], list[int] | None]:
    """Shorten the observations' texts (each keeps the same share) until they render in `room` tokens.

    Each shortened text keeps its head, tail or both ends around a marker that says how much was cut.
    Returns the new messages and their token ids, or ids None when even empty texts do not fit.
    """
    def render(keep: float) -> tuple[list[Message], list[int]]:
        msgs = [replace(m, content=cut_text(m.content, int(len(m.content) * keep), mode)) for m in observations]
        return msgs, fmt.observation_ids(msgs, sampled_eos=sampled_eos)

    msgs, ids = render(0.0)
    if len(ids) > room:
        return observations, None
    lo, hi = 0.0, 1.0
    for _ in range(14):  # binary search on the kept share: ~1e-4 resolution
        mid = (lo + hi) / 2
        m, i = render(mid)
        if len(i) <= room:
            lo, msgs, ids = mid, m, i
        else:
            hi = mid
    return msgs, ids


def cut_text(text: str, keep: int, mode: Truncation) -> str:
    """`text` shortened to about `keep` characters around a marker (unchanged if it already fits)."""
    if keep >= len(text):
        return text
    marker = f"...[{len(text) - keep} characters cut to fit the context]..."
    if mode == "head":
        return text[:keep] + marker
    if mode == "tail":
        return marker + text[len(text) - keep:]
    head = keep // 2
    return text[:head] + marker + text[len(text) - (keep - head):]


def record_error(ep: Episode, e: BaseException) -> None:
    """Mark `ep` failed: keep its complete turns only, and the error with where it happened."""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    loc = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else ""
    ep.error = f"{type(e).__name__}: {e}{loc}"
    end = ep.turns[-1].obs_end if ep.turns else 0
    del ep.response[end:], ep.mask[end:], ep.logprobs[end:]
    ep.stop = StopReason.ERROR


def finish(ep: Episode, fmt: ChatFormat, check: bool = True) -> Trajectory:
    """The episode as a `Trajectory` (runtime invariant checks unless `check` is off)."""
    meta = replace(ep.meta, error=ep.error) if ep.error else ep.meta
    traj = Trajectory(
        prompt_ids=tuple(ep.prompt_ids), response_ids=tuple(ep.response), loss_mask=tuple(ep.mask),
        logprobs=tuple(ep.logprobs), turns=tuple(ep.turns), messages=tuple(ep.messages),
        stop_reason=ep.stop or StopReason.MAX_TURNS, meta=meta, final_answer=ep.answer)
    if check and ep.error is None:
        check_trajectory(traj, fmt)
    return traj


def is_failed(traj: Trajectory) -> bool:
    """True for a trajectory whose env or backend raised: recorded, never trained on."""
    return traj.stop_reason == StopReason.ERROR


def _budget(ep: Episode, limits: TurnLimits) -> int:
    sampled = sum(ep.mask)
    room = limits.max_context - len(ep.prompt_ids) - len(ep.response)
    return min(limits.max_new_tokens_per_turn, limits.max_new_tokens - sampled, room)


def _ended_with_eos(ep: Episode, fmt: ChatFormat) -> bool:
    t = ep.turns[-1]
    return t.finish_reason == "eos" and ep.response[t.gen_end - 1] == fmt.eos_token_id
