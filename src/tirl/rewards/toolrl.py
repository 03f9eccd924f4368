"""ToolRL reward (Qian et al. 2025, "ToolRL: Reward is All Tool Learning Needs", arXiv 2504.13958).

`R = R_format + R_correct (+ R_length)`, R_format in {min_f, max_f} = {0, 1}, R_correct in [-3, 3].

R_correct compares the gold calls with the predicted calls (0 when the gold has no call):

    match(L1, L2) = 1 if L1 == L2 else |L1 ∩ L2|_multiset / (|L1| + |L2| - |L1 ∩ L2|)
    exact list match -> max; otherwise
    S = match(gold names, predicted names); Smax = 1
    for each gold call g:  Smax += 1 + |g.params|
        S += best over unused predicted calls p with g's name of
             match(keys_g, keys_p) + #{k : p[k] == g[k]}      (greedy, first best, then marked used)
    R_correct = (max - min) * S / Smax + min

Mapping from the paper's text format onto tirl's structured calls. The paper's model writes one
message `<think>...</think>\\n<tool_call>\\n{json per line}\\n</tool_call>\\n<response>...</response>`;
in tirl the chat format parses calls into `Turn.tool_calls`, the env answers them, and the model
answers in a later turn. So:

- predicted calls: every parsed call of every turn, in order, as `{"name": call.name, "parameters":
  call.arguments}`. A call attempt that could not be parsed (`tirl.rewards.format.unparsed_attempts`)
  is the paper's JSON failure: R_correct = min. Gold calls and no call attempt: R_correct = min.
- gold calls: `problem.info["gold_calls"]` (a list of `{"name", "parameters"}`), else
  `problem.reference_calls`. Gold "has a response" when `problem.answer` is not blank.
- R_format = max_f iff (a) every turn's text starts with its one `<think>...</think>` (exactly one of
  each tag per turn), (b) the trajectory attempted tool calls iff the gold has calls, and (c) if the
  gold has a response, the final answer is, after `</think>`, exactly one `<answer_tag>...</answer_tag>`
  block and nothing else; if it has none, the final text (if any) holds no such tag.
- R_length (variant `with_length`): words inside every `<think>` block of every turn.

Variants (the paper's environment flags; one per run):
`default` (fine-grained, static); `coarse` (exact match -> max, else min); `refined` (`match` is
strict: 1 if equal else 0); `intermediate` (each gold call is worth 1, exact call or nothing);
`correct_max1` (R_correct in [-1, 1]); `max1step30max3` (R_correct / 3 before step 30, R_format
halved from step 30); `schedule` (over 150 steps R_correct's range widens from [-2, 2] to [-3, 3]
and R_format's narrows from [-2, 2] to [-1, 1]: `max_c = min(3, 2 + (3-2) s/150)`,
`min_c = max(-3, -2 + (-3+2) s/150)`, `max_f = max(1, 2 - (2-1) s/150)`, `min_f = min(-1, -2 + (2+0) s/150)`);
`with_length` (adds `R_length = min(round(words / L, 2), 1)` in [0, 1], L = 512, or with
`length_schedule` L = 384 + (640-384) s/105, not capped, as in the released code).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.rewards.format import unparsed_attempts
from tirl.tasks.base import Problem
from tirl.types import Trajectory

VARIANTS = ("default", "coarse", "refined", "intermediate", "correct_max1", "max1step30max3", "schedule",
            "with_length")
"""The reward variants of the paper's code (its environment flags), by name."""

_MATCH_MODES = ("fine", "coarse", "refined", "intermediate")
_THINK_WORDS_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)

Call = Mapping[str, Any]
"""A call as ToolRL reads it: {"name": str, "parameters": dict}."""


def match_score(list1: Sequence[Any], list2: Sequence[Any], strict: bool = False) -> float:
    """Frequency-aware Jaccard: 1 if equal, else |L1 ∩ L2|_multiset / (|L1| + |L2| - |L1 ∩ L2|).

    Empty against non-empty is 0; `strict` (the `refined` variant) gives 0 for any difference."""
    if list(list1) == list(list2):
        return 1.0
    if strict or not list1 or not list2:
        return 0.0
    inter = sum((Counter(list1) & Counter(list2)).values())
    return inter / (len(list1) + len(list2) - inter)


