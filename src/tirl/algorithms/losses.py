"""Policy losses, loss aggregation, KL penalties, the critic loss and masked statistics.

Pure torch functions. Shapes: `B` rows (sequences), `T` token positions, `V` vocabulary entries.
Every per-token term is multiplied by the loss mask `mask_B_T` (1 = token sampled by the policy,
0 = prompt, tool output or padding) before it reaches a loss, so masked tokens never get gradient.
Log-probabilities are natural-log (nats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tirl.algorithms.registry import register_policy_loss

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
"""Loss aggregation modes understood by `agg_loss` (reference section 2.3)."""

KL_KINDS = ("k1", "kl", "k2", "mse", "abs", "k3", "low_var_kl")
"""KL estimator names understood by `kl_penalty`; each may also carry a `+` suffix (straight-through)."""

_KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
_LOG_RATIO_CLAMP = 20.0
_K3_CLAMP = 10.0

Normaliser = float | int | Tensor | None


# --------------------------------------------------------------------------------------------
# masked statistics


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `values` where `mask` is 1 (over all elements, or along `dim`).

    Masked positions are selected out, not multiplied by 0, so a non-finite value there (say a
    `-inf` log-prob on padding) cannot turn the sum into NaN.
    """
    selected = torch.where(mask.bool(), values, torch.zeros_like(values))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` over the positions where `mask` is 1; 0 where the mask is empty.

    `values` and `mask` share a shape (e.g. `(B, T)`); the result is a scalar, or has `dim` removed.
    """
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp_min(1e-8)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` over the mask==1 positions (scalar), Bessel-corrected when `unbiased`.

    Raises ValueError when the mask selects no element, or exactly one with `unbiased=True`
    (the variance is undefined there; verl raises too).
    """
    count = mask.to(values.dtype).sum()
    if count.item() == 0:
        raise ValueError("masked_var: the mask selects no element")
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        if count.item() == 1:
            raise ValueError("masked_var: the mask selects one element; the unbiased variance is undefined")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """`(values - mean) / sqrt(var + 1e-8)` with mean and unbiased variance over mask==1 positions.

    Statistics are pooled over every masked-in element of the tensor (the whole batch, not per row),
    as verl's `masked_whiten`. With `shift_mean=False` the mean is added back (scale only). The
    result covers every position, masked or not; callers multiply by the mask where it matters.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    return whitened if shift_mean else whitened + mean


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy in nats of the categorical distribution at each position: `(..., V) -> (...)`.

    Computed in float32 from `log_softmax`, so it is stable for large logits; `-inf` logits (banned
    tokens) contribute 0 and give no NaN in the value or the gradient.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    finite = torch.isfinite(logp)
    logp = torch.where(finite, logp, torch.zeros_like(logp))
    return -(logp.exp() * finite * logp).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# aggregation


def loss_normalisers(mask_B_T: Tensor) -> tuple[Tensor, Tensor]:
    """`(num_tokens, num_seqs)` of a batch: mask==1 tokens, and rows with at least one of them.

    The trainer computes these once per mini-batch (and sums them over data-parallel ranks) and
    passes them to every micro-batch's `agg_loss` so that micro-batch losses add up exactly.
    """
    mask = mask_B_T.float()
    return mask.sum(), (mask.sum(dim=-1) > 0).float().sum()


def _divide(numerator: Tensor, denominator: Normaliser, what: str) -> Tensor:
    denom = torch.as_tensor(denominator, dtype=numerator.dtype, device=numerator.device)
    if (denom < 0).any():
        raise ValueError(f"agg_loss: {what} must be >= 0, got {denom.item()}")
    return numerator / denom.clamp_min(1e-8)


