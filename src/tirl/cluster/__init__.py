"""RL rollouts and tools on Ray actors (`cluster.*`; `pip install 'tirl[ray]'`).

    cluster: {enabled: true, rollout_workers: 4, tool_workers: 8, rollout_num_gpus: 1}

With `cluster.enabled`, each RL step's problems are split per problem group over `rollout_workers`
Ray actors, each owning a generation backend built from the run's model and backend config
(`workers.py`); the trainer pushes its weights to them after every update (`ray_pool.py`). With
`tool_workers > 0`, tool calls run on separate CPU-only actors (`tools.py`). Nothing here is imported
by `import tirl`, and Ray itself is imported only when a cluster is started.

Rewards are computed in the trainer's process, in problem order, as in a local rollout, so a
stateful reward sees the same sequence. Only the `flat` strategy runs on the cluster.
"""

from __future__ import annotations

import os
from typing import Any

from tirl.config import ClusterConfig
from tirl.errors import ConfigError

INSTALL_HINT = "pip install 'tirl[ray]'"


def require_ray() -> Any:
    """The `ray` module; `ConfigError` naming the install command when it is missing."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"cluster.enabled=true needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_config(cfg) -> None:
    """Cheap checks of `cluster.*` before any work starts (Ray importable, a strategy the cluster runs)."""
    import importlib.util

    if not cfg.cluster.enabled:
        return
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"cluster.enabled=true needs Ray, which is not installed: {INSTALL_HINT}")
    if cfg.rollout.strategy != "flat":
        raise ConfigError(f"cluster.enabled=true samples with rollout.strategy=flat only, not "
                          f"{cfg.rollout.strategy!r}")
    data_parallel = getattr(getattr(cfg, "distributed", None), "strategy", "none")
    if data_parallel in ("ddp", "fsdp2") or (data_parallel == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise ConfigError(f"cluster.enabled=true with distributed.strategy={data_parallel} is not supported: every "
                          "training rank would start its own rollout workers; use one of the two")


def connect(cfg: ClusterConfig) -> Any:
    """Ray, initialised for `cfg`: an already initialised Ray is used as it is; `address=None` starts a
    local Ray (with `object_store_mb` when set); otherwise connects to `address`. A cluster that cannot
    be reached is a `ConfigError` naming `cluster.address`."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if cfg.address is None and cfg.object_store_mb:
        kwargs["object_store_memory"] = cfg.object_store_mb * 1024 * 1024
    try:
        ray.init(address=cfg.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cluster.address={cfg.address!r}: cannot connect to a Ray cluster there ({e})") from None
    return ray


def start_rollout_pool(cfg, policy, task=None):
    """The Ray rollout pool for an RL run (see `ray_pool.RolloutPool`): connects, starts the tool and
    rollout workers, and pushes the policy's current weights."""
    from tirl.cluster.ray_pool import pool_from_config

    return pool_from_config(cfg, policy, task)


__all__ = ["INSTALL_HINT", "check_config", "connect", "require_ray", "start_rollout_pool"]
