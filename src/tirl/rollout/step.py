"""One step's rollout: the configured strategy, optionally under DAPO dynamic sampling.

Strategies are looked up in `tirl.rollout.groups.STRATEGIES`; importing this module registers the
built-in ones (flat, tree, fission, entropy_branch).
"""

from __future__ import annotations

from collections.abc import Callable

from tirl.config import Config, DynamicSamplingConfig
from tirl.errors import ConfigError
from tirl.registry import RegistryError
from tirl.rollout import strategies  # noqa: F401 - registers the built-in strategies
from tirl.rollout.groups import STRATEGIES, RolloutContext, Strategy, StrategyOutput, run_strategy
from tirl.tasks.base import Problem

SETTINGS_SECTIONS = ("tree", "fission", "entropy_branch")
"""Strategies whose settings live in `rollout.<name>`."""


def build_strategy(cfg: Config) -> Strategy:
    """The strategy named by `rollout.strategy`, built with its `rollout.<name>` settings."""
    name = cfg.rollout.strategy
    try:
        factory = STRATEGIES.get(name)
    except RegistryError as e:
        raise ConfigError(f"rollout.strategy: {e}") from None
    kwargs = getattr(cfg.rollout, name).model_dump() if name in SETTINGS_SECTIONS else {}
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rollout.{name}: {e}") from None


async def rollout_step(strategy: Strategy, take: Callable[[int], list[Problem]], prompts: int,
                       ctx: RolloutContext, dynamic: DynamicSamplingConfig | None = None) -> StrategyOutput:
    """Sample one step: `prompts` problems taken from `take`, more while dynamic sampling asks for them."""
    if dynamic is not None and dynamic.enabled:
        from tirl.rollout.dynamic import dynamic_sample
        return await dynamic_sample(strategy, take, prompts, ctx, metric=dynamic.metric,
                                    max_batches=dynamic.max_batches)
    return await run_strategy(strategy, take(prompts), ctx)
