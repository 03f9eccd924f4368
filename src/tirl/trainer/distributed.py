"""Data-parallel training under torch.distributed: `torchrun --nproc-per-node N -m tirl.cli train recipe.yaml`,
or ranks started from Ray (`distributed.launcher=ray`, `tirl.cluster.train`), gloo on CPU, nccl on
CUDA, selected by `distributed.strategy` (`ddp`, `fsdp2`, or `auto`).

The contract, per RL step, with W ranks:

1. Rollouts: the step's `rollout.prompts_per_step` problems are taken from the data stream as usual
   (the cursor is a global count of problems, the same at any W) and rank r samples the r-th contiguous
   share of them. Groups keep their global index (`group_offset`): their ids and sampling seeds are
   those a single process gives the same problems, so sampling does not depend on W.
2. The ranks all-gather their groups (in rank order, i.e. in the single-process order): every rank then
   holds the same full batch and computes the same advantages (batch-level normalisations are global).
3. Update: every rank computes the loss normalisers (token and sequence counts) of the FULL mini-batch,
   then runs forward/backward only on its own share of the mini-batch's rows. Its loss is thus its rows'
   part of the global loss (a sum over its tokens divided by the global count), and the SUM of the
   ranks' gradients is exactly the gradient of the single-process loss: the token-mean over the global
   batch, not a mean of rank means. `ddp`: each rank holds a full replica and the gradients are summed
   by one all-reduce per optimizer step (the reduction DistributedDataParallel performs, done once
   after accumulation, so ranks may run different numbers of micro-batches and every trainable
   parameter, LoRA adapters and a critic's head included, is covered). `fsdp2`: each decoder layer is
   sharded with `fully_shard` (the rest stays replicated and is summed as under ddp), the loss is
   multiplied by W (the reduce-scatter averages) and a rank with fewer micro-batches runs zero-weighted
   ones so that all ranks make the same collectives. Gradient clipping then sees the global gradient
   (ddp: every rank holds it; fsdp2: `clip_grad_norm` sums the shards' squares over the ranks).
4. Rank 0 alone writes metrics, trajectories, checkpoints (full, unsharded weights and optimizer state,
   so a run saved at one W resumes at any other), reports and evaluations; the others wait at barriers.

The SFT cold start (`sft.py`) is data-parallel the same way: every rank builds the same batches, runs
its share of each with the whole batch's weight as the normaliser, and the gradients are summed.
Not supported (a `ConfigError` naming the key): dynamic sampling, the fission strategy, Ray rollout
workers and asynchronous RL (`rl.max_staleness`) with any strategy; LoRA, a critic, replay and
information gain with fsdp2.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from tirl.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the data-parallel group (`strategy="none"`: a single process)."""

    strategy: str = "none"
    rank: int = 0
    size: int = 1

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Parameters are sharded (fsdp2): every forward and backward is a collective."""
        return self.strategy == "fsdp2"

    @property
    def loss_scale(self) -> float:
        """Factor on each rank's loss so that the gradient reduction gives the sum over ranks."""
        return float(self.size) if self.sharded else 1.0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of `items` (shares differ in size by at most one, rank 0 first)."""
        return list(items[slice(*share_bounds(len(items), self.rank, self.size))])


def share_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """`[start, end)` of rank `rank`'s share of n items split over `size` ranks."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


_WORLD = World()


def world() -> World:
    """The world set up by `init` (a single process before, or without, it)."""
    return _WORLD


# ----------------------------------------------------------------------------- set-up


def resolve_strategy(cfg, env: dict[str, str] | None = None) -> str:
    """`distributed.strategy` with `auto` resolved (ddp under torchrun, else none); a strategy that needs
    torchrun without it, or a config this strategy cannot run, is a `ConfigError` naming the key."""
    env = os.environ if env is None else env
    strategy = cfg.distributed.strategy
    launched = "WORLD_SIZE" in env
    if strategy == "auto":
        strategy = "ddp" if launched else "none"
    if strategy == "none":
        return strategy
    if not launched:
        raise ConfigError(f"distributed.strategy={strategy} needs a launch by torchrun (WORLD_SIZE is not set): "
                          f"torchrun --nproc-per-node N -m tirl.cli train recipe.yaml")
    check_config(cfg, strategy, int(env["WORLD_SIZE"]))
    return strategy


