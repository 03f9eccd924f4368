"""Policy losses beyond PPO's clipped surrogate: GSPO, CISPO, AEPO and Clip-Cov.

Same contract as `ppo_clip` (`tirl.algorithms.losses`): `fn(inp: PolicyLossInput, **params) ->
(loss, metrics)`, the per-token loss aggregated by `inp.aggregate` (mode and global normalisers, so
micro-batch losses add up to the full-batch loss), and the detached metrics `pg_clipfrac`,
`pg_clipfrac_lower`, `ppo_kl` (masked mean of old_logp - logp) and `ratio_mean` (masked means over
this batch's tokens; each loss says what its clip fractions count). Log-probabilities at mask==0
positions are replaced by 0 before use, so a non-finite value there reaches neither loss nor gradient.

Two terms are local to the batch the loss sees, by their definition: AEPO's entropy z-score (over the
micro-batch's tokens) and Clip-Cov's covariance selection (micro-batch means, a count proportional to
its tokens, random choice). Everything else is per token or per row, so splitting a mini-batch into
micro-batches or data-parallel shards with global normalisers gives the same loss and gradient.

SPEAR's self-imitation term is not a loss of its own: it is a policy loss on replayed rows with
recalibrated advantages, weighted by a warm-up schedule, which the trainer's replay buffer adds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tirl.algorithms.losses import PolicyLossInput, masked_mean, masked_sum, masked_whiten
from tirl.algorithms.registry import register_policy_loss

_LOG_RATIO_CLAMP = 20.0
_GSPO_LOG_RATIO_MAX = 10.0


def _masked_inputs(inp: PolicyLossInput) -> tuple[Tensor, Tensor, Tensor]:
    """`(logprobs, old_logprobs, advantages)` with 0 wherever mask == 0 (gradient still flows elsewhere)."""
    keep = inp.mask.bool()
    logp = torch.where(keep, inp.logprobs, torch.zeros_like(inp.logprobs))
    old = torch.where(keep, inp.old_logprobs, torch.zeros_like(inp.old_logprobs)).detach()
    adv = torch.where(keep, inp.advantages, torch.zeros_like(inp.advantages)).detach()
    return logp, old, adv


def _metrics(log_ratio: Tensor, ratio: Tensor, mask: Tensor, clipped: Tensor, lower: Tensor) -> dict[str, Tensor]:
    """The `ppo_clip` metric names: clip fractions of the two given bool masks, `ppo_kl`, `ratio_mean`."""
    with torch.no_grad():
        return {
            "pg_clipfrac": masked_mean(clipped.float(), mask),
            "pg_clipfrac_lower": masked_mean(lower.float(), mask),
            "ppo_kl": masked_mean(-log_ratio.detach(), mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
        }


def _apply_dual_clip(loss_B_T: Tensor, adv_B_T: Tensor, dual_clip: float | None) -> tuple[Tensor, Tensor]:
    """Where A < 0, `min(loss, -A * dual_clip)` (verl's dual clip); returns the loss and where the bound is active."""
    if dual_clip is None:
        return loss_B_T, torch.zeros_like(loss_B_T, dtype=torch.bool)
    if dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    bound = -adv_B_T * dual_clip
    active = (adv_B_T < 0) & (loss_B_T > bound)
    return torch.where(adv_B_T < 0, torch.minimum(loss_B_T, bound), loss_B_T), active


def _check_clip(name: str, clip_low: float, clip_high: float) -> None:
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"{name}: clip_low and clip_high must be >= 0, got {clip_low} and {clip_high}")


# --------------------------------------------------------------------------------------------
# GSPO and CISPO