def agg_loss(
    loss_B_T: Tensor,
    mask_B_T: Tensor,
    mode: str,
    *,
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_constant: Normaliser = None,
) -> Tensor:
    """Reduce a per-token loss `(B, T)` to a scalar over the mask==1 tokens (reference section 2.3).

    - `token-mean`: sum(m L) / num_tokens
    - `seq-mean-token-mean`: sum_i [sum_t m L / sum_t m] / num_seqs
    - `seq-mean-token-sum`: sum_i sum_t m L / num_seqs
    - `seq-mean-token-sum-norm`: sum(m L) / norm_constant (as verl: no division by the number of
      sequences; Dr.GRPO's 1/G is a constant factor on top of this)

    `num_tokens` (mask==1 tokens) and `num_seqs` (rows with at least one mask==1 token; fully
    masked rows never count) default to this batch's own counts. When a mini-batch is split into
    micro-batches or across data-parallel ranks, pass the counts of the WHOLE mini-batch (see
    `loss_normalisers`): the micro-batch losses then sum to the full-batch loss, value and gradient.
    Under DDP, which averages gradients over ranks, multiply each rank's loss by the world size.
    `norm_constant` defaults to T, this batch's padded length; when splitting (micro-batches may be
    trimmed to different lengths) the trainer must pass one fixed constant, e.g. the max response
    length. An empty mask gives 0. An unknown mode raises ValueError naming the valid modes.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    if loss_B_T.shape != mask_B_T.shape or loss_B_T.dim() != 2:
        raise ValueError(f"agg_loss: loss {tuple(loss_B_T.shape)} and mask {tuple(mask_B_T.shape)} must both be (B, T)")
    mask = mask_B_T.to(loss_B_T.dtype)
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return _divide(masked_sum(loss_B_T, mask), denom, "num_tokens")
    if mode == "seq-mean-token-sum-norm":
        denom = loss_B_T.shape[-1] if norm_constant is None else norm_constant
        return _divide(masked_sum(loss_B_T, mask), denom, "norm_constant")
    seq_sum_B = masked_sum(loss_B_T, mask, dim=-1)
    tokens_B = mask.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        seq_sum_B = seq_sum_B / tokens_B.clamp_min(1e-8)  # fully masked rows: 0 / eps = 0
    denom = (tokens_B > 0).to(loss_B_T.dtype).sum() if num_seqs is None else num_seqs
    return _divide(seq_sum_B.sum(), denom, "num_seqs")


# --------------------------------------------------------------------------------------------
# policy losses


@dataclass(frozen=True)
class PolicyLossInput:
    """What every policy loss receives; all tensors are `(B, T)` and share one shape."""

    logprobs: Tensor
    """Log-probs (nats) of the taken tokens under the current policy; carries the gradient."""
    old_logprobs: Tensor
    """Log-probs of the same tokens under the behaviour policy that sampled them (no gradient)."""
    advantages: Tensor
    """Per-token advantages (from an advantage estimator)."""
    mask: Tensor
    """Loss mask: 1 on tokens sampled by the policy, 0 on prompt, tool output and padding."""
    agg_mode: str = "token-mean"
    """Aggregation mode, one of `AGG_MODES`."""
    num_tokens: Normaliser = None
    """Global mask==1 token count of the mini-batch (see `agg_loss`); None: this batch's."""
    num_seqs: Normaliser = None
    """Global count of non-empty sequences of the mini-batch (see `agg_loss`); None: this batch's."""
    norm_constant: Normaliser = None
    """C of `seq-mean-token-sum-norm` (see `agg_loss`); None: this batch's padded length T."""
    entropy: Tensor | None = None
    """(B, T) entropy (nats) of the current policy at each position, for entropy-aware losses (AEPO);
    treated as a constant (no gradient flows through it). None when the trainer did not compute it."""

    def __post_init__(self) -> None:
        names = ("logprobs", "old_logprobs", "advantages", "mask") + (("entropy",) if self.entropy is not None else ())
        shapes = {name: tuple(getattr(self, name).shape) for name in names}
        if len(set(shapes.values())) != 1 or len(shapes["logprobs"]) != 2:
            raise ValueError(f"PolicyLossInput tensors must all be (B, T) with one shape; got {shapes}")
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"unknown loss aggregation mode {self.agg_mode!r}; valid modes: {', '.join(AGG_MODES)}")

    def aggregate(self, loss_B_T: Tensor) -> Tensor:
        """`agg_loss` of a per-token loss with this input's mask, mode and normalisers."""
        return agg_loss(loss_B_T, self.mask, self.agg_mode, num_tokens=self.num_tokens,
                        num_seqs=self.num_seqs, norm_constant=self.norm_constant)


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    inp: PolicyLossInput,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with optional dual clip, as verl `compute_policy_loss_vanilla` (ref. 2.1).

    `ratio = exp(clamp(logp - old_logp, -20, 20))`; per token `Lc = max(-A ratio, -A clip(ratio,
    1 - clip_low, 1 + clip_high))`, and where A < 0, `min(Lc, -A dual_clip)` (dual_clip > 1; None
    turns it off). DAPO's clip-higher is `clip_high=0.28`. Returns the aggregated scalar loss and
    detached metrics, masked means over this batch's tokens: `pg_clipfrac` (fraction of tokens
    where the clipped term is active), `pg_clipfrac_lower` (dual clip active), `ppo_kl`
    (mean of old_logp - logp) and `ratio_mean`.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"ppo_clip: dual_clip must be > 1 (or None to disable), got {dual_clip}")
    log_ratio = inp.logprobs - inp.old_logprobs
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    adv = inp.advantages
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_B_T = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(loss_B_T, dtype=torch.bool)
    if dual_clip is not None:
        dual_bound = -adv * dual_clip
        dual_active = (adv < 0) & (loss_B_T > dual_bound)
        loss_B_T = torch.where(adv < 0, torch.minimum(loss_B_T, dual_bound), loss_B_T)
    mask = inp.mask
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "pg_clipfrac_lower": masked_mean(dual_active.float(), mask),
            "ppo_kl": masked_mean(-log_ratio.detach(), mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
        }
    return inp.aggregate(loss_B_T), metrics