def check_config(cfg, strategy: str, size: int) -> None:
    """What data-parallel training with `size` ranks cannot run, as a `ConfigError` naming the key."""
    if cfg.rollout.prompts_per_step % size:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be divisible by the "
                          f"world size {size} (distributed.strategy={strategy}): each rank samples an equal share")
    if cfg.rollout.dynamic_sampling.enabled:
        raise ConfigError("rollout.dynamic_sampling.enabled=true is not supported with distributed.strategy="
                          f"{strategy} (ranks would sample different numbers of batches)")
    if cfg.rollout.strategy == "fission":
        raise ConfigError(f"rollout.strategy=fission is not supported with distributed.strategy={strategy}")
    if getattr(getattr(cfg, "cluster", None), "enabled", False):
        raise ConfigError(f"cluster.enabled=true cannot be combined with distributed.strategy={strategy}")
    if cfg.rl.max_staleness:
        raise ConfigError(f"rl.max_staleness={cfg.rl.max_staleness} (asynchronous RL) cannot be combined with "
                          f"distributed.strategy={strategy} yet")
    if strategy == "fsdp2":
        from tirl.trainer.build import critic_enabled

        off = [("model.lora.enabled", cfg.model.lora.enabled),
               ("algorithm.replay.enabled", cfg.algorithm.replay.enabled),
               ("algorithm.info_gain.enabled", cfg.algorithm.info_gain.enabled),
               ("algorithm.critic.enabled (a value head)", critic_enabled(cfg))]
        for key, on in off:
            if on:
                raise ConfigError(f"{key} is not supported with distributed.strategy=fsdp2 (use ddp)")


def init(cfg) -> World:
    """Join the process group when `distributed.strategy` asks for it (see `resolve_strategy`); returns
    and remembers the world. Idempotent."""
    global _WORLD
    strategy = resolve_strategy(cfg)
    if strategy == "none":
        _WORLD = World()
        return _WORLD
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = cfg.distributed.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.distributed.timeout_s))
    _WORLD = World(strategy, dist.get_rank(), dist.get_world_size())
    return _WORLD


def use(w: World) -> None:
    """Set the world by hand (a process group already initialised, e.g. in tests)."""
    global _WORLD
    _WORLD = w


def teardown() -> None:
    """Leave the process group (if this module joined or was given one)."""
    global _WORLD
    if _WORLD.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD = World()


def barrier() -> None:
    if _WORLD.enabled:
        import torch.distributed as dist

        dist.barrier()


def main_first(w: World, work: Callable[[], T]) -> T | None:
    """Run `work` on rank 0 while the others wait; returns its result on rank 0, None elsewhere."""
    result = work() if w.is_main else None
    if w.enabled:
        barrier()
    return result


def main_alone(w: World, work: Callable[[], T]) -> T | None:
    """Run `work` on rank 0 as a single process (no collectives inside; evaluation, SFT) while the other
    ranks wait; returns its result on rank 0, None elsewhere."""
    global _WORLD
    if not w.enabled:
        return work()
    result = None
    if w.is_main:
        _WORLD = World()
        try:
            result = work()
        finally:
            _WORLD = w
    barrier()
    return result


# ----------------------------------------------------------------------------- collectives on Python objects


def all_gather(obj: Any, w: World) -> list[Any]:
    """`obj` of every rank, in rank order (`[obj]` in a single process)."""
    if not w.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(values: dict[str, float], w: World) -> dict[str, float]:
    """Key-wise sums over the ranks (a key missing on a rank counts as 0)."""
    out: dict[str, float] = {}
    for part in all_gather(values, w):
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def max_over_ranks(n: int, w: World) -> int:
    return max(all_gather(n, w)) if w.enabled else n


# ----------------------------------------------------------------------------- gradient accumulation