@register_policy_loss("gspo")
def gspo_loss(inp: PolicyLossInput, *, clip_low: float = 3e-4,
              clip_high: float = 4e-4) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Qwen, arXiv 2507.18071): sequence ratio s = exp(mean_t log ratio), clipped per sequence (GSPO-token).

    `s_i = exp(sum_t m (logp - old_logp) / sum_t m)` over row i's mask==1 tokens. Per token, the
    GSPO-token ratio `s_it = sg(s_i) * pi_t / sg(pi_t)` equals `s_i` in value and has gradient
    `s_i * grad logp_t`; `L_t = max(-A_t s_it, -A_t clip(s_it, 1 - clip_low, 1 + clip_high))`. With one
    advantage per row this is sequence-level GSPO; per-token advantages (turn-level estimators) work
    as the paper's GSPO-token. `log s_it` is clamped at 10 (as verl). The paper (and verl) aggregate
    with `seq-mean-token-mean`; any mode works. `pg_clipfrac` counts tokens whose sequence ratio is
    clipped; `pg_clipfrac_lower` is 0 (no dual clip); `ratio_mean` is the mean of `s` over tokens.
    """
    _check_clip("gspo", clip_low, clip_high)
    logp, old, adv = _masked_inputs(inp)
    log_ratio = logp - old
    tokens_B = inp.mask.to(log_ratio.dtype).sum(dim=-1).clamp_min(1.0)
    seq_log_ratio_B = masked_sum(log_ratio, inp.mask, dim=-1) / tokens_B
    log_s = (logp - logp.detach() + seq_log_ratio_B.detach()[:, None]).clamp(max=_GSPO_LOG_RATIO_MAX)
    ratio = torch.exp(log_s)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_B_T = torch.maximum(unclipped, clipped)
    metrics = _metrics(log_ratio, ratio, inp.mask, clipped > unclipped, torch.zeros_like(inp.mask, dtype=torch.bool))
    return inp.aggregate(loss_B_T), metrics


@register_policy_loss("cispo")
def cispo_loss(inp: PolicyLossInput, *, clip_low: float = 1.0,
               clip_high: float = 0.28) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1): -sg(clip(ratio, 1 - clip_low, 1 + clip_high)) * A * logp; no token loses its gradient.

    The importance weight is clipped and detached, so every token's gradient is
    `-clip(ratio) * A * grad logp` (PPO would drop clipped tokens instead). Defaults as MiniMax-M1: no
    lower bound in effect (`clip_low=1.0`), `clip_high=0.28`. `ratio = exp(clamp(logp - old_logp,
    -20, 20))`. The forward value includes logp itself; only its gradient is meaningful.
    `pg_clipfrac` counts tokens whose weight is cut at `1 + clip_high`, `pg_clipfrac_lower` at `1 - clip_low`.
    """
    _check_clip("cispo", clip_low, clip_high)
    logp, old, adv = _masked_inputs(inp)
    log_ratio = logp - old
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()
    loss_B_T = -weight * adv * logp
    metrics = _metrics(log_ratio, ratio, inp.mask, ratio > 1.0 + clip_high, ratio < 1.0 - clip_low)
    return inp.aggregate(loss_B_T), metrics


# --------------------------------------------------------------------------------------------
# AEPO