def toolrl_correctness(gt_calls: Sequence[Call], pred_calls: Sequence[Call], max_reward: float = 3.0,
                       min_reward: float = -3.0, mode: str = "fine") -> float:
    """ToolRL's R_correct of predicted calls against gold calls: `(max - min) * S / Smax + min`.

    `mode`: "fine" (the paper's default), "coarse" (exact list -> max, else min), "refined" (strict
    `match`), "intermediate" (each gold call worth 1, exact call or nothing). Calls are mappings with
    "name" and "parameters". An exact list match (order included) gives `max_reward`."""
    if mode not in _MATCH_MODES:
        raise ValueError(f"toolrl_correctness: unknown mode {mode!r}; valid: {', '.join(_MATCH_MODES)}")
    gt, pred = [_norm_call(c) for c in gt_calls], [_norm_call(c) for c in pred_calls]
    if gt == pred:
        return max_reward
    if mode == "coarse":
        return min_reward
    strict = mode == "refined"
    score = match_score([g["name"] for g in gt], [p["name"] for p in pred], strict)
    smax = 1.0
    used: set[int] = set()
    for g in gt:
        smax += 1.0 if mode == "intermediate" else 1.0 + len(g["parameters"])
        best, best_index = 0.0, -1
        for i, p in enumerate(pred):
            if i in used or p["name"] != g["name"]:
                continue
            if mode == "intermediate":
                if p == g:
                    best, best_index = 1.0, i
                    break
                continue
            s = match_score(list(g["parameters"]), list(p["parameters"]), strict) + \
                sum(1.0 for k, v in g["parameters"].items() if k in p["parameters"] and p["parameters"][k] == v)
            if s > best:
                best, best_index = s, i
        if best_index >= 0:
            used.add(best_index)
            score += best
    return (max_reward - min_reward) * score / smax + min_reward


def _norm_call(call: Call) -> dict[str, Any]:
    if not isinstance(call, Mapping) or not isinstance(call.get("name"), str) or \
            not isinstance(call.get("parameters", {}), Mapping):
        raise ValueError(f"a ToolRL call must be a mapping with a string 'name' and a mapping 'parameters', "
                         f"got {call!r}")
    return {"name": call["name"], "parameters": dict(call.get("parameters", {}))}


def gold_calls(problem: Problem) -> list[dict[str, Any]]:
    """Gold calls: `problem.info["gold_calls"]` (list of {"name", "parameters"}), else `problem.reference_calls`."""
    if "gold_calls" in problem.info:
        raw = problem.info["gold_calls"]
        if isinstance(raw, (str, Mapping)) or not isinstance(raw, Sequence):
            raise ValueError(f"problem {problem.id!r}: info['gold_calls'] must be a list of "
                             f"{{'name', 'parameters'}} mappings, got {raw!r}")
        try:
            return [_norm_call(c) for c in raw]
        except ValueError as e:
            raise ValueError(f"problem {problem.id!r}: info['gold_calls']: {e}") from None
    return [{"name": c.name, "parameters": dict(c.arguments)} for c in problem.reference_calls]


def predicted_calls(trajectory: Trajectory) -> list[dict[str, Any]]:
    """Every parsed call of the trajectory, in order, as {"name", "parameters"}."""
    return [{"name": c.name, "parameters": dict(c.arguments)} for t in trajectory.turns for c in t.tool_calls]


@dataclass(frozen=True)
class Scales:
    """The ranges of ToolRL's components at one step."""

    max_c: float = 3.0
    min_c: float = -3.0
    max_f: float = 1.0
    min_f: float = 0.0