def backward(loss: torch.Tensor, w: World) -> None:
    """`loss.backward()`, times W under fsdp2 (its reduce-scatter averages the ranks' gradients)."""
    (loss * w.loss_scale if w.sharded else loss).backward()


def match_collectives(done: int, dummy_loss: Callable[[], torch.Tensor], w: World) -> None:
    """fsdp2: zero-weighted backward passes of `dummy_loss()` until this rank has made as many as the
    busiest rank, so that every rank makes the same collectives (a no-op otherwise)."""
    if w.sharded:
        for _ in range(max_over_ranks(done, w) - done):
            (dummy_loss() * 0.0).backward()


def reduce_accumulated(modules: Iterable, sums: dict[str, float], w: World) -> dict[str, float]:
    """After a rank's backward passes: the gradients of `modules` and the metric `sums` summed over the
    ranks (`sync_gradients`, `sum_over_ranks`); a single process returns `sums` as they are."""
    if not w.enabled:
        return sums
    sync_gradients(modules, w)
    return sum_over_ranks(sums, w)


# ----------------------------------------------------------------------------- rollouts


def sharded_take(take: Callable[[int], list[T]], w: World) -> Callable[[int], list[T]]:
    """`take(n)` for one rank: takes `n * size` problems from the global stream, returns this rank's n."""
    def take_share(n: int) -> list[T]:
        return w.share(take(n * w.size))
    return take_share


def group_offset(prompts_per_step: int, w: World) -> int:
    """Global index of this rank's first group in the step."""
    return share_bounds(prompts_per_step, w.rank, w.size)[0]


def sharded_context(ctx, offset: int):
    """`ctx` (a `RolloutContext`) whose seeds are those of group `offset + g` for its local group g."""
    from tirl.rollout.groups import RolloutContext

    @dataclass
    class ShardedContext(RolloutContext):
        group_offset: int = 0

        def seed_for(self, key: tuple) -> int:
            return super().seed_for(_offset_key(key, self.group_offset))

    fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}
    return ShardedContext(**fields, group_offset=offset)


def _offset_key(key: tuple, offset: int) -> tuple:
    """`key` with its first integer (the group's index in the step, in every strategy's keys) shifted."""
    for i, part in enumerate(key):
        if isinstance(part, int):
            return (*key[:i], part + offset, *key[i + 1:])
    return key


def shard_rollout(take: Callable[[int], list[T]], prompts: int, ctx, w: World):
    """`(take, prompts, ctx)` for this rank's share of a step of `prompts` problems (unchanged in a single
    process): the rank's problems, their number, and a context seeding them as their global groups."""
    if not w.enabled:
        return take, prompts, ctx
    return sharded_take(take, w), prompts // w.size, sharded_context(ctx, group_offset(prompts, w))


def gather_output(out, step: int, prompts: int, w: World):
    """The step's `StrategyOutput` of all ranks (groups, failures, dropped groups), in rank order, with
    group ids renumbered to their global index (see `shard_rollout`); every rank gets the same object."""
    if not w.enabled:
        return out
    offset = group_offset(prompts, w)
    local = dataclasses.replace(out, groups=[_renumber_group(g, step, offset) for g in out.groups],
                                dropped=[_renumber_group(g, step, offset) for g in out.dropped],
                                failed=[_renumber_traj(t, step, offset) for t in out.failed])
    parts = all_gather(local, w)
    metrics = {k: sum(p.metrics.get(k, 0.0) for p in parts) / w.size for k in parts[0].metrics}
    merged = dataclasses.replace(parts[0], groups=[g for p in parts for g in p.groups],
                                 dropped=[g for p in parts for g in p.dropped],
                                 failed=[t for p in parts for t in p.failed], metrics=metrics)
    total = len(merged.failed) + sum(len(g.trajectories) for g in merged.groups + merged.dropped)
    if "rollout/failed" in metrics:
        merged.metrics["rollout/failed"] = float(len(merged.failed))
        merged.metrics["rollout/failed_rate"] = len(merged.failed) / total if total else 0.0
    return merged


def _renumber(group_id: str, step: int, offset: int) -> str:
    m = re.fullmatch(rf"{step}-(\d+)(.*)", group_id)
    return f"{step}-{int(m.group(1)) + offset}{m.group(2)}" if m and offset else group_id


