"""One policy update from a batch of scored trajectory groups: advantages, losses, optimizer step.

Pure orchestration of registered functions (`tirl.algorithms`): the estimator and the loss are
looked up by name, never special-cased here; what they need is read from their attributes (an
estimator marked `needs_values` gets a critic) and from the settings. Micro-batches are summed with
global normalisers, so gradient accumulation gives the same update as one full batch.

Before the update (`advantages_for`), a batch that needs them is scored once without gradient: the
old log-probs and, with a critic, the value head's old values `V_old` (module `critic`). Then:

- KL to the reference policy (reference 2.2) goes either into the loss (`kl_placement="loss"`:
  `+ kl_coef * agg(KL(pi || ref))`, with the current log-probs) or into the reward
  (`kl_placement="reward"`: `r_t <- r_t - kl_coef * KL(old || ref)_t` on every sampled token, before
  the estimator sees the rewards).
- The estimator gets the token rewards, the loss mask, group ids, turn ids, each row's correctness
  and tool-call count, the tree (below) and `V_old`; its returns are the critic's targets.
- The loss is the policy loss (+ in-loss KL, - entropy bonus) + `critic_coef * value_loss`, and, with
  replay rows (SPEAR, module `replay`), `+ beta * policy loss` on those rows, with their own
  normalisers and the old log-probs stored when they entered the buffer. During critic warm-up
  (`critic_only`) only the value loss is trained, on detached hidden states.

Rollout trees (reference 4.1): a step shared by several leaves of a tree is trained once, whatever
the estimator. The estimator sees the tree (`AdvantageInput.tree`: each token's step and each step's
parent) and gives per-row advantages as usual (a flat estimator such as `grpo` treats the leaves as
the group's G samples); then every token of a shared step gets the mean of its rows' advantages and
is kept in one row only (`Batch.train_mask`), so the loss, its token counts and the metrics count it
once (with `seq-mean-*` aggregations, a row's mean is over the tokens it keeps, and a row that keeps
none is not counted). Each trajectory's `loss_mask` (and `Batch.mask`) stays exactly as sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tirl.algorithms import (ADVANTAGES, POLICY_LOSSES, AdvantageInput, NeedsTreeError, PolicyLossInput, TreeStructure,
                             agg_loss, kl_in_reward, kl_penalty, loss_normalisers, masked_mean, mean_over_sharing_rows,
                             outcome_token_rewards, owner_mask)
from tirl.errors import ConfigError, InvariantError
from tirl.rollout.tree import ROOT, check_tree, is_tree, node_spans
from tirl.trainer.critic import critic_loss, value_stats
from tirl.trainer.distributed import (World, backward, clip_grad_norm, match_collectives, reduce_accumulated,
                                      sum_over_ranks)
from tirl.trainer.forward import ScoredBatch, response_logprobs
from tirl.trainer.reference import Reference, as_reference
from tirl.types import Trajectory, TrajectoryGroup


@dataclass(frozen=True)
class UpdateSettings:
    """Everything the update needs from the config."""

    advantage: str = "grpo"
    advantage_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "ppo_clip"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    aggregation: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_placement: str = "loss"
    """`loss` or `reward` (module docstring)."""
    entropy_coef: float = 0.0
    epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int = 8
    max_grad_norm: float | None = 1.0
    temperature: float = 1.0
    compute_dtype: torch.dtype = torch.float32
    skip_zero_advantage: bool = True
    """Do not run rows that cannot contribute a gradient (exact; see `_rows_with_gradient`)."""
    critic_coef: float = 0.1
    """Weight of the value loss (when a critic is given)."""
    critic_clip: float | None = 0.5
    """cliprange_value of the value loss (None: unclipped)."""
    critic_only: bool = False
    """Critic warm-up: train only the value head (no policy, KL, entropy or replay terms)."""
    world: World = World()
    """Data-parallel ranks (module `distributed`): each runs its share of every mini-batch's rows."""