def variant_scales(variant: str, step: int) -> Scales:
    """The component ranges of a variant at training step `step` (formulas in the module docstring)."""
    if variant == "correct_max1":
        return Scales(max_c=1.0, min_c=-1.0)
    if variant == "max1step30max3":
        return Scales(max_c=1.0, min_c=-1.0) if step < 30 else Scales(max_f=0.5, min_f=0.0)
    if variant == "schedule":
        base = Scales()
        return Scales(max_c=min(3.0, (base.max_c - 2) * step / 150 + 2),
                      min_c=max(-3.0, (base.min_c + 2) * step / 150 - 2),
                      max_f=max(1.0, 2 - (2 - base.max_f) * step / 150),
                      min_f=min(-1.0, -2 + (2 + base.min_f) * step / 150))
    return Scales()


def _turn_format_ok(text: str) -> bool:
    s = text.strip()
    return s.startswith("<think>") and s.count("<think>") == 1 and s.count("</think>") == 1


def format_ok(trajectory: Trajectory, expects_calls: bool, expects_answer: bool, answer_tag: str) -> bool:
    """ToolRL's format check mapped onto turns (rules (a)-(c) in the module docstring)."""
    if not trajectory.turns or not all(_turn_format_ok(t.text) for t in trajectory.turns):
        return False
    if bool(trajectory.tool_results) != expects_calls:
        return False
    final = trajectory.final_answer
    open_tag, close_tag = f"<{answer_tag}>", f"</{answer_tag}>"
    if not expects_answer:
        return final is None or (open_tag not in final and close_tag not in final)
    if final is None:
        return False
    tail = final.split("</think>", 1)[-1].strip()
    return tail.startswith(open_tag) and tail.endswith(close_tag) and tail.count(open_tag) == 1 \
        and tail.count(close_tag) == 1


def think_length_reward(trajectory: Trajectory, step: int, length_schedule: bool) -> float:
    """`min(round(words / L, 2), 1)` over the words of every <think> block; L = 512 (or 384 + 256 s/105).

    0 when the turns hold no `<think>...</think>`."""
    text = "\n".join(t.text for t in trajectory.turns)
    if "<think>" not in text or "</think>" not in text:
        return 0.0
    words = sum(len(block.split()) for block in _THINK_WORDS_RE.findall(text))
    target = (640 - 384) * step / 105 + 384 if length_schedule else 512
    return min(round(words / target, 2), 1.0)


def _correctness(trajectory: Trajectory, gt: list[dict[str, Any]], scales: Scales, variant: str) -> float:
    if not gt:
        return 0.0
    if not trajectory.tool_results or unparsed_attempts(trajectory):
        return scales.min_c
    mode = variant if variant in _MATCH_MODES else "fine"
    return toolrl_correctness(gt, predicted_calls(trajectory), scales.max_c, scales.min_c, mode)


@REWARDS.register("toolrl")
def toolrl_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *, variant: str = "default",
                  answer_tag: str = "answer", length_schedule: bool = False) -> RewardResult:
    """ToolRL (Qian et al. 2025): R_format (0/1) + R_correct in [-3,3] from Jaccard name/key matches and exact values.

    `variant` picks one of the paper's reward variants (see the module docstring); `answer_tag` is the
    tag of the final response (the paper's `response`); `length_schedule` (with `with_length` only)
    grows the think-length target from 384 to 640 words over 105 steps. `correct` is an exact match
    of the call list (None when the gold has no call)."""
    if variant not in VARIANTS:
        raise ValueError(f"toolrl: unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if length_schedule and variant != "with_length":
        raise ValueError(f"toolrl: length_schedule applies only to variant 'with_length', not {variant!r}")
    gt = gold_calls(problem)
    scales = variant_scales(variant, group.step)
    ok = format_ok(trajectory, bool(gt), bool(problem.answer.strip()), answer_tag)
    components = {"format": scales.max_f if ok else scales.min_f,
                  "correct": _correctness(trajectory, gt, scales, variant)}
    if variant == "with_length":
        components["length"] = think_length_reward(trajectory, group.step, length_schedule)
    exact = predicted_calls(trajectory) == gt and not unparsed_attempts(trajectory)
    return RewardResult(total=sum(components.values()), components=components, correct=exact if gt else None)