def _renumber_traj(t, step: int, offset: int):
    return dataclasses.replace(t, meta=dataclasses.replace(t.meta, group_id=_renumber(t.meta.group_id, step, offset)))


def _renumber_group(g, step: int, offset: int):
    return dataclasses.replace(g, group_id=_renumber(g.group_id, step, offset),
                               trajectories=tuple(_renumber_traj(t, step, offset) for t in g.trajectories))


def sum_generation_metrics(metrics: dict[str, float], w: World) -> dict[str, float]:
    """Backend metrics of all ranks: counts (`gen/tokens`, `gen/weight_updates`, ...) summed, times
    (`time/*`: the ranks generate at once) the slowest rank's, the rest averaged."""
    if not w.enabled:
        return metrics
    parts = all_gather(metrics, w)
    out = {}
    for k in parts[0]:
        values = [p.get(k, 0.0) for p in parts]
        out[k] = sum(values) if _is_count(k) else max(values) if k.startswith("time/") else sum(values) / w.size
    return out


def _is_count(key: str) -> bool:
    return key.endswith(("tokens", "requests", "calls", "sequences", "updates")) or key.endswith("_count")


# ----------------------------------------------------------------------------- model and gradients


def prepare_model(model, w: World, stage=None):
    """The policy ready for data-parallel training: ddp: rank 0's weights broadcast to all; fsdp2: the
    decoder layers sharded with `fully_shard`, and `stage`'s optimizer (and schedule) rebuilt over the
    sharded parameters with its state (as `stage.resume()` loaded it) sharded alike."""
    if not w.enabled:
        return model
    import torch.distributed as dist

    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    if w.sharded:
        shard_model(model)
        if stage is not None:
            _rebuild_optimizer(stage)
    return model


def _rebuild_optimizer(stage) -> None:
    from torch.distributed.tensor import distribute_tensor

    old, old_schedule = stage.optimizer, stage.scheduler
    params = [p for p in stage.policy.model.parameters() if p.requires_grad]
    new = type(old)(params)  # hyper-parameters come with the state (load_state_dict)
    state = old.state_dict()
    for i, per_param in state["state"].items():
        p = params[i]
        for k, v in per_param.items():
            if _is_dtensor(p) and isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                per_param[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
    new.load_state_dict(state)
    for group in new.param_groups:  # sharded and replicated tensors in one group: no foreach kernels (CUDA)
        group["foreach"] = False
    schedule = torch.optim.lr_scheduler.LambdaLR(new, old_schedule.lr_lambdas[0])
    schedule.load_state_dict(old_schedule.state_dict())
    for g_new, g_old in zip(new.param_groups, old.param_groups):
        g_new["lr"] = g_old["lr"]
    stage.optimizer, stage.scheduler = new, schedule


def shard_model(model) -> None:
    """`fully_shard` each decoder layer (the bulk of the weights). Embeddings, final norm and LM head stay
    replicated (the scoring code calls the decoder and the head directly, outside a root module's
    forward), their gradients summed by `sync_gradients`."""
    from torch.distributed.fsdp import fully_shard

    from tirl.models.loading import base_model

    layers = getattr(base_model(model).get_decoder(), "layers", None)
    if not layers:
        raise ConfigError("distributed.strategy=fsdp2 needs a decoder with a `layers` list (use ddp)")
    for layer in layers:
        fully_shard(layer)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def sync_gradients(modules: Iterable, w: World, bucket_numel: int = 1 << 25) -> None:
    """Sum the gradients of the trainable, unsharded parameters of `modules` over the ranks (divided by
    `w.loss_scale`). A parameter with a gradient on some rank gets the sum (zeros stand in elsewhere);
    one with a gradient on none stays without, as in a single process. Sharded (fsdp2) parameters are
    reduced by their own backward and left alone."""
    if not w.enabled:
        return
    import torch.distributed as dist

    params = [p for m in modules if m is not None for p in m.parameters()
              if p.requires_grad and not _is_dtensor(p)]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    params = [p for p, h in zip(params, has.tolist()) if h]
    if not params:  # no rank has a gradient (e.g. every advantage 0): nothing to sum
        return
    for bucket in _buckets(params, bucket_numel):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in bucket])
        dist.all_reduce(flat)
        if w.loss_scale != 1.0:
            flat /= w.loss_scale
        i = 0
        for p in bucket:
            n = p.numel()
            p.grad = flat[i:i + n].view_as(p).to(p.dtype).clone()
            i += n


