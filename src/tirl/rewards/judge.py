"""LLM-judge rewards through any tirl backend: `judge_rubric` (RetouchIQ-style) and `cm2_checklist` (CM2).

A `Judge` renders chat messages with a tirl chat format and generates through a tirl backend: `hf`
(a model in-process, any name `model.name` accepts) or `openai` (an OpenAI-compatible server). The
judge is a reward parameter, e.g.

    task.reward_kwargs.judge: {backend: hf, model: "embedded:SmolLM2-135M-Instruct", max_new_tokens: 64}
    task.reward_kwargs.judge: {backend: openai, base_url: "http://127.0.0.1:8000/v1", model: "qwen3-4b"}

(keys: `JudgeConfig`), and is built once per distinct config for the run (`get_judge`;
`close_judges` releases them). The default temperature is 0 (greedy), so the same question gets the
same verdict. A `Judge` object (anything with `async ask(messages, key) -> str`) may be passed
instead of a config.

Failures: a judge answer that cannot be read (no score, a score out of range, a verdict missing) is
data, not a crash: the reward scores it as the reward says and counts it in the component
`judge_failed`, and the failure is logged. A judge that cannot be reached (transport error) raises.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tirl.backends.base import GenerationRequest, SamplingParams, derive_seed
from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.tasks.base import Problem
from tirl.types import Message, Trajectory, Turn

log = logging.getLogger("tirl.rewards.judge")


# ----------------------------------------------------------------------------- the judge


class JudgeConfig(BaseModel):
    """How to build a judge (the `judge` parameter of the judge rewards)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["hf", "openai"] = Field("hf", description="hf (in-process) or openai (a server).")
    model: str | None = Field(None, description="hf: a model name (default: the embedded default model); openai: "
                                                "the served name (default: the server's only model).")
    max_new_tokens: int = Field(256, ge=1, description="Tokens of one judge answer at most.")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy, so verdicts repeat.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, description="Seeds sampling when temperature > 0.")
    chat_template: str = Field("auto", description="Chat template of the judge's tokenizer (as model.chat_template).")
    device: str = Field("auto", description="hf: auto, cpu, cuda, cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="hf: weight dtype.")
    max_context: int | None = Field(None, ge=16, description="hf: cap on prompt + answer tokens.")
    max_batch_size: int = Field(32, ge=1, description="hf: judge prompts generated together.")
    base_url: str | None = Field(None, description="openai: the server's /v1 URL.")
    endpoint: Literal["chat", "completions", "auto"] = Field("chat", description="openai: chat renders with the "
                                                             "server's own template.")
    tokenizer: str | None = Field(None, description="openai: the model whose tokenizer and chat template speak to "
                                                    "the server (default: the embedded default model; with "
                                                    "endpoint=completions it must be the served model's).")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the key.")
    request_timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(3, ge=0)


class JudgeLike(Protocol):
    """What the judge rewards need: one answer per conversation."""

    async def ask(self, messages: Sequence[Message], key: tuple[str, ...] = ()) -> str: ...


class Judge:
    """A chat model asked for one answer at a time through a tirl backend (`generate`)."""

    def __init__(self, backend: Any, fmt: Any, max_new_tokens: int = 256,
                 sampling: SamplingParams = SamplingParams(temperature=0.0), seed: int = 0):
        """`backend`: a tirl generator; `fmt`: the `ChatFormat` of the judge model's tokenizer."""
        self.backend, self.fmt = backend, fmt
        self.max_new_tokens, self.sampling, self.seed = max_new_tokens, sampling, seed
        self.rubrics: dict[tuple[str, ...], str] = {}
        """Rubrics written for problems this run (see `judge_rubric`)."""

    async def ask(self, messages: Sequence[Message], key: tuple[str, ...] = ()) -> str:
        """The judge's answer to `messages` (end-of-turn token removed, stripped). `key` (strings)
        names the request: it seeds sampling and orders batches."""
        messages = tuple(messages)
        request = GenerationRequest(prompt_ids=tuple(self.fmt.prompt_ids(list(messages), None)),
                                    max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                                    seed=derive_seed(self.seed, *key), key=tuple(key), messages=messages)
        async with self.backend.participant():
            completion = await self.backend.generate(request)
        ids = completion.token_ids
        if completion.finish_reason == "eos" and ids:
            ids = ids[:-1]
        return self.fmt.decode(ids).strip()

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


_JUDGES: dict[str, Judge] = {}


def judge_config(config: Mapping[str, Any] | JudgeConfig) -> JudgeConfig:
    """A validated `JudgeConfig`; a bad key or value is a `ValueError` naming it."""
    if isinstance(config, JudgeConfig):
        return config
    if not isinstance(config, Mapping):
        raise ValueError(f"judge must be a mapping of judge settings, got {type(config).__name__}: {config!r}")
    try:
        cfg = JudgeConfig(**config)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"judge settings {dict(config)!r}: {errors}") from None
    if cfg.backend == "openai" and not cfg.base_url:
        raise ValueError("judge: backend=openai needs base_url (the server's /v1 URL)")
    return cfg