@dataclass(frozen=True)
class Batch:
    """The trajectories of one step with their padded response tensors (B rows, T positions)."""

    trajs: list[Trajectory]
    mask: torch.Tensor
    """(B, T) the trajectories' loss masks, as sampled."""
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    """(B, T) log-probs of the policy before the update (None: taken from the first forward)."""
    train_mask: torch.Tensor | None = None
    """(B, T) the tokens the loss covers: `mask` with each token of a shared tree step kept in one row
    only (None: `mask`)."""
    old_values: torch.Tensor | None = None
    """(B, T) the critic's values before the update (None without a critic)."""
    returns: torch.Tensor | None = None
    """(B, T) the estimator's returns: the critic's regression targets."""
    stats: dict[str, float] = field(default_factory=dict)
    """Metrics of the batch itself (in-reward KL, critic statistics), added to the update's."""

    @property
    def trained(self) -> torch.Tensor:
        """(B, T) mask of the tokens trained on (each distinct token once)."""
        return self.mask if self.train_mask is None else self.train_mask


@dataclass(frozen=True)
class _Norms:
    """Loss normalisers of one mini-batch (see `agg_loss`): they make micro-batch losses add up."""

    num_tokens: torch.Tensor
    num_seqs: torch.Tensor
    norm_constant: float


@dataclass(frozen=True)
class _Extras:
    """The optional parts of an update."""

    reference: Reference | None = None
    critic: Any = None
    replay: Batch | None = None
    replay_weight: float = 0.0


def advantages_for(groups: Sequence[TrajectoryGroup], s: UpdateSettings, model=None, critic=None,
                   reference=None) -> Batch:
    """Run the configured estimator on the whole batch (groups define the group ids); on tree groups,
    train each shared step once with the mean advantage of its rows (module docstring). `model` scores
    the batch first when a `critic` (value head) or in-reward KL (with `reference`) asks for it."""
    trajs = [t for g in groups for t in g.trajectories]
    mask = loss_masks(trajs)
    group_ids = torch.tensor([gi for gi, g in enumerate(groups) for _ in g.trajectories])
    tree = tree_structure(groups, mask.shape[1])
    token_rewards, turn_ids = token_rewards_and_turns(trajs, mask)
    in_reward_kl = bool(s.kl_coef) and s.kl_placement == "reward"
    old_logprobs = old_values = None
    if critic is not None or in_reward_kl:
        if model is None:
            raise ValueError("advantages_for: a critic or in-reward KL needs the model to score the batch")
        old_logprobs, old_values = score_without_grad(model, trajs, mask.shape[1], s, critic)
    stats: dict[str, float] = {}
    if in_reward_kl:
        token_rewards, stats = rewards_with_kl(token_rewards, old_logprobs, _reference_logprobs(
            as_reference(reference), trajs, mask.shape[1], s), mask, s.kl_coef, s.kl_estimator)
    inp = AdvantageInput(token_rewards=token_rewards, mask=mask, group_ids=group_ids, values=old_values, tree=tree,
                         turn_ids=turn_ids, correct=row_correct(trajs), tool_calls=row_tool_calls(trajs))
    try:
        adv, returns = ADVANTAGES.get(s.advantage)(inp, **s.advantage_kwargs)
    except NeedsTreeError as e:
        raise ConfigError(f"algorithm.advantage={s.advantage}: {e}") from None
    adv, train_mask = adv.float(), None
    if tree is not None:
        adv = mean_over_sharing_rows(adv, tree.node_B_T) * mask
        train_mask = mask * owner_mask(tree.node_B_T)
    batch = Batch(trajs, mask, adv, old_logprobs=old_logprobs, train_mask=train_mask, old_values=old_values,
                  returns=returns.float() if old_values is not None else None, stats=stats)
    if old_values is not None:
        stats.update(value_stats(old_values, batch.returns, batch.trained))
    return batch


def loss_masks(trajs: Sequence[Trajectory]) -> torch.Tensor:
    """(B, T) float loss masks, padded with 0 to the longest response (T >= 1)."""
    width = max(1, max((len(t.response_ids) for t in trajs), default=0))
    mask = torch.zeros(len(trajs), width)
    for i, t in enumerate(trajs):
        mask[i, :len(t.loss_mask)] = torch.tensor(t.loss_mask, dtype=torch.float32)
    return mask


def row_correct(trajs: Sequence[Trajectory]) -> torch.Tensor:
    """(B,) float: 1.0 for a right answer, 0.0 for a wrong one, NaN where the reward could not tell."""
    return torch.tensor([float("nan") if t.correct is None else float(t.correct) for t in trajs],
                        dtype=torch.float32)


