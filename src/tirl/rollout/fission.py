"""Fission-GRPO (reference 4.2): recovery groups sampled from the point where a tool call failed.

Each step first runs `flat` (G samples per problem). Every trajectory of those groups whose tool call
ended with one of the configured error statuses (`statuses`: by default execution_error, timeout and
validation_error) at turn k gives a corrective context: [prompt; turns 0..k-1; the failed call; its
error message]. Only real tool errors count: a wrong final answer without a tool error gives nothing,
nor does a failed rollout (its env or backend raised: it is never in a group), nor a status that is
not configured (e.g. `invalid_call`, broken JSON, unless listed).

Contexts go onto a LIFO buffer (newest on top, at most `buffer_size` kept). Each step pops up to
`max_groups` of them and samples `group_size` (G') recovery rollouts from each, on-policy, through
the same backend. The context is the recovery rollout's prompt: its tokens are in `prompt_ids`, so
the loss mask never covers them. Each recovery group is scored with the task's reward and returned
as a group of its own after the flat groups, so GRPO normalises advantages inside it. Recovery
trajectories carry `meta.origin` naming the failed trajectory and turn.

Where this departs from the paper, on purpose:
- One update per step: flat and recovery groups are trained together, where the paper updates on
  the flat groups and then on the recovery groups (two optimizer steps).
- Feedback is the tool's own error message. With `judge="policy"` the policy itself (same backend,
  same sampling) also writes a short diagnosis of the failed call from a diagnostic prompt, appended
  to the error message; with `judge="server"` a judge model on an OpenAI-compatible server writes it
  (chat completions, same prompt); the paper uses a fine-tuned Error Simulator (serve one and point
  `judge_base_url` at it). A diagnosis that contains the gold answer is thrown away (the plain error
  is used) and counted in `fission/judge_leaks`.
- The reward is the task's own (no format/correctness weight schedule).
- One context per trajectory: its first configured error, if the episode went on after it (the tool's
  observations were inserted); an error in the last turn leaves no turn to recover in. Recovery
  rollouts are not intercepted themselves (no fission of fission).
- A step's contexts are pushed so that the newest (popped first) take one context from each group
  before a second one from any group: the recovery groups span as many problems as possible.

Metrics: `fission/contexts` (pushed this step), `fission/groups` (recovery groups sampled),
`fission/buffer` (contexts left after popping), `fission/recovery_rate` (share of recovery rollouts
whose first turn makes a tool call that runs ok), `fission/recovery_correct` (share that end
correct), `fission/recovery_reward` (their mean reward).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tirl.backends.base import GenerationRequest
from tirl.rollout.agent import is_failed, prefix_of
from tirl.rollout.groups import STRATEGIES, Flat, RolloutContext, StrategyOutput
from tirl.rollout.io import from_dict, to_dict
from tirl.tasks.base import Problem
from tirl.types import Message, ToolCall, ToolStatus, Trajectory, TrajectoryGroup

DEFAULT_STATUSES = ("execution_error", "timeout", "validation_error")
"""Tool statuses that count as an execution error unless configured otherwise."""
ERROR_STATUSES = ("invalid_call", "unknown_tool", "validation_error", "execution_error", "timeout")
"""Statuses that may be configured: errors after which the episode goes on (`budget_exceeded` ends it)."""
JUDGES = ("none", "policy", "server")
"""Who writes a diagnosis of the failed call: nobody (the tool's error only), the policy itself, or a
judge model on an OpenAI-compatible server."""

JUDGE_SYSTEM = ("You review a failed tool call. Given a task, the assistant's message with the failed call and "
                "the error it got, say in one or two sentences what was wrong with the call and how to fix it. "
                "Do not solve the task and do not state its answer.")


@dataclass(frozen=True)
class ErrorContext:
    """A corrective context: the problem, the trajectory whose tool call failed, and the failed turn."""

    problem: Problem
    """The problem the trajectory answers (recovery rollouts run in a fresh env of it)."""
    trajectory: Trajectory
    """The flat trajectory that hit the error."""
    turn: int
    """k: index in `trajectory.turns` of the turn whose call failed; the context ends after its observations."""

    @property
    def origin(self) -> str:
        """`meta.origin` of the recovery rollouts: which trajectory and turn they continue."""
        m = self.trajectory.meta
        return f"fission:step={m.step},group={m.group_id},sample={m.sample_index},turn={self.turn}"


@STRATEGIES.register("fission")
class Fission:
    """Flat groups plus recovery groups sampled from the newest tool-error contexts (a LIFO buffer)."""

    def __init__(self, group_size: int | None = None, max_groups: int | None = None,
                 statuses: Iterable[str] = DEFAULT_STATUSES, buffer_size: int | None = None,
                 judge: str = "none", judge_max_tokens: int = 64, judge_base_url: str | None = None,
                 judge_model: str | None = None, judge_api_key_env: str = "OPENAI_API_KEY"):
        """`group_size` defaults to `rollout.group_size`, `max_groups` to the step's number of problems,
        `buffer_size` to `max_groups` (all resolved when a step runs). `judge="server"` asks the model
        `judge_model` at `judge_base_url` (chat completions) for the diagnosis."""
        statuses = tuple(statuses)
        bad = [s for s in statuses if s not in ERROR_STATUSES]
        if bad:
            raise ValueError(f"statuses: {bad} are not tool error statuses; choose from {list(ERROR_STATUSES)}")
        if not statuses:
            raise ValueError("statuses is empty: no tool error would ever start a recovery group")
        if judge not in JUDGES:
            raise ValueError(f"judge: {judge!r} is not one of {list(JUDGES)}")
        for name, value, least in (("group_size", group_size, 2), ("max_groups", max_groups, 1),
                                   ("buffer_size", buffer_size, 1), ("judge_max_tokens", judge_max_tokens, 1)):
            if value is not None and value < least:
                raise ValueError(f"{name}={value}: must be at least {least}")
        self.group_size, self.max_groups, self.buffer_size = group_size, max_groups, buffer_size
        self.statuses = frozenset(ToolStatus(s) for s in statuses)
        if judge == "server" and not judge_base_url:
            raise ValueError("judge=server needs judge_base_url (the judge server's /v1 URL)")
        if judge == "server" and importlib.util.find_spec("openai") is None:
            raise ValueError("judge=server needs the openai package: pip install 'tirl[openai]'")
        self.judge, self.judge_max_tokens = judge, judge_max_tokens
        self.judge_server = (judge_base_url, judge_model, judge_api_key_env)
        self._judge_backend = None
        self.buffer: list[dict[str, Any]] = []
        """Serialised `ErrorContext`s, oldest first (the top of the stack is the end)."""

    async def __call__(self, problems: Sequence[Problem], ctx: RolloutContext) -> StrategyOutput:
        out = await Flat()(problems, ctx)
        max_groups = self.max_groups or len(problems)
        found = intercept(out.groups, problems, self.statuses)
        self.push(found, self.buffer_size or max_groups)
        contexts = self.pop(max_groups)
        groups, failed, metrics = await self._recover(contexts, ctx)
        out.groups += groups
        out.failed += failed
        out.metrics.update(metrics)
        out.metrics.update({"fission/contexts": float(len(found)), "fission/groups": float(len(groups)),
                            "fission/buffer": float(len(self.buffer))})
        return out

    def push(self, contexts: Sequence[ErrorContext], buffer_size: int) -> None:
        """Push `contexts` in order (the last one ends on top); keep the newest `buffer_size`."""
        keep = list(contexts)[-buffer_size:]
        self.buffer = (self.buffer + [context_to_dict(c) for c in keep])[-buffer_size:]

    def pop(self, n: int) -> list[ErrorContext]:
        """The newest `n` contexts, newest first, taken off the buffer."""
        split = len(self.buffer) - min(n, len(self.buffer))
        taken, self.buffer = self.buffer[split:][::-1], self.buffer[:split]
        return [context_from_dict(d) for d in taken]

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = list(state.get("buffer", []))

    async def _recover(self, contexts: Sequence[ErrorContext], ctx: RolloutContext
                       ) -> tuple[list[TrajectoryGroup], list[Trajectory], dict[str, float]]:
        """G' rollouts from each context, scored per context."""
        G = self.group_size or ctx.spec.group_size
        feedback = await asyncio.gather(*(self._feedback(c, ci, ctx) for ci, c in enumerate(contexts)))
        coros = []
        for ci, (c, (observations, _)) in enumerate(zip(contexts, feedback)):
            prefix = prefix_of(c.trajectory, c.turn + 1, ctx.fmt, last_observations=observations)
            coros += [ctx.sample(c.problem, f"{ctx.step}-f{ci}", si, key=("fission", ci, si), prefix=prefix,
                                 origin=c.origin) for si in range(G)]
        trajs = await asyncio.gather(*coros)
        groups, failed = [], []
        for ci, c in enumerate(contexts):
            mine = trajs[ci * G:(ci + 1) * G]
            failed += [t for t in mine if is_failed(t)]
            ok = [t for t in mine if not is_failed(t)]
            if ok:
                groups.append(await ctx.score(ok, c.problem, f"{ctx.step}-f{ci}"))
        metrics = recovery_metrics([t for g in groups for t in g.trajectories])
        if self.judge != "none":
            metrics["fission/judge_leaks"] = float(sum(leaked for _, leaked in feedback))
        return groups, failed, metrics

    async def _feedback(self, c: ErrorContext, ci: int, ctx: RolloutContext
                        ) -> tuple[tuple[Message, ...] | None, bool]:
        """The observations the recovery rollouts see after the failed call (None: the original ones),
        and whether a diagnosis was thrown away for containing the answer."""
        if self.judge == "none":
            return None, False
        diagnosis = await policy_diagnosis(c, self.statuses, ctx, self.judge_max_tokens, key=("fission-judge", ci),
                                           backend=self._judge(ctx) if self.judge == "server" else None)
        if not diagnosis or leaks_answer(diagnosis, c.problem.answer):
            return None, bool(diagnosis)
        return with_diagnosis(c, self.statuses, diagnosis), False


    def _judge(self, ctx: RolloutContext):
        """The judge server's backend (chat completions), made on first use."""
        if self._judge_backend is None:
            import os

            from tirl.backends.openai import OpenAIBackend

            base_url, model, key_env = self.judge_server
            eos = ctx.fmt.eos_token_id
            self._judge_backend = OpenAIBackend(base_url, ctx.fmt.tokenizer, [eos], eos, model=model, endpoint="chat",
                                                api_key=os.environ.get(key_env))
        return self._judge_backend


def first_error_turn(traj: Trajectory, statuses: frozenset[ToolStatus]) -> int | None:
    """Index of the first turn with a tool result in `statuses`, if the episode went on after it."""
    for k, turn in enumerate(traj.turns):
        if any(r.status in statuses for r in turn.tool_results):
            return k if turn.obs_end > turn.gen_end else None
    return None


def intercept(groups: Sequence[TrajectoryGroup], problems: Sequence[Problem],
              statuses: frozenset[ToolStatus]) -> list[ErrorContext]:
    """The contexts of a step's groups in push order: the last round holds each group's first error, so
    the newest contexts (popped first) come from as many groups as possible."""
    by_id = {p.id: p for p in problems}
    per_group = []
    for g in groups:
        found = [(t, first_error_turn(t, statuses)) for t in g.trajectories]
        per_group.append([ErrorContext(by_id[g.task_id], t, k) for t, k in found if k is not None])
    rounds = list(itertools.zip_longest(*per_group))
    return [c for row in reversed(rounds) for c in row if c is not None]


def recovery_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Error recovery of the recovery rollouts (empty when there are none)."""
    if not trajs:
        return {}
    recovered = sum(1 for t in trajs if t.turns and t.turns[0].tool_results
                    and all(r.ok for r in t.turns[0].tool_results))
    return {"fission/recovery_rate": recovered / len(trajs),
            "fission/recovery_correct": sum(1 for t in trajs if t.correct) / len(trajs),
            "fission/recovery_reward": sum(t.reward for t in trajs) / len(trajs)}


# ----------------------------------------------------------------------------- judge


async def policy_diagnosis(c: ErrorContext, statuses: frozenset[ToolStatus], ctx: RolloutContext,
                           max_tokens: int, key: tuple, backend=None) -> str:
    """A short diagnosis of the failed call, written by the policy through `ctx.backend` (or by the
    judge model behind `backend`)."""
    turn = c.trajectory.turns[c.turn]
    errors = "\n".join(r.content for r in turn.tool_results if r.status in statuses)
    messages = [Message("system", JUDGE_SYSTEM),
                Message("user", f"Task:\n{c.problem.question}\n\nAssistant message:\n{turn.text}\n\nError:\n{errors}")]
    request = GenerationRequest(prompt_ids=tuple(ctx.fmt.prompt_ids(messages, None)), max_new_tokens=max_tokens,
                                sampling=ctx.spec.sampling, seed=ctx.seed_for(key), key=key, messages=tuple(messages))
    backend = backend or ctx.backend
    async with backend.participant():
        ctx.progress.mark(key, "writing a fission diagnosis")
        try:
            completion = await backend.generate(request)
        finally:
            ctx.progress.done(key)
    ids = completion.token_ids
    if completion.finish_reason == "eos" and ids and ids[-1] == ctx.fmt.eos_token_id:
        ids = ids[:-1]
    return ctx.fmt.decode(ids).strip()


def leaks_answer(text: str, answer: str) -> bool:
    """True when `text` contains the gold answer as a standalone token (a conservative leak check)."""
    answer = answer.strip()
    return bool(answer) and re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w])", text) is not None


def with_diagnosis(c: ErrorContext, statuses: frozenset[ToolStatus], diagnosis: str) -> tuple[Message, ...]:
    """The observations that followed the failed turn, the first error message followed by the diagnosis."""
    observations = observations_after(c.trajectory, c.turn)
    failed_ids = {r.call_id for r in c.trajectory.turns[c.turn].tool_results if r.status in statuses}
    target = next((i for i, m in enumerate(observations) if m.tool_call_id in failed_ids), len(observations) - 1)
    out = list(observations)
    out[target] = dataclasses.replace(out[target], content=f"{out[target].content}\nDiagnosis: {diagnosis}")
    return tuple(out)


def observations_after(traj: Trajectory, turn: int) -> tuple[Message, ...]:
    """The messages the env inserted after assistant turn `turn` (as the model saw them)."""
    assistant = [i for i, m in enumerate(traj.messages) if m.role == "assistant"]
    start = assistant[turn] + 1
    end = assistant[turn + 1] if turn + 1 < len(assistant) else len(traj.messages)
    return tuple(traj.messages[start:end])


# ----------------------------------------------------------------------------- state


def context_to_dict(c: ErrorContext) -> dict[str, Any]:
    """A JSON-ready form of a context (what the buffer and the checkpoint hold)."""
    p = c.problem
    problem = {"id": p.id, "question": p.question, "answer": p.answer, "info": dict(p.info),
               "reference_calls": [{"id": t.id, "name": t.name, "arguments": t.arguments} for t in p.reference_calls]}
    # through JSON text, so that a context popped in this run equals one restored from a checkpoint
    return json.loads(json.dumps({"problem": problem, "trajectory": to_dict(c.trajectory), "turn": c.turn}))


def context_from_dict(d: dict[str, Any]) -> ErrorContext:
    """Inverse of `context_to_dict`."""
    p = d["problem"]
    calls = tuple(ToolCall(t["id"], t["name"], t["arguments"]) for t in p["reference_calls"])
    problem = Problem(id=p["id"], question=p["question"], answer=p["answer"], reference_calls=calls, info=p["info"])
    return ErrorContext(problem, from_dict(d["trajectory"]), d["turn"])
