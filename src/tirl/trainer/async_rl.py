"""Asynchronous RL (`rl.max_staleness = k >= 1`): the rollout of later steps runs while the trainer updates.

Schedule. Version v is the policy after v updates. Step s samples its batch with version
`v(s) = max(s0, s - k)` (s0: the step the run started or resumed at) and update s trains on it at
version s, so a batch is at most k versions old (exactly k once the pipeline is full). A producer
thread, with an event loop of its own, generates the steps in order; before step s it waits until the
trainer has published version v(s) and loads it into the backend. Weights change only between two
rollouts, so every trajectory is sampled by one version and nothing else touches the backend while it
generates. The trainer publishes a copy of the generation weights after each update (dropped once
loaded); the producer runs at most k + 1 steps ahead. Versions are exact, not "the newest": thread
timing decides when work happens, never what is computed, so a seeded run is reproducible.

Off-policy correction (decoupled PPO: Hilton et al. 2022, "Batch size-invariance for policy
optimization"; AReaL, Fu et al. 2025). The proximal policy is the policy at the start of the update
(`old_logprobs`, scored by the trainer): the registered loss clips `pi_theta / pi_old` as in
synchronous training. Each sampled token's advantage is multiplied by its behaviour weight
`w_t = min(exp(old_logprob_t - sample_logprob_t), C)`, `sample_logprob_t` being what the backend
reported when it sampled the token (truncated importance sampling, `C = rl.is_cap`, null:
untruncated). Every registered loss is positively homogeneous in a token's advantage (ppo_clip and its
dual clip: `min(r*w*A, clip(r)*w*A) = w*min(r*A, clip(r)*A)` for w > 0; gspo per token; cispo), so
scaling A gives the decoupled objective exactly; clip_cov and kl_cov pick their tokens from the
weighted advantages.

Checkpoints. A checkpoint after update n also holds the batches of steps n .. n+k-1 (sampled with
versions before n; the trainer waits for any still in flight), and the data cursor, reward state and
strategy state as they were after the last of them. A resumed run trains on those first and samples
step n+k with version n: it retraces the uninterrupted run.

The backend may be any generator, Ray rollout workers included (`cluster.enabled`: the weights
pushed by version, as in synchronous training). Not supported (a `ConfigError`): torch.distributed
data parallelism, information gain (IGPO).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from tirl.errors import ConfigError, InvariantError
from tirl.rollout.groups import StrategyOutput
from tirl.rollout.io import from_dict, to_dict
from tirl.types import Trajectory, TrajectoryGroup, TreeEdge

CLOSE_TIMEOUT_S = 30.0
"""How long `close` waits for the producer to finish the rollout it is in."""


def check_config(cfg) -> None:
    """What the asynchronous mode cannot run with, as a `ConfigError` naming the key."""
    k = cfg.rl.max_staleness
    if not k:
        return
    if cfg.distributed.strategy in ("ddp", "fsdp2"):
        raise ConfigError(f"rl.max_staleness={k} (asynchronous RL) cannot be combined with "
                          f"distributed.strategy={cfg.distributed.strategy} yet")
    if cfg.algorithm.info_gain.enabled:
        raise ConfigError(f"rl.max_staleness={k} (asynchronous RL) cannot be combined with "
                          "algorithm.info_gain.enabled=true")


# ----------------------------------------------------------------------------- off-policy correction


def sampling_logprobs(trajs: list[Trajectory], width: int) -> torch.Tensor:
    """(B, width) each trajectory's sampling log-probs (0 past its end and on inserted tokens)."""
    out = torch.zeros(len(trajs), width)
    for i, t in enumerate(trajs):
        n = min(len(t.logprobs), width)
        out[i, :n] = torch.tensor(t.logprobs[:n], dtype=torch.float32)
    return out


