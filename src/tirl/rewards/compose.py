"""Rewards built from other rewards: `weighted_sum`, `product` and `gate`.

Each part is a reward spec (a registered name, "task", a `module:attr` path, or
`{"name": ..., "kwargs": {...}}`) scored with `call_reward`; a part that raises stops the run (no
zeros). Parts are scored one after another, in order, so a stateful part sees the same order every run.

Reported components: a part labelled `L` (its `name`, else `t<i>` for the i-th term) contributes `L`
(its total, unweighted) and `L.<k>` for each of its own components `k` (unweighted), so
`terms: [{reward: arithmetic}]` reports `t0`, `t0.correct` and `t0.format`.

`correct` passes through from one part: `correct_from` (a label or an index) names it; by default the
first part that knows it (its `correct` is not None).

Also the helpers the shaping and calibration rewards share: `prefixed`, `known_correct`,
`outcome_on_last_turn`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tirl.registry import RegistryError
from tirl.rewards.base import REWARDS, GroupContext, RewardResult, RewardSpec, bind, call_reward
from tirl.tasks.base import Problem
from tirl.types import Trajectory


@dataclass(frozen=True)
class Term:
    """One part of a composed reward."""

    label: str
    """How its components are reported (`<label>`, `<label>.<component>`)."""
    spec: RewardSpec
    """The reward that scores it."""
    weight: float = 1.0
    """Its factor in a weighted sum."""


# ----------------------------------------------------------------------------- shared helpers


def prefixed(components: Mapping[str, float], prefix: str) -> dict[str, float]:
    """`{prefix.k: v}` for every component `k: v`."""
    return {f"{prefix}.{k}": float(v) for k, v in components.items()}


def known_correct(result: RewardResult, spec: RewardSpec, who: str) -> bool:
    """`result.correct`, which the reward `spec` must know (raises `ValueError` naming it otherwise)."""
    if result.correct is None:
        raise ValueError(f"{who}: its correctness reward {spec!r} does not say whether the answer is right "
                         "(its `correct` is None); give a base reward that does (e.g. the task's own)")
    return bool(result.correct)


def outcome_on_last_turn(result: RewardResult, num_turns: int) -> tuple[float, ...] | None:
    """A result's turn rewards, or its total on the last of `num_turns` turns (None without turns)."""
    if result.turn_rewards is not None:
        return tuple(result.turn_rewards)
    if num_turns == 0:
        return None
    return (0.0,) * (num_turns - 1) + (result.total,)


def merge_components(into: dict[str, float], new: Mapping[str, float], who: str) -> None:
    """Add `new` to `into`; a name in both is a `ValueError` (two parts would report one metric)."""
    clash = sorted(set(into) & set(new))
    if clash:
        raise ValueError(f"{who}: component {clash[0]!r} is reported twice; give the parts distinct names")
    into.update(new)


# ----------------------------------------------------------------------------- parsing the terms