# --------------------------------------------------------------------------------------------
# KL penalty and critic loss


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate between the policy and the reference policy (reference section 2.2).

    With `d = logprobs - ref_logprobs` (both `(B, T)`, nats): `k1`/`kl` = d, `k2`/`mse` = d²/2,
    `abs` = |d|, `k3`/`low_var_kl` = clamp(exp(x) - x - 1, -10, 10) with x = clamp(-d, -20, 20)
    (the DeepSeekMath estimator). A `+` suffix (e.g. `k3+`) keeps the forward value of the kind but
    takes the gradient of k2 (straight-through: `k2 - sg(k2) + sg(kind)`). Returns `(B, T)`,
    unmasked: aggregate it with `agg_loss` (in-loss) or subtract it from token rewards (in-reward).
    Unknown kind: ValueError naming the valid kinds.
    """
    straight_through = kind.endswith("+")
    name = kind[:-1] if straight_through else kind
    base = _KL_ALIASES.get(name, name)
    if base not in ("k1", "k2", "abs", "k3"):
        valid = ", ".join(KL_KINDS)
        raise ValueError(f"unknown KL kind {kind!r}; valid kinds: {valid} (each optionally with a '+' suffix)")
    diff = logprobs - ref_logprobs
    if base == "k1":
        forward = diff
    elif base == "k2":
        forward = 0.5 * diff.square()
    elif base == "abs":
        forward = diff.abs()
    else:
        x = (-diff).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        forward = (torch.exp(x) - x - 1.0).clamp(-_K3_CLAMP, _K3_CLAMP)
    if not straight_through or base == "k2":
        return forward
    k2 = 0.5 * diff.square()
    return k2 - k2.detach() + forward.detach()


@torch.no_grad()
def kl_in_reward(
    token_rewards: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, coef: float, kind: str = "k1"
) -> Tensor:
    """KL in the reward (reference 2.2, PPO / REINFORCE++ placement): `r_t - coef * KL_t` on mask==1 tokens.

    `KL_t = kl_penalty(old_logprobs, ref_logprobs, kind)`: the behaviour policy that sampled the
    tokens against the reference policy (k1: `old_logp - ref_logp`). All `(B, T)`; returns float32
    `(B, T)` rewards, unchanged where mask == 0 (a non-finite log-prob there is ignored). No gradient.
    """
    if not token_rewards.shape == old_logprobs.shape == ref_logprobs.shape == mask.shape:
        raise ValueError(f"kl_in_reward: token_rewards {tuple(token_rewards.shape)}, old_logprobs "
                         f"{tuple(old_logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must share one shape")
    rewards = token_rewards.to(torch.float32)
    kl = kl_penalty(old_logprobs.to(torch.float32), ref_logprobs.to(torch.float32), kind)
    return torch.where(mask.bool(), rewards - coef * kl, rewards)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = 0.5,
    agg_mode: str = "token-mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_constant: Normaliser = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped critic loss `0.5 * agg(max((V - R)², (clip(V, V_old - clip, V_old + clip) - R)²))`.

    All tensors `(B, T)`: `values` from the critic being trained (gradient), `old_values` from the
    critic that produced the returns, `returns` the regression targets (GAE: A + V_old). `clip` is
    verl's `cliprange_value` (None: no clipping). Aggregation and normalisers as in `agg_loss`.
    Returns the loss and the detached metric `vf_clipfrac` (tokens where the clipped term is larger).
    """
    loss1 = (values - returns).square()
    if clip is None:
        loss2 = loss1
    else:
        loss2 = (torch.clamp(values, old_values - clip, old_values + clip) - returns).square()
    loss_B_T = torch.maximum(loss1, loss2)
    loss = 0.5 * agg_loss(loss_B_T, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                          norm_constant=norm_constant)
    with torch.no_grad():
        clipfrac = masked_mean((loss2 > loss1).float(), mask)
    return loss, {"vf_clipfrac": clipfrac}