def behaviour_weights(old_B_T: torch.Tensor, sampled_B_T: torch.Tensor, mask_B_T: torch.Tensor,
                      cap: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """`w = min(exp(old - sampled), cap)` on mask == 1 tokens (1 elsewhere), and its metrics: the mean
    weight before truncation, the share of tokens truncated, and `k3` KL(sample || old) estimate
    `mean(w_raw - 1 - log w_raw)`. A NaN sampling log-prob on a sampled token is an `InvariantError`."""
    on = mask_B_T > 0
    if torch.isnan(sampled_B_T[on]).any():
        raise InvariantError("asynchronous RL needs the sampling log-prob of every sampled token; the backend "
                             "reported NaN for some (a chat endpoint without logprobs?)")
    log_w = torch.where(on, old_B_T.float() - sampled_B_T.float(), torch.zeros_like(old_B_T, dtype=torch.float32))
    raw = torch.exp(log_w.clamp(max=20.0))
    w = raw.clamp(max=cap) if cap is not None else raw
    n = float(on.sum().clamp(min=1))
    metrics = {"async/is_weight_mean": float(raw[on].sum()) / n,
               "async/is_truncated_frac": float((raw[on] > cap).sum()) / n if cap is not None else 0.0,
               "async/kl_sample_old": float((raw - 1 - log_w)[on].sum()) / n}
    return torch.where(on, w, torch.ones_like(w)), metrics


def with_behaviour_correction(batch, cap: float | None):
    """`(batch with its advantages times the behaviour weights, metrics)`; `batch.old_logprobs` must be set
    (`update.with_old_logprobs`)."""
    if batch.old_logprobs is None:
        raise ValueError("with_behaviour_correction needs the batch's old log-probs")
    sampled = sampling_logprobs(batch.trajs, batch.mask.shape[1])
    w, metrics = behaviour_weights(batch.old_logprobs, sampled, batch.mask, cap)
    return replace(batch, advantages=batch.advantages * w), metrics


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class Produced:
    """One step's rollout, made ahead of its update."""

    step: int
    version: int
    """The policy version that sampled it (updates applied to its weights)."""
    out: StrategyOutput
    metrics: dict[str, float] = field(default_factory=dict)
    """Generation metrics and the rollout's wall time (`time/rollout_s`)."""
    state: dict[str, Any] = field(default_factory=dict)
    """The run state after this rollout: data cursor, reward state, strategy state (for checkpoints)."""


Produce = Callable[[Any, int], tuple[StrategyOutput, dict[str, float], dict[str, Any]]]
"""`produce(runner, step) -> (output, metrics, state after)`: one step's rollout on the producer's
`asyncio.Runner`, with the backend's current weights."""


class RolloutPipeline:
    """Runs `produce` for steps `first .. end-1` on a thread, each with version `max(start, s - k)`."""

    def __init__(self, produce: Produce, load_weights: Callable[[dict[str, Any]], None], start: int, end: int,
                 k: int, ready: list[Produced] = ()):
        """`start`: the step (= version) the run starts at, whose weights the backend holds; `ready`: the
        batches of steps start, start+1, ... restored from a checkpoint (the producer begins after them)."""
        if [p.step for p in ready] != list(range(start, start + len(ready))):
            raise ValueError(f"restored batches must be steps {start}.., got {[p.step for p in ready]}")
        self.start, self.end, self.k = start, end, k
        self._produce, self._load = produce, load_weights
        self._items: dict[int, Produced] = {p.step: p for p in ready}
        self._snapshots: dict[int, dict[str, Any]] = {}
        self._loaded = start
        self._error: BaseException | None = None
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(start + len(ready),), name="tirl-rollouts",
                                        daemon=True)
        self._thread.start()

    def version_for(self, step: int) -> int:
        return max(self.start, step - self.k)

    # ------------------------------------------------------------------ trainer side
    def get(self, step: int) -> Produced:
        """Step `step`'s batch (waits for it); the producer's error, if it failed."""
        with self._cv:
            self._cv.wait_for(lambda: step in self._items or self._error is not None or self._stop)
            if step not in self._items:
                self._raise()
            return self._items.pop(step)

    def publish(self, version: int, weights: Callable[[], dict[str, Any]]) -> None:
        """The trainer reached `version`; `weights()` gives its generation weights. A copy is kept when a
        later step will sample with it."""
        if not any(self.version_for(s) == version for s in range(version, self.end)):
            return
        copy = {name: t.detach().clone() if isinstance(t, torch.Tensor) else t for name, t in weights().items()}
        with self._cv:
            self._snapshots[version] = copy
            self._cv.notify_all()

    def ready_after(self, step: int) -> list[Produced]:
        """The batches of steps `step .. step+k-1` (fewer at the end of the run), waiting for any still being
        generated; they stay queued. A checkpoint after update `step` saves them."""
        wanted = range(step, min(step + self.k, self.end))
        with self._cv:
            self._cv.wait_for(lambda: all(s in self._items for s in wanted) or self._error is not None)
            if not all(s in self._items for s in wanted):
                self._raise()
            return [self._items[s] for s in wanted]

    def close(self) -> None:
        """Stop after the rollout in progress (waits up to `CLOSE_TIMEOUT_S`)."""
        with self._cv:
            self._stop = True
            self._snapshots.clear()
            self._cv.notify_all()
        self._thread.join(timeout=CLOSE_TIMEOUT_S)

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"asynchronous rollout failed: {self._error}") from self._error
        raise RuntimeError("asynchronous rollout was stopped")

    # ------------------------------------------------------------------ producer side
    def _run(self, first: int) -> None:
        import asyncio

        try:
            with asyncio.Runner() as runner:
                for step in range(first, self.end):
                    if not self._weights_for(self.version_for(step)):
                        return
                    t0 = time.monotonic()
                    out, metrics, state = self._produce(runner, step)
                    metrics = {**metrics, "time/rollout_s": time.monotonic() - t0}
                    with self._cv:
                        self._items[step] = Produced(step, self.version_for(step), out, metrics, state)
                        self._cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the trainer's `get`
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _weights_for(self, version: int) -> bool:
        """Load `version` into the backend (waiting for the trainer to publish it); False when stopped."""
        if version == self._loaded:
            return not self._stop
        with self._cv:
            self._cv.wait_for(lambda: version in self._snapshots or self._stop)
            if self._stop:
                return False
            weights = self._snapshots.pop(version)
            for old in [v for v in self._snapshots if v < version]:
                del self._snapshots[old]
        self._load(weights)
        self._loaded = version
        return True