def parse_terms(terms: Any, who: str, weighted: bool) -> list[Term]:
    """Terms from a recipe: a non-empty list of `{reward: spec, weight: w, name: label}` (weight only
    when `weighted`) or bare specs (a name, or `{name, kwargs}` without `reward`). Raises `ValueError`
    naming the bad entry."""
    if isinstance(terms, (str, Mapping)) or not isinstance(terms, Sequence) or not terms:
        raise ValueError(f"{who}: `terms` must be a non-empty list of {{reward: spec"
                         f"{', weight: w' if weighted else ''}, name: label}}, got {terms!r}")
    allowed = {"reward", "name", "weight"} if weighted else {"reward", "name"}
    out: list[Term] = []
    for i, entry in enumerate(terms):
        if isinstance(entry, str) or (isinstance(entry, Mapping) and "reward" not in entry and entry
                                      and set(entry) <= {"name", "kwargs"}):
            entry = {"reward": entry}  # a bare spec
        if not isinstance(entry, Mapping) or "reward" not in entry or set(entry) - allowed:
            raise ValueError(f"{who}: term {i} must be a reward name or a mapping with 'reward' and optional "
                             f"{sorted(allowed - {'reward'})}, got {entry!r}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{who}: term {i} weight must be a finite number, got {weight!r}")
        label = entry.get("name", f"t{i}")
        if not isinstance(label, str) or not label or "." in label:
            raise ValueError(f"{who}: term {i} name must be a non-empty string without '.', got {label!r}")
        out.append(Term(label, entry["reward"], float(weight)))
    labels = [t.label for t in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{who}: term names must be distinct, got {labels}")
    return out


def pick_correct(labels: Sequence[str], results: Sequence[RewardResult], correct_from: str | int | None,
                 who: str) -> bool | None:
    """The `correct` of the designated part (label or index), else of the first part that knows it."""
    if correct_from is None:
        return next((r.correct for r in results if r.correct is not None), None)
    if isinstance(correct_from, bool) or not isinstance(correct_from, (str, int)):
        raise ValueError(f"{who}: correct_from must be a term name or index, got {correct_from!r}")
    if isinstance(correct_from, int):
        if not 0 <= correct_from < len(results):
            raise ValueError(f"{who}: correct_from={correct_from} but there are {len(results)} terms")
        index = correct_from
    elif correct_from in labels:
        index = list(labels).index(correct_from)
    else:
        raise ValueError(f"{who}: correct_from={correct_from!r} names no term; terms: {list(labels)}")
    if results[index].correct is None:
        raise ValueError(f"{who}: correct_from={correct_from!r}, but that term does not say whether the answer "
                         "is right (its `correct` is None)")
    return results[index].correct


async def score_terms(terms: Sequence[Term], trajectory: Trajectory, problem: Problem,
                      group: GroupContext) -> tuple[list[RewardResult], dict[str, float]]:
    """Every term's result, in order, and their components (`<label>`, `<label>.<k>`)."""
    results, components = [], {}
    for term in terms:
        result = await call_reward(term.spec, trajectory, problem, group)
        results.append(result)
        components[term.label] = result.total
        components.update(prefixed(result.components, term.label))
    return results, components


# ----------------------------------------------------------------------------- rewards


@REWARDS.register("weighted_sum")
async def weighted_sum(trajectory: Trajectory, problem: Problem, group: GroupContext, *,
                       terms: Sequence[Any] = (), correct_from: str | int | None = None) -> RewardResult:
    """Weighted sum of rewards: R = sum_i w_i R_i over `terms: [{reward, weight, name}]`.

    Turn-level parts keep their placement: when any part has turn rewards, the result's turn rewards
    are sum_i w_i r_i[k], a part without them counting its total on the last turn.
    """
    parsed = parse_terms(terms, "weighted_sum", weighted=True)
    results, components = await score_terms(parsed, trajectory, problem, group)
    total = sum(t.weight * r.total for t, r in zip(parsed, results))
    turn_rewards = None
    if any(r.turn_rewards is not None for r in results) and trajectory.turns:
        per_part = [outcome_on_last_turn(r, len(trajectory.turns)) for r in results]
        turn_rewards = tuple(sum(t.weight * p[k] for t, p in zip(parsed, per_part))
                             for k in range(len(trajectory.turns)))
    correct = pick_correct([t.label for t in parsed], results, correct_from, "weighted_sum")
    return RewardResult(total, components, correct, turn_rewards)


@REWARDS.register("product")
async def product(trajectory: Trajectory, problem: Problem, group: GroupContext, *,
                  terms: Sequence[Any] = (), scale: float = 1.0,
                  correct_from: str | int | None = None) -> RewardResult:
    """Product of rewards (OTC-style multiplicative shaping): R = scale * prod_i R_i over `terms`.

    Outcome rewards only: a part with turn rewards is an error (a product has no per-turn split).
    """
    parsed = parse_terms(terms, "product", weighted=False)
    results, components = await score_terms(parsed, trajectory, problem, group)
    for term, result in zip(parsed, results):
        if result.turn_rewards is not None:
            raise ValueError(f"product: term {term.label!r} ({term.spec!r}) gives turn rewards, which a product "
                             "cannot place on turns; use weighted_sum or an outcome reward")
    total = float(scale) * math.prod(r.total for r in results)
    correct = pick_correct([t.label for t in parsed], results, correct_from, "product")
    return RewardResult(total, components, correct)


@REWARDS.register("gate")
async def gate(trajectory: Trajectory, problem: Problem, group: GroupContext, *,
               reward: RewardSpec = "task", gate: RewardSpec = "task", threshold: float | None = None,
               otherwise: float = 0.0) -> RewardResult:
    """Gated reward: R = `reward` if the `gate` reward passes (correct, or total > threshold), else `otherwise`.

    The gate passes when its `correct` is true (`threshold` None; a gate that cannot tell raises) or when
    its total is strictly above `threshold`. `reward` is scored only when the gate passes. Components:
    `gate`, `gate.<k>`, `passed` (1/0) and, when paid, `reward`, `reward.<k>`. `correct` comes from the
    gate when it knows it, else from the paid reward.
    """
    gate_result = await call_reward(gate, trajectory, problem, group)
    if threshold is None:
        passed = known_correct(gate_result, gate, "gate")
    else:
        passed = gate_result.total > float(threshold)
    components = {"gate": gate_result.total, **prefixed(gate_result.components, "gate"), "passed": float(passed)}
    if not passed:
        return RewardResult(float(otherwise), components, gate_result.correct)
    paid = await call_reward(reward, trajectory, problem, group)
    components.update({"reward": paid.total, **prefixed(paid.components, "reward")})
    correct = gate_result.correct if gate_result.correct is not None else paid.correct
    return RewardResult(paid.total, components, correct, paid.turn_rewards)


def _terms_validator(who: str, weighted: bool):
    """`validate` hook (see `tirl.rewards.base.check_params`): the terms and every term's spec."""

    def validate(params: Mapping[str, Any], task_reward: str) -> None:
        for term in parse_terms(params.get("terms", ()), who, weighted):
            try:
                bind(term.spec, task_reward)
            except (RegistryError, ValueError) as e:
                raise ValueError(f"{who}: term {term.label!r}: {e}") from None

    return validate


weighted_sum.validate = _terms_validator("weighted_sum", weighted=True)  # type: ignore[attr-defined]
product.validate = _terms_validator("product", weighted=False)  # type: ignore[attr-defined]