def get_judge(config: Mapping[str, Any] | JudgeConfig | JudgeLike | None, who: str = "judge") -> JudgeLike:
    """The judge for `config`, built on first use and kept for the run (one per distinct config);
    an object with `ask` is returned as it is."""
    if config is None:
        raise ValueError(f"{who} needs a `judge` parameter, e.g. {{backend: hf, model: 'embedded:SmolLM2-135M-"
                         "Instruct'}} or {backend: openai, base_url: ..., model: ...}")
    if hasattr(config, "ask"):
        return config  # type: ignore[return-value]
    cfg = judge_config(config)  # type: ignore[arg-type]
    key = cfg.model_dump_json()
    if key not in _JUDGES:
        _JUDGES[key] = build_judge(cfg)
    return _JUDGES[key]


def close_judges() -> None:
    """Release every judge built by `get_judge` (models, threads, connections)."""
    judges = list(_JUDGES.values())
    _JUDGES.clear()
    for judge in judges:
        judge.close()


def build_judge(cfg: JudgeConfig) -> Judge:
    """A judge over a fresh backend: hf loads the model (in the compute dtype, no kept caches), openai
    loads the tokenizer only."""
    from tirl.config import ModelConfig
    from tirl.models import loading
    from tirl.models.embedded import DEFAULT_MODEL
    from tirl.trainer.build import load_policy, max_context, pick_device, stop_ids

    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p)
    if cfg.backend == "openai":
        from tirl.backends.openai import OpenAIBackend

        policy = load_policy(ModelConfig(name=cfg.tokenizer or DEFAULT_MODEL, chat_template=cfg.chat_template),
                             "cpu", trainable=False, weights=False)
        backend = OpenAIBackend(cfg.base_url, policy.tokenizer, stop_ids(policy), policy.fmt.eos_token_id,
                                model=cfg.model, endpoint=cfg.endpoint, api_key=os.environ.get(cfg.api_key_env),
                                request_timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries)
        return Judge(backend, policy.fmt, cfg.max_new_tokens, sampling, cfg.seed)
    from tirl.backends.hf import HFBackend

    device = pick_device(cfg.device)
    model_cfg = ModelConfig(name=cfg.model or DEFAULT_MODEL, dtype=cfg.dtype, chat_template=cfg.chat_template,
                            max_context=cfg.max_context)
    policy = load_policy(model_cfg, device, trainable=False, weights=False)
    model = loading.load_causal_lm(policy.path, policy.compute_dtype, policy.attn_implementation, device)
    model.requires_grad_(False)
    backend = HFBackend(model, policy.tokenizer, stop_ids(policy), max_context(model_cfg, model),
                        cfg.max_batch_size, scheduling="async", keep_kv=False)
    return Judge(backend, policy.fmt, cfg.max_new_tokens, sampling, cfg.seed)


# ----------------------------------------------------------------------------- what the judge reads


def clip(text: str, max_chars: int) -> str:
    """`text` cut in the middle to at most about `max_chars` characters."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def transcript(question: str, turns: Sequence[Turn], max_chars: int = 4000) -> str:
    """The episode as text: the user's question, then each assistant turn and its tool results."""
    lines = [f"USER: {clip(question, max_chars)}"]
    for k, turn in enumerate(turns):
        lines.append(f"ASSISTANT (step {k + 1}): {clip(turn.text, max_chars)}")
        lines += [f"TOOL {r.name or '?'} ({r.status}): {clip(r.content, max_chars)}" for r in turn.tool_results]
    return "\n".join(lines)