def token_zscore(values_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """`(v - mean) / sqrt(var + 1e-8)` over the mask==1 positions (unbiased var), detached, float32
    `(B, T)`, 0 where mask == 0; all zeros when fewer than two positions are selected (no spread)."""
    keep = mask_B_T.bool()
    values = torch.where(keep, values_B_T.detach().to(torch.float32), torch.zeros((), dtype=torch.float32))
    if keep.sum() < 2:
        return torch.zeros_like(values)
    return masked_whiten(values, keep) * keep


@register_policy_loss("aepo")
def aepo_loss(
    inp: PolicyLossInput,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    entropy_weight: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """AEPO (arXiv 2510.14545): entropy-balanced clip (upper bound keeps (1+eps_h) grad logp), A' = A(1 + a H_z).

    Reference 4.5. Entropy-aware advantage: `A' = A * (1 + entropy_weight * sg(H_z))`, `H_z` the token
    entropy (`inp.entropy`) z-scored over this batch's mask==1 tokens (`token_zscore`; the micro-batch
    in training). Clipping: the upper bound `1 + clip_high` becomes `(1 + clip_high) * ratio /
    sg(ratio)`, equal in value, so a token clipped above keeps the gradient `(1 + clip_high) * grad
    logp` instead of 0; the lower bound `1 - clip_low` is a plain clamp; then
    `L = max(-A' ratio, -A' clipped_ratio)` and the dual clip of `ppo_clip`. Hand value: ratio 1.5,
    clip_high 0.28, A 1 -> L = -1.28, dL/dlogp = -1.28 (PPO: 0). `entropy_weight=0` needs no entropy;
    otherwise a missing `inp.entropy` raises ValueError. Metrics as `ppo_clip`.
    """
    _check_clip("aepo", clip_low, clip_high)
    logp, old, adv = _masked_inputs(inp)
    if entropy_weight:
        if inp.entropy is None:
            raise ValueError("aepo: entropy_weight != 0 needs the token entropy (PolicyLossInput.entropy is None); "
                             "set entropy_weight=0 to train without the entropy-aware advantage")
        adv = adv * (1.0 + entropy_weight * token_zscore(inp.entropy, inp.mask))
    log_ratio = logp - old
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    upper = (1.0 + clip_high) * ratio / ratio.detach()
    clipped_ratio = torch.where(ratio > 1.0 + clip_high, upper, ratio.clamp(min=1.0 - clip_low))
    unclipped = -adv * ratio
    clipped = -adv * clipped_ratio
    loss_B_T, dual_active = _apply_dual_clip(torch.maximum(unclipped, clipped), adv, dual_clip)
    metrics = _metrics(log_ratio, ratio, inp.mask, clipped > unclipped, dual_active)
    return inp.aggregate(loss_B_T), metrics


# --------------------------------------------------------------------------------------------
# Clip-Cov


def clip_cov_selection(
    logp: Tensor, adv: Tensor, mask: Tensor, eligible: Tensor, *, ratio: float, lb: float, ub: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, T) bool: the tokens whose gradient Clip-Cov drops (verl `compute_policy_loss_clip_cov`).

    `cov = (A - mean A) * (logp - mean logp)` with masked means over this batch; among the `eligible`
    mask==1 tokens with `lb < cov < ub`, `max(1, int(ratio * num_tokens))` are drawn uniformly at
    random without replacement (all of them if fewer), with `generator` (None: torch's global RNG).
    """
    keep = mask.bool()
    logp = logp.detach()
    cov = (adv - masked_mean(adv, mask)) * (logp - masked_mean(logp, mask))
    candidates = torch.nonzero(keep & eligible & (cov > lb) & (cov < ub))
    chosen = torch.zeros_like(keep)
    if len(candidates) == 0:
        return chosen
    count = max(int(ratio * int(keep.sum())), 1)
    perm = torch.randperm(len(candidates), generator=generator, device="cpu")[:count].to(candidates.device)
    picked = candidates[perm]
    chosen[picked[:, 0], picked[:, 1]] = True
    return chosen


@register_policy_loss("clip_cov")
def clip_cov_loss(
    inp: PolicyLossInput,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov (verl compute_policy_loss_clip_cov): PPO clip, plus a random few high-covariance tokens get no gradient.

    `L_t = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)) * corr_t`, `corr_t = 0` on the
    tokens `clip_cov_selection` draws among those not already clipped (a fraction `clip_cov_ratio` of
    the batch's tokens, at least one, with `clip_cov_lb < cov < clip_cov_ub`), 1 elsewhere. Defaults
    as verl (SPEAR: ratio 0.02, lb 1-2, ub 40-60). Pass a seeded `generator` for reproducible draws.
    `pg_clipfrac` counts PPO-clipped tokens, `pg_clipfrac_lower` is 0 (no dual clip), and
    `clip_cov_frac` the tokens whose gradient was dropped (what verl reports as its pg_clipfrac).
    """
    _check_clip("clip_cov", clip_low, clip_high)
    if clip_cov_ratio <= 0:
        raise ValueError(f"clip_cov: clip_cov_ratio must be > 0, got {clip_cov_ratio}")
    logp, old, adv = _masked_inputs(inp)
    log_ratio = logp - old
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    ppo_clipped = clipped > unclipped
    dropped = clip_cov_selection(logp, adv, inp.mask, ~ppo_clipped, ratio=clip_cov_ratio, lb=clip_cov_lb,
                                 ub=clip_cov_ub, generator=generator)
    loss_B_T = torch.maximum(unclipped, clipped) * (~dropped).to(unclipped.dtype)
    metrics = _metrics(log_ratio, ratio, inp.mask, ppo_clipped, torch.zeros_like(dropped))
    metrics["clip_cov_frac"] = masked_mean(dropped.float(), inp.mask)
    return inp.aggregate(loss_B_T), metrics