# ----------------------------------------------------------------------------- checkpoints


def produced_to_state(p: Produced) -> dict[str, Any]:
    """A JSON-safe form of a restored-on-resume batch."""
    out = p.out
    return {"step": p.step, "version": p.version, "metrics": p.metrics, "state": p.state,
            "groups": [_group_to_state(g) for g in out.groups], "dropped": [_group_to_state(g) for g in out.dropped],
            "failed": [to_dict(t) for t in out.failed], "out_metrics": out.metrics}


def produced_from_state(d: dict[str, Any]) -> Produced:
    out = StrategyOutput([_group_from_state(g) for g in d["groups"]], [from_dict(t) for t in d["failed"]],
                         [_group_from_state(g) for g in d["dropped"]], dict(d["out_metrics"]))
    return Produced(d["step"], d["version"], out, dict(d["metrics"]), d["state"])


def _group_to_state(g: TrajectoryGroup) -> dict[str, Any]:
    return {"group_id": g.group_id, "task_id": g.task_id, "trajectories": [to_dict(t) for t in g.trajectories],
            "edges": [asdict(e) for e in g.edges]}


def _group_from_state(d: dict[str, Any]) -> TrajectoryGroup:
    return TrajectoryGroup(d["group_id"], d["task_id"], tuple(from_dict(t) for t in d["trajectories"]),
                           tuple(TreeEdge(**e) for e in d["edges"]))