def request_key(kind: str, problem: Problem, trajectory: Trajectory, *rest: object) -> tuple[str, ...]:
    """A judge request's key: what it judges, as strings (seeds its sampling)."""
    meta = trajectory.meta
    return (kind, problem.id, meta.group_id, str(meta.sample_index), *(str(r) for r in rest))


# ----------------------------------------------------------------------------- judge_rubric

RUBRIC_SYSTEM = (
    "You are an expert grader. Write a short grading rubric for the task below: 3 to 5 numbered, concrete "
    "criteria a correct and complete response must meet, specific to this task. Write only the rubric.")
SCORE_SYSTEM = (
    "You are an expert grader. Grade the response to the task strictly against the rubric. Think briefly, then "
    "end with a last line of the form 'Score: N', N an integer from 0 (fails every criterion) to 10 (meets all).")
_SCORE_RES = (re.compile(r"<score>\s*(-?\d+(?:\.\d+)?)\s*</score>", re.IGNORECASE),
              re.compile(r"score[\s*:=_]*(?:\(\s*0\s*-\s*10\s*\)[\s*:=_]*)?(-?\d+(?:\.\d+)?)", re.IGNORECASE))


def parse_score(text: str, max_score: float = 10.0) -> float | None:
    """The last score in a judge answer (`<score>N</score>`, else 'Score: N', also 'N/10'), if it lies in
    [0, max_score]; None when there is none or it is out of range."""
    for pattern in _SCORE_RES:
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            return value if 0 <= value <= max_score else None
    return None


def rubric_messages(problem: Problem, with_reference: bool) -> list[Message]:
    task = f"Task:\n{problem.question}"
    if with_reference and problem.answer:
        task += f"\n\nReference answer:\n{problem.answer}"
    return [Message("system", RUBRIC_SYSTEM), Message("user", task)]


def score_messages(problem: Problem, rubric: str, response: str) -> list[Message]:
    return [Message("system", SCORE_SYSTEM),
            Message("user", f"Task:\n{problem.question}\n\nRubric:\n{rubric}\n\nResponse:\n{response}")]


async def rubric_for(judge: JudgeLike, problem: Problem, with_reference: bool) -> str:
    """The judge's rubric for `problem`: written once per problem and judge for the run (kept on the judge
    when it has a `rubrics` cache), so every sample of a group is graded against the same rubric. An empty
    rubric is returned, not kept."""
    cache: dict | None = getattr(judge, "rubrics", None)
    key = (problem.id, problem.question, problem.answer if with_reference else "")
    if cache is not None and key in cache:
        return cache[key]
    rubric = await judge.ask(rubric_messages(problem, with_reference), ("rubric", problem.id))
    if rubric and cache is not None:
        cache[key] = rubric
    return rubric


def _failed(why: str, problem: Problem, raw: str) -> RewardResult:
    log.warning("judge_rubric: %s for problem %r (judge wrote %r); reward 0", why, problem.id, raw[:200])
    return RewardResult(0.0, {"score": 0.0, "judge_failed": 1.0, "no_answer": 0.0}, None)