def row_tool_calls(trajs: Sequence[Trajectory]) -> torch.Tensor:
    """(B,) float: the tool calls each row made (every attempt with a result, errors included)."""
    return torch.tensor([float(len(t.tool_results)) for t in trajs], dtype=torch.float32)


def rewards_with_kl(token_rewards_B_T: torch.Tensor, old_logprobs_B_T: torch.Tensor, ref_logprobs_B_T: torch.Tensor,
                    mask_B_T: torch.Tensor, coef: float, estimator: str) -> tuple[torch.Tensor, dict[str, float]]:
    """In-reward KL (`tirl.algorithms.kl_in_reward`: `r_t - coef * KL(old || ref)_t` on mask==1 tokens) and
    its metric `train/kl`, the mean KL over mask==1 tokens."""
    kl_B_T = kl_penalty(old_logprobs_B_T, ref_logprobs_B_T, estimator)
    rewards = kl_in_reward(token_rewards_B_T, old_logprobs_B_T, ref_logprobs_B_T, mask_B_T, coef, estimator)
    return rewards, {"train/kl": float(masked_mean(kl_B_T, mask_B_T))}


def token_rewards_and_turns(trajs: Sequence[Trajectory], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(token_rewards_B_T, turn_ids_B_T)`: each trajectory's reward on its last sampled token, or, when
    the reward gave turn rewards, each on the last sampled token of its turn; and the turn index of every
    sampled token (-1 elsewhere)."""
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    token_rewards = outcome_token_rewards(rewards, mask)
    turn_ids = torch.full(mask.shape, -1, dtype=torch.long)
    for i, t in enumerate(trajs):
        for k, turn in enumerate(t.turns):
            turn_ids[i, turn.gen_start:turn.gen_end] = k
        if t.turn_rewards:
            token_rewards[i] = 0.0
            for turn, r in zip(t.turns, t.turn_rewards):
                if turn.gen_end > turn.gen_start:
                    token_rewards[i, turn.gen_end - 1] += r
                else:  # a turn that sampled nothing: its reward goes to the trajectory's last sampled token
                    token_rewards[i] += outcome_token_rewards(torch.tensor([r]), mask[i:i + 1])[0]
    return token_rewards, turn_ids


def tree_structure(groups: Sequence[TrajectoryGroup], width: int) -> TreeStructure | None:
    """The batch's rollout trees as tensors (None when no group is a tree): the step holding each token
    (-1 on rows of flat groups and on padding), each step's parent, and whether its tool calls all ran
    ok. Nodes are numbered in first-seen order of (group, node id); each tree's root is a node too."""
    if not any(is_tree(g) for g in groups):
        return None
    index: dict[tuple[int, str], int] = {}
    parent: list[int] = []
    tools_ok: list[bool] = []

    def node(key: tuple[int, str], parent_index: int, ok: bool) -> int:
        if key not in index:
            index[key] = len(parent)
            parent.append(parent_index)
            tools_ok.append(ok)
        return index[key]

    node_B_T = torch.full((sum(len(g.trajectories) for g in groups), width), -1, dtype=torch.long)
    row = 0
    for gi, g in enumerate(groups):
        if is_tree(g):
            try:
                check_tree(g)
            except ValueError as e:
                raise InvariantError(f"rollout tree: {e}") from None
            for r, t in enumerate(g.trajectories):
                for (up, name, start, end), turn in zip(node_spans(t), t.turns):
                    up_index = node((gi, up), -1, True) if up == ROOT else index[(gi, up)]
                    node_B_T[row + r, start:end] = node((gi, name), up_index, all(x.ok for x in turn.tool_results))
        row += len(g.trajectories)
    return TreeStructure(node_B_T, torch.tensor(parent, dtype=torch.long), torch.tensor(tools_ok, dtype=torch.bool))


# ----------------------------------------------------------------------------- scoring without gradient


def _score(model, trajs: Sequence[Trajectory], s: UpdateSettings, **kw) -> ScoredBatch:
    return response_logprobs(model, [t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                             [t.loss_mask for t in trajs], temperature=s.temperature, compute_dtype=s.compute_dtype,
                             **kw)


@torch.no_grad()
def score_without_grad(model, trajs: Sequence[Trajectory], width: int, s: UpdateSettings,
                       critic=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(old_logprobs_B_T, old_values_B_T or None)` of the policy (and its value head) as it is now,
    in micro-batches, on the CPU, padded to `width`."""
    old = torch.zeros(len(trajs), width)
    values = torch.zeros(len(trajs), width) if critic is not None else None
    for micro in _chunks(list(range(len(trajs))), s.micro_batch_size):
        scored = _score(model, [trajs[i] for i in micro], s, value_head=critic)
        n = scored.logprobs.shape[1]
        old[micro, :n] = scored.logprobs.float().cpu()
        if values is not None:
            values[micro, :n] = scored.values.cpu()
    return old, values


def with_old_logprobs(model, batch: Batch, s: UpdateSettings) -> Batch:
    """`batch` with the policy's current log-probs as its old log-probs (kept if already there)."""
    if batch.old_logprobs is not None:
        return batch
    return replace(batch, old_logprobs=score_without_grad(model, batch.trajs, batch.mask.shape[1], s)[0])


def _reference_logprobs(reference: Reference | None, trajs: Sequence[Trajectory], width: int,
                        s: UpdateSettings) -> torch.Tensor:
    if reference is None:
        raise ValueError("a KL penalty (kl_coef > 0) needs a reference policy")
    out = torch.zeros(len(trajs), width)
    for micro in _chunks(list(range(len(trajs))), s.micro_batch_size):
        lp = reference.logprobs([trajs[i] for i in micro], temperature=s.temperature, compute_dtype=s.compute_dtype)
        out[micro, :lp.shape[1]] = lp.float().cpu()
    return out


# ----------------------------------------------------------------------------- the update


def rl_update(model, optimizer, batch: Batch, s: UpdateSettings, ref_model=None, critic=None,
              replay: Batch | None = None, replay_weight: float = 0.0) -> dict[str, float]:
    """`epochs` x `minibatches` optimizer steps on `batch`; returns token-weighted metrics of the rows
    that were run (train/loss is the loss of the whole mini-batch) and the batch's own statistics.
    `ref_model`: a `Reference` or a frozen model (in-loss KL); `critic`: the value head (trained
    alongside; `optimizer` must hold its parameters); `replay`: rows trained with weight `replay_weight`
    (split over the mini-batches like the on-policy rows)."""
    if critic is not None and batch.returns is None:
        raise ValueError("rl_update: a critic needs a batch made by advantages_for with that critic (no returns)")
    if s.critic_only and critic is None:
        raise ValueError("rl_update: critic_only (critic warm-up) needs a critic")
    if s.kl_coef and s.kl_placement == "loss" and ref_model is None:
        raise ValueError("rl_update: an in-loss KL penalty (kl_coef > 0) needs a reference policy (ref_model)")
    if s.epochs > 1 or s.minibatches > 1:
        batch = with_old_logprobs(model, batch, s)
    use_replay = replay is not None and len(replay.trajs) > 0 and replay_weight > 0 and not s.critic_only
    extras = _Extras(as_reference(ref_model), critic, replay if use_replay else None, replay_weight)
    minibatches = _split(list(range(len(batch.trajs))), s.minibatches)
    replay_parts = _split_into(list(range(len(replay.trajs))) if use_replay else [], len(minibatches))
    metrics: dict[str, float] = {}
    for _ in range(s.epochs):
        for rows, replay_rows in zip(minibatches, replay_parts):
            metrics = _minibatch_step(model, optimizer, batch, rows, s, extras, replay_rows)
    return {**metrics, **batch.stats}


def _minibatch_step(model, optimizer, batch: Batch, rows: list[int], s: UpdateSettings, ex: _Extras,
                    replay_rows: list[int]) -> dict[str, float]:
    num_tokens, num_seqs = loss_normalisers(batch.trained[rows])
    norms = _Norms(num_tokens, num_seqs, float(batch.mask.shape[1]))
    sums: dict[str, float] = {}
    active = _rows_with_gradient(batch, rows, s, ex.critic)
    micros = _chunks(s.world.share(active), s.micro_batch_size)
    total_loss = 0.0
    for micro in micros:
        loss, weight, micro_metrics = _micro_loss(model, batch, micro, s, ex, norms)
        backward(loss, s.world)
        total_loss += float(loss.detach())
        for k, v in micro_metrics.items():
            sums[k] = sums.get(k, 0.0) + v * weight
    match_collectives(len(micros), lambda: _micro_loss(model, batch, rows[:1], s, ex, norms)[0], s.world)
    replay_metrics = _replay_pass(model, ex.replay, replay_rows, s, ex.replay_weight) if replay_rows else {}
    sums = reduce_accumulated([model, ex.critic], {**sums, "train/loss": total_loss}, s.world)
    total_loss = sums.pop("train/loss", 0.0)
    grad_norm = _clip([model, ex.critic], s.max_grad_norm, s.world)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scored = float(batch.trained[active].sum()) if active else 0.0
    out = {k: v / scored for k, v in sums.items()} if scored else {}
    out["train/loss"] = total_loss + replay_metrics.pop("replay/weighted_loss", 0.0)
    out["train/grad_norm"] = grad_norm
    out["train/tokens"] = float(num_tokens)
    out["train/rows_skipped"] = float(len(rows) - len(active))
    return {**out, **replay_metrics}


def _rows_with_gradient(batch: Batch, rows: list[int], s: UpdateSettings, critic) -> list[int]:
    """Rows whose loss can have a gradient. With no in-loss KL, no entropy term and no critic, a row whose
    advantages are all zero (e.g. a GRPO group where every sample got the same reward) contributes
    exactly nothing, so it is not run at all; the normalisers still count it, so the update is unchanged."""
    in_loss_kl = bool(s.kl_coef) and s.kl_placement == "loss"
    if in_loss_kl or s.entropy_coef or critic is not None or not s.skip_zero_advantage:
        return rows
    return [i for i in rows if bool((batch.advantages[i] * batch.trained[i]).abs().sum() > 0)]


def _micro_loss(model, batch: Batch, micro: list[int], s: UpdateSettings, ex: _Extras, norms: _Norms):
    """`(loss, tokens, metrics)` of one micro-batch: metrics are means over its trained tokens."""
    trajs = [batch.trajs[i] for i in micro]
    scored = _score(model, trajs, s, with_entropy=True, entropy_grad=s.entropy_coef != 0.0 and not s.critic_only,
                    value_head=ex.critic, value_trunk_grad=not s.critic_only)
    width = scored.logprobs.shape[1]
    mask = batch.trained[micro, :width].to(scored.logprobs.device)
    n = float(mask.sum())
    loss = torch.zeros((), device=mask.device)
    metrics: dict[str, float] = {}
    if not s.critic_only:
        loss, metrics = _policy_terms(scored, batch, micro, mask, s, ex.reference, norms)
    if ex.critic is not None:
        old_values = batch.old_values[micro, :width].to(mask.device)
        returns = batch.returns[micro, :width].to(mask.device)
        vf, vf_metrics = critic_loss(scored.values, old_values, returns, mask, s.critic_clip, norms.num_tokens)
        loss = loss + s.critic_coef * vf
        # vf is this micro-batch's share of the mini-batch's token mean; as a mean over its own tokens:
        metrics["critic/vf_loss"] = float(vf.detach()) * float(norms.num_tokens) / max(n, 1.0)
        metrics["critic/vf_clipfrac"] = float(vf_metrics["vf_clipfrac"])
    metrics["train/entropy"] = float((scored.entropy.detach() * mask).sum()) / max(n, 1.0)
    metrics["train/logprob_mismatch"] = _mismatch(trajs, scored.logprobs.detach(), mask)
    return loss, n, metrics


def _policy_terms(scored: ScoredBatch, batch: Batch, micro: list[int], mask: torch.Tensor, s: UpdateSettings,
                  reference: Reference | None, norms: _Norms) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy loss, plus `kl_coef * agg(KL)` (in-loss placement) and minus `entropy_coef * agg(entropy)`."""
    width = scored.logprobs.shape[1]
    adv = batch.advantages[micro, :width].to(mask.device)
    old = (batch.old_logprobs[micro, :width].to(mask.device) if batch.old_logprobs is not None
           else scored.logprobs.detach())
    loss, metrics = _policy_loss(scored, old, adv, mask, s, norms)
    if s.kl_coef and s.kl_placement == "loss":
        ref = reference.logprobs([batch.trajs[i] for i in micro], temperature=s.temperature,
                                 compute_dtype=s.compute_dtype)[:, :width].to(mask.device)
        kl = kl_penalty(scored.logprobs, ref, s.kl_estimator)
        loss = loss + s.kl_coef * _agg(kl, mask, s, norms)
        metrics["train/kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    if s.entropy_coef:
        loss = loss - s.entropy_coef * _agg(scored.entropy, mask, s, norms)
    return loss, metrics


def _policy_loss(scored: ScoredBatch, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, s: UpdateSettings,
                 norms: _Norms) -> tuple[torch.Tensor, dict[str, float]]:
    """The registered policy loss of one micro-batch, with the mini-batch's normalisers."""
    entropy = scored.entropy.detach() if scored.entropy is not None else None
    inp = PolicyLossInput(scored.logprobs, old, adv, mask, s.aggregation, num_tokens=norms.num_tokens,
                          num_seqs=norms.num_seqs, norm_constant=norms.norm_constant, entropy=entropy)
    loss, loss_metrics = POLICY_LOSSES.get(s.loss)(inp, **s.loss_kwargs)
    return loss, {f"train/{k}": float(v) for k, v in loss_metrics.items()}


def _agg(values: torch.Tensor, mask: torch.Tensor, s: UpdateSettings, norms: _Norms) -> torch.Tensor:
    return agg_loss(values, mask, s.aggregation, num_tokens=norms.num_tokens, num_seqs=norms.num_seqs,
                    norm_constant=norms.norm_constant)


def _replay_pass(model, replay: Batch, rows: list[int], s: UpdateSettings, weight: float) -> dict[str, float]:
    """Backward of `weight * policy loss` over the replay rows (SPEAR, reference 4.3), normalised over
    these rows alone, with the old log-probs stored at insertion. Returns `replay/*` metrics (token
    means) and `replay/weighted_loss`, the term added to the loss."""
    num_tokens, num_seqs = loss_normalisers(replay.trained[rows])
    norms = _Norms(num_tokens, num_seqs, float(replay.mask.shape[1]))
    sums: dict[str, float] = {}
    total = 0.0
    for micro in _chunks(s.world.share(rows), s.micro_batch_size):
        scored = _score(model, [replay.trajs[i] for i in micro], s, with_entropy=True)
        width = scored.logprobs.shape[1]
        mask = replay.trained[micro, :width].to(scored.logprobs.device)
        old = replay.old_logprobs[micro, :width].to(mask.device)
        adv = replay.advantages[micro, :width].to(mask.device)
        loss, metrics = _policy_loss(scored, old, adv, mask, s, norms)
        (weight * loss).backward()
        total += float(loss.detach())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * float(mask.sum())
    if s.world.enabled:
        sums = sum_over_ranks({**sums, "replay/_loss": total}, s.world)
        total = sums.pop("replay/_loss")
    tokens = max(float(num_tokens), 1.0)
    out = {k.replace("train/", "replay/"): v / tokens for k, v in sums.items()}
    return {**out, "replay/loss": total, "replay/weighted_loss": weight * total, "replay/tokens": float(num_tokens)}


def _mismatch(trajs: list[Trajectory], logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |log pi_train - log pi_sample| over sampled tokens (sampler/trainer numeric drift)."""
    sample = torch.zeros_like(logprobs)
    for i, t in enumerate(trajs):
        n = min(len(t.logprobs), logprobs.shape[1])
        sample[i, :n] = torch.tensor(t.logprobs[:n], dtype=logprobs.dtype)
    return float(((logprobs - sample).abs() * mask).sum() / mask.sum().clamp(min=1))


def _clip(modules, max_norm: float | None, world: World = World()) -> float:
    params = [p for m in modules if m is not None for p in m.parameters() if p.grad is not None]
    if world.sharded:
        return clip_grad_norm(params, max_norm)
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    return float(norm)


def _split(rows: list[int], parts: int) -> list[list[int]]:
    size = -(-len(rows) // parts)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _split_into(rows: list[int], parts: int) -> list[list[int]]:
    """Exactly `parts` consecutive slices of `rows` (some empty when there are fewer rows)."""
    size = -(-len(rows) // parts) if rows else 0
    return [rows[k * size:(k + 1) * size] for k in range(parts)]


def _chunks(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]