def _buckets(params: list, numel: int) -> list[list]:
    out: list[list] = [[]]
    size = 0
    for p in params:
        if out[-1] and size + p.numel() > numel:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return out


# ----------------------------------------------------------------------------- full (unsharded) state


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def generation_weights(model, w: World) -> dict[str, Any]:
    """The weights for the generation backend: `merged_state_dict` (ddp, single process), or the
    sharded model's state gathered to full tensors (fsdp2; every rank must call it)."""
    from tirl.models.loading import merged_state_dict

    if not w.sharded:
        return merged_state_dict(model)
    return {k: _full(v).detach() for k, v in model.state_dict().items()}


def push_weights(backend, weights: dict[str, Any], w: World) -> None:
    """`backend.update_weights(weights)`; when the ranks' backends share their servers (an openai fleet with
    weight sync: `backend.shared_by_ranks`), rank 0 alone pushes and the others wait for it."""
    if not (w.enabled and getattr(backend, "shared_by_ranks", False)):
        backend.update_weights(weights)
        return
    if w.is_main:
        backend.update_weights(weights)
    barrier()


def full_model_state(model, w: World) -> dict[str, torch.Tensor]:
    """Unsharded parameters by name (under fsdp2 every rank must call it and gets the full tensors)."""
    return {n: _full(p).detach() for n, p in model.named_parameters()}


class _FullModel:
    """Full parameters under a model's names: what `CheckpointManager.save` reads of a model."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self._params = params

    def named_parameters(self):
        return iter(self._params.items())


class _FullOptimizer:
    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def full_views(model, optimizer, w: World):
    """`(model, optimizer)` as a checkpoint should see them: themselves, or under fsdp2 (collective) views
    with full tensors in the single-process format, so that any world size loads the checkpoint."""
    if not w.sharded:
        return model, optimizer
    params = {n: torch.nn.Parameter(_full(p).detach(), requires_grad=p.requires_grad)
              for n, p in model.named_parameters()}
    state = optimizer.state_dict()
    state = {"state": {i: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                       for i, st in state["state"].items()},
             "param_groups": [{**g, "foreach": None} for g in state["param_groups"]]}  # see _rebuild_optimizer
    return _FullModel(params), _FullOptimizer(state)


def full_model(model, w: World):
    """The model to save as a transformers directory: itself, or under fsdp2 (collective) an unsharded
    copy on rank 0 (None on the others)."""
    if not w.sharded:
        return model
    from transformers import AutoModelForCausalLM

    from tirl.models.loading import base_model

    weights = full_model_state(model, w)
    if not w.is_main:
        return None
    plain = AutoModelForCausalLM.from_config(base_model(model).config)
    plain.load_state_dict(weights, strict=False)
    plain.tie_weights()
    return plain


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """`torch.nn.utils.clip_grad_norm_` over a mix of sharded (DTensor) and replicated gradients: the norm
    of the global gradient (shards' squares summed over the ranks, replicated ones counted once)."""
    import torch.distributed as dist

    device = params[0].device if params else torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    sharded = torch.zeros((), device=device)  # on the device the backend reduces (nccl: CUDA)
    replicated = torch.zeros((), device=device)
    for p in params:
        if _is_dtensor(p.grad):
            sharded += p.grad.to_local().float().pow(2).sum().to(device)
        else:
            replicated += p.grad.float().pow(2).sum().to(device)
    dist.all_reduce(sharded)
    total = float((sharded + replicated).sqrt())
    if max_norm:
        coef = min(1.0, max_norm / (total + 1e-6))
        for p in params:
            p.grad.mul_(coef)
    return total