@REWARDS.register("judge_rubric")
async def judge_rubric(trajectory: Trajectory, problem: Problem, group: GroupContext, *, judge: Any = None,
                       view: str = "answer", with_reference: bool = True, max_score: float = 10.0,
                       correct_threshold: float | None = None, max_chars: int = 4000) -> RewardResult:
    """RetouchIQ-style generalist judge: the judge writes a rubric for the problem, then scores the answer 0-10 -> R in [0, 1].

    `view`: answer (the final message) or transcript (question, turns, tool results). `with_reference`:
    the rubric writer sees the gold answer. Malformed judge output (empty rubric, no score in
    [0, max_score]): R = 0, component `judge_failed` = 1. No final answer (view=answer): R = 0,
    `no_answer` = 1, no judge call. `correct` = R >= `correct_threshold` when one is given.
    """
    if view not in ("answer", "transcript"):
        raise ValueError(f"judge_rubric: view must be 'answer' or 'transcript', got {view!r}")
    if not max_score > 0:
        raise ValueError(f"judge_rubric: max_score must be > 0, got {max_score}")
    the_judge = get_judge(judge, "judge_rubric")
    if view == "answer" and trajectory.final_answer is None:
        correct = False if correct_threshold is not None else None
        return RewardResult(0.0, {"score": 0.0, "judge_failed": 0.0, "no_answer": 1.0}, correct)
    response = (clip(trajectory.final_answer or "", max_chars) if view == "answer"
                else transcript(problem.question, trajectory.turns, max_chars))
    rubric = await rubric_for(the_judge, problem, with_reference)
    if not rubric:
        return _failed("the rubric came back empty", problem, rubric)
    raw = await the_judge.ask(score_messages(problem, rubric, response), request_key("score", problem, trajectory))
    value = parse_score(raw, max_score)
    if value is None:
        return _failed(f"no score in [0, {max_score:g}]", problem, raw)
    total = value / max_score
    correct = total >= correct_threshold if correct_threshold is not None else None
    return RewardResult(total, {"score": total, "judge_failed": 0.0, "no_answer": 0.0}, correct)


# ----------------------------------------------------------------------------- cm2_checklist

CHECKLIST_SYSTEM = (
    "You check an AI assistant's work against a checklist. For each numbered criterion, decide whether the "
    "conversation so far satisfies it. Answer with one line per criterion, '<number>: yes' or '<number>: no', "
    "and nothing else.")
_VERDICT_RE = re.compile(r"(?im)^[\W_]*(?:criterion\s*)?(\d+)[\s*_]*[:.)\-]+[\s*_]*(yes|no|true|false)\b")


@dataclass(frozen=True)
class Criterion:
    """One checklist item."""

    description: str
    weight: float
    """Its share of the reward: its weight normalised within its checklist, divided by #checklists and
    max_turns."""
    evidence: str = ""
    focus_on: str = ""


def parse_checklists(raw: Any, problem_id: str, max_turns: int) -> list[Criterion]:
    """The criteria of `problem.info["checklist"]`, a checklist (a list of criteria) or a list of them.

    A criterion is a string or a mapping with `description` and optional `weight` (default 1),
    `evidence`, `focus_on` (`required_for_next_turn` is accepted and has no effect: an episode has one
    user turn). Weights are normalised to sum to 1 per checklist, then divided by the number of
    checklists and by `max_turns`.
    """
    where = f"problem {problem_id!r}: info['checklist']"
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise ValueError(f"{where} must be a non-empty list of criteria (or of checklists), got {raw!r}")
    lists = raw if all(isinstance(c, Sequence) and not isinstance(c, str) for c in raw) else [raw]
    out: list[Criterion] = []
    for checklist in lists:
        items = [_criterion(item, where) for item in checklist]
        norm = sum(w for _, w, _, _ in items)
        if not items or norm <= 0:
            raise ValueError(f"{where}: each checklist needs criteria with a positive total weight, got {checklist!r}")
        out += [Criterion(d, w / norm / len(lists) / max_turns, e, f) for d, w, e, f in items]
    return out


def _criterion(item: Any, where: str) -> tuple[str, float, str, str]:
    if isinstance(item, str):
        item = {"description": item}
    allowed = {"description", "weight", "evidence", "focus_on", "required_for_next_turn"}
    if not isinstance(item, Mapping) or not isinstance(item.get("description"), str) or set(item) - allowed:
        raise ValueError(f"{where}: a criterion must be a string or a mapping with 'description' and optional "
                         f"{sorted(allowed - {'description'})}, got {item!r}")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}: criterion {item['description']!r} has weight {weight!r}; weights are numbers >= 0")
    return item["description"], float(weight), str(item.get("evidence", "")), str(item.get("focus_on", ""))


def checklist_messages(conversation: str, criteria: Sequence[tuple[int, Criterion]]) -> list[Message]:
    lines = []
    for number, c in criteria:
        extra = "; ".join(x for x in (f"evidence: {c.evidence}" if c.evidence else "",
                                      f"focus on: {c.focus_on}" if c.focus_on else "") if x)
        lines.append(f"{number}. {c.description}" + (f" ({extra})" if extra else ""))
    return [Message("system", CHECKLIST_SYSTEM),
            Message("user", f"Conversation:\n{conversation}\n\nCriteria:\n" + "\n".join(lines))]


