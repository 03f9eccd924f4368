"""Name registries for advantage estimators and policy losses.

Every advantage estimator has the signature `fn(inp: AdvantageInput, **params) -> (advantages_B_T,
returns_B_T)`; every policy loss `fn(inp: PolicyLossInput, **params) -> (loss, metrics)`. The trainer
looks them up by the name in its config and never branches on the name itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tirl.registry import Registry

ADVANTAGES: Registry[Callable[..., Any]] = Registry("advantage estimator")
"""Advantage estimators by name (`grpo`, `drgrpo`, `rloo`, `reinforce_pp`, ...)."""

POLICY_LOSSES: Registry[Callable[..., Any]] = Registry("policy loss")
"""Policy losses by name (`ppo_clip`, ...)."""


def register_advantage(name: str, doc: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register an advantage estimator under `name`; a taken name raises `RegistryError`."""
    return ADVANTAGES.register(name, doc)


def register_policy_loss(name: str, doc: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a policy loss under `name`; a taken name raises `RegistryError`."""
    return POLICY_LOSSES.register(name, doc)