def parse_verdicts(text: str, numbers: Sequence[int]) -> dict[int, bool] | None:
    """`{number: satisfied}` for every asked number (the last line about a number wins); None when one is
    missing."""
    found = {int(n): v.lower() in ("yes", "true") for n, v in _VERDICT_RE.findall(text)}
    return {n: found[n] for n in numbers} if all(n in found for n in numbers) else None


async def first_satisfied(judge: JudgeLike, trajectory: Trajectory, problem: Problem, criteria: Sequence[Criterion],
                          max_chars: int) -> tuple[list[int | None], bool]:
    """For each criterion, the turn at which the judge first found it satisfied (None: never), and whether
    a judge answer could not be read (judging then stops; earlier credit stands)."""
    first: list[int | None] = [None] * len(criteria)
    for k in range(len(trajectory.turns)):
        pending = [(i + 1, c) for i, c in enumerate(criteria) if first[i] is None]
        if not pending:
            break
        conversation = transcript(problem.question, trajectory.turns[:k + 1], max_chars)
        raw = await judge.ask(checklist_messages(conversation, pending), request_key("cm2", problem, trajectory, k))
        verdicts = parse_verdicts(raw, [n for n, _ in pending])
        if verdicts is None:
            log.warning("cm2_checklist: unreadable verdicts for problem %r at step %d (judge wrote %r); judging "
                        "stops there", problem.id, k, raw[:200])
            return first, True
        for n, ok in verdicts.items():
            if ok:
                first[n - 1] = k
    return first, False


@REWARDS.register("cm2_checklist")
async def cm2_checklist(trajectory: Trajectory, problem: Problem, group: GroupContext, *, judge: Any = None,
                        reward_level: str = "turn", max_turns: int = 1, checklist_key: str = "checklist",
                        max_chars: int = 4000) -> RewardResult:
    """CM2 checklist reward: sum of normalised weights of criteria the judge finds met, / #checklists / max_turns.

    Criteria come from `problem.info[checklist_key]`; the judge checks the pending ones after each
    assistant turn, and a criterion counts at its first satisfied turn. `reward_level`: turn (the score
    on the last turn) or step (each criterion's credit on the turn that first satisfied it); both via
    turn rewards. `max_turns`: CM2's user-turn normaliser (an episode here has one user turn). An
    unreadable judge answer stops judging (component `judge_failed` = 1; earlier credit stands).
    """
    if reward_level not in ("turn", "step"):
        raise ValueError(f"cm2_checklist: reward_level must be 'turn' or 'step', got {reward_level!r}")
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"cm2_checklist: max_turns must be an integer >= 1, got {max_turns!r}")
    if checklist_key not in problem.info:
        raise ValueError(f"cm2_checklist: problem {problem.id!r} has no info[{checklist_key!r}] (its checklist)")
    criteria = parse_checklists(problem.info[checklist_key], problem.id, max_turns)
    the_judge = get_judge(judge, "cm2_checklist")
    first, failed = await first_satisfied(the_judge, trajectory, problem, criteria, max_chars)
    n_turns = len(trajectory.turns)
    turn_rewards = [0.0] * n_turns
    for criterion, k in zip(criteria, first):
        if k is not None:
            turn_rewards[k if reward_level == "step" else n_turns - 1] += criterion.weight
    total = sum(turn_rewards)
    met = sum(1 for k in first if k is not None)
    components = {"checklist": total, "criteria_met": met / len(criteria), "judge_failed": float(failed)}
    return RewardResult(total, components, None, tuple(turn_rewards) if n_turns else None)


def _validate_judge(params: Mapping[str, Any], task_reward: str) -> None:
    """`validate` hook (see `tirl.rewards.base.check_params`): a judge given as settings is checked
    before any work starts (`judge_config`); building it waits for the first call."""
    if isinstance(params.get("judge"), Mapping):
        judge_config(params["judge"])


judge_rubric.validate = _validate_judge  # type: ignore[attr-defined]
cm2_checklist.validate = _validate_judge  # type: ignore[attr-defined]
