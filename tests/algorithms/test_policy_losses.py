"""GSPO, CISPO, AEPO (4.5), Clip-Cov (4.5 note) and KL in the reward (2.2): hand-computed values,
gradients included."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tirl.algorithms import POLICY_LOSSES, PolicyLossInput, kl_in_reward, token_zscore

METRIC_NAMES = {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "ratio_mean"}


def loss_input(log_ratios, advantages, mask=None, old=-1.0, **extra) -> tuple[torch.Tensor, PolicyLossInput]:
    """One row per list; `old_logprobs = old` everywhere, `logprobs = old + log ratio` (with gradient)."""
    ratios = torch.tensor(log_ratios, dtype=torch.float32)
    logp = (old + ratios).requires_grad_()
    mask = torch.ones_like(ratios) if mask is None else torch.tensor(mask, dtype=torch.float32)
    return logp, PolicyLossInput(logp, torch.full_like(ratios, old), torch.tensor(advantages, dtype=torch.float32),
                                 mask, **extra)


def value_and_grad(name: str, inp: PolicyLossInput, logp: torch.Tensor, **params):
    loss, metrics = POLICY_LOSSES.get(name)(inp, **params)
    (grad,) = torch.autograd.grad(loss, logp)
    assert METRIC_NAMES <= set(metrics) and all(not m.requires_grad for m in metrics.values())
    return loss.detach(), grad, metrics


# ----------------------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_unclipped():
    """Log ratios [0.2, 0.0] -> s = exp(0.1) = 1.10517 for both tokens; A = 1, clip 0.2: L = -1.10517 per
    token, token-mean -1.10517; dL/dlogp_t = -A s / 2 = -0.55259 for each token (the per-token PPO
    gradient would be -exp(0.2)/2 = -0.61070 and -0.5)."""
    logp, inp = loss_input([[0.2, 0.0]], [[1.0, 1.0]])
    loss, grad, metrics = value_and_grad("gspo", inp, logp, clip_low=0.2, clip_high=0.2)
    assert_close(loss, torch.tensor(-1.10517), atol=1e-5, rtol=0)
    assert_close(grad, torch.tensor([[-0.55259, -0.55259]]), atol=1e-5, rtol=0)
    assert_close(metrics["ratio_mean"], torch.tensor(1.10517), atol=1e-5, rtol=0)
    assert metrics["pg_clipfrac"].item() == 0.0


def test_gspo_clips_the_whole_sequence_and_takes_per_token_advantages():
    """Log ratios [0.5, 0.3] -> s = exp(0.4) = 1.49182 > 1.2. A = [1, -1]: token 0 max(-1.49182, -1.2) =
    -1.2 (clipped, no gradient); token 1 max(1.49182, 1.2) = 1.49182 (gradient s/2 = 0.74591).
    token-mean (-1.2 + 1.49182) / 2 = 0.14591. Per-token PPO would give token 1 exp(0.3) = 1.34986."""
    logp, inp = loss_input([[0.5, 0.3]], [[1.0, -1.0]])
    loss, grad, metrics = value_and_grad("gspo", inp, logp, clip_low=0.2, clip_high=0.2)
    assert_close(loss, torch.tensor(0.14591), atol=1e-5, rtol=0)
    assert_close(grad, torch.tensor([[0.0, 0.74591]]), atol=1e-5, rtol=0)
    assert_close(metrics["pg_clipfrac"], torch.tensor(0.5))


def test_gspo_sequence_mean_ignores_masked_tokens():
    """The masked token (log ratio 5, -inf log-probs elsewhere in padding) is not in the mean: s = exp(0.1)."""
    logp, inp = loss_input([[0.2, 5.0, 0.0]], [[1.0, 1.0, 1.0]], mask=[[1.0, 0.0, 1.0]])
    loss, grad, _ = value_and_grad("gspo", inp, logp, clip_low=0.2, clip_high=0.2)
    assert_close(loss, torch.tensor(-1.10517), atol=1e-5, rtol=0)
    assert_close(grad, torch.tensor([[-0.55259, 0.0, -0.55259]]), atol=1e-5, rtol=0)
    padded = torch.tensor([[-0.8, float("-inf")]], requires_grad=True)
    inp = PolicyLossInput(padded, torch.tensor([[-1.0, float("-inf")]]), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]))
    loss, _ = POLICY_LOSSES.get("gspo")(inp, clip_low=0.2, clip_high=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(padded.grad).all()


# ----------------------------------------------------------------------------- CISPO


def test_cispo_hand_values_keep_the_gradient_of_clipped_tokens():
    """ratio 1.5, A = 1, clip_high 0.28: w = sg(1.28); logp = -1 + ln 1.5 = -0.59453;
    L = -1.28 * 1 * (-0.59453) = 0.76100, dL/dlogp = -1.28 (PPO: 0).
    ratio 0.5, A = -1, clip_low 0.2: w = 0.8, logp = -1.69315; L = -0.8 * (-1) * (-1.69315) = -1.35452,
    dL/dlogp = 0.8; with the default clip_low = 1 (no lower bound) w = 0.5 and dL/dlogp = 0.5."""
    logp, inp = loss_input([[math.log(1.5)]], [[1.0]])
    loss, grad, metrics = value_and_grad("cispo", inp, logp)
    assert_close(loss, torch.tensor(0.76100), atol=1e-5, rtol=0)
    assert_close(grad, torch.tensor([[-1.28]]))
    assert metrics["pg_clipfrac"].item() == 1.0 and metrics["pg_clipfrac_lower"].item() == 0.0
    logp, inp = loss_input([[math.log(0.5)]], [[-1.0]])
    loss, grad, metrics = value_and_grad("cispo", inp, logp, clip_low=0.2)
    assert_close(loss, torch.tensor(-1.35452), atol=1e-5, rtol=0)
    assert_close(grad, torch.tensor([[0.8]]))
    assert metrics["pg_clipfrac_lower"].item() == 1.0
    _, grad, _ = value_and_grad("cispo", inp, logp)
    assert_close(grad, torch.tensor([[0.5]]))


def test_cispo_inside_the_clip_range_is_reinforce_weighted_by_the_ratio():
    """ratio 1.1 (inside [0, 1.28]), A = 2: dL/dlogp = -1.1 * 2 = -2.2 (the same gradient as PPO's -A ratio)."""
    logp, inp = loss_input([[math.log(1.1)]], [[2.0]])
    _, grad, _ = value_and_grad("cispo", inp, logp)
    assert_close(grad, torch.tensor([[-2.2]]))


# ----------------------------------------------------------------------------- AEPO


def test_aepo_entropy_balanced_clipping_reference_value():
    """4.5: ratio 1.5, clip_high 0.28, A = 1 -> forward -1.28 and dL/dlogp = -1.28 (vanilla PPO: 0)."""
    logp, inp = loss_input([[math.log(1.5)]], [[1.0]])
    loss, grad, metrics = value_and_grad("aepo", inp, logp, entropy_weight=0.0)
    assert_close(loss, torch.tensor(-1.28))
    assert_close(grad, torch.tensor([[-1.28]]))
    assert metrics["pg_clipfrac"].item() == 1.0
    ppo_loss, ppo_grad, _ = value_and_grad("ppo_clip", inp, logp, clip_high=0.28)
    assert_close(ppo_loss, loss)
    assert ppo_grad.item() == 0.0


def test_aepo_lower_bound_and_dual_clip_are_as_ppo():
    """ratio 0.5, A = -1: clamp at 0.8 -> L = 0.8, no gradient. ratio 5, A = -1: dual clip -> L = 3."""
    logp, inp = loss_input([[math.log(0.5), math.log(5.0)]], [[-1.0, -1.0]])
    loss, grad, metrics = value_and_grad("aepo", inp, logp, entropy_weight=0.0)
    assert_close(loss, torch.tensor((0.8 + 3.0) / 2))
    assert_close(grad, torch.zeros(1, 2))
    assert_close(metrics["pg_clipfrac_lower"], torch.tensor(0.5))


def test_aepo_entropy_aware_advantage():
    """Entropies [1, 3] (and a masked 50): z = [-0.70711, +0.70711] (mean 2, unbiased std 1.41421);
    a = 0.2: A' = A (1 + 0.2 z) = [0.85858, 1.14142] for A = 1. Ratio 1: L_t = -A'_t, token-mean
    gradient -A'/2 = [-0.42929, -0.57071]; the entropy itself gets no gradient."""
    entropy = torch.tensor([[1.0, 3.0, 50.0]], requires_grad=True)
    logp, inp = loss_input([[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]], mask=[[1.0, 1.0, 0.0]], entropy=entropy)
    loss, _ = POLICY_LOSSES.get("aepo")(inp)
    grad, entropy_grad = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    assert_close(grad, torch.tensor([[-0.42929, -0.57071, 0.0]]), atol=1e-5, rtol=0)
    assert_close(loss, torch.tensor(-1.0))
    assert entropy_grad is None
    assert_close(token_zscore(entropy, inp.mask), torch.tensor([[-0.70711, 0.70711, 0.0]]), atol=1e-5, rtol=0)
    assert (token_zscore(entropy, torch.tensor([[1.0, 0.0, 0.0]])) == 0).all()


def test_aepo_needs_entropy_unless_its_weight_is_zero():
    logp, inp = loss_input([[0.1]], [[1.0]])
    with pytest.raises(ValueError, match="PolicyLossInput.entropy"):
        POLICY_LOSSES.get("aepo")(inp)
    with pytest.raises(ValueError, match="one shape"):
        PolicyLossInput(logp, inp.old_logprobs, inp.advantages, inp.mask, entropy=torch.zeros(2, 2))


# ----------------------------------------------------------------------------- Clip-Cov


def clip_cov_input(first_ratio: float = 1.0):
    """A = [2, -2, 0, 0], logp = [-1, -3, -2, -2]: masked means 0 and -2, so cov = [2, 2, 0, 0]."""
    logp = torch.tensor([[-1.0, -3.0, -2.0, -2.0]], requires_grad=True)
    old = logp.detach().clone()
    old[0, 0] -= math.log(first_ratio)
    return logp, PolicyLossInput(logp, old, torch.tensor([[2.0, -2.0, 0.0, 0.0]]), torch.ones(1, 4))


def test_clip_cov_drops_the_gradient_of_tokens_in_the_covariance_band():
    """Ratio 1 everywhere; tokens 0 and 1 (cov 2) lie in (1, 5). clip_cov_ratio 0.5 -> int(0.5*4) = 2
    tokens dropped: L = [-2, 2, 0, 0] * 0 -> loss 0 and no gradient. With the verl default ratio 2e-4
    -> max(1, 0) = 1 token, chosen by the generator: the other keeps L = -A (token-mean +-0.5)."""
    logp, inp = clip_cov_input()
    loss, grad, metrics = value_and_grad("clip_cov", inp, logp, clip_cov_ratio=0.5)
    assert loss.item() == 0.0 and (grad == 0).all()
    assert_close(metrics["clip_cov_frac"], torch.tensor(0.5))
    draws = []
    for seed in range(12):
        loss, grad, _ = value_and_grad("clip_cov", inp, logp, generator=torch.Generator().manual_seed(seed))
        kept = int(grad[0, 1] != 0)  # token 1 kept -> token 0 dropped
        assert_close(loss, torch.tensor(0.5 if kept else -0.5))
        assert_close(grad, torch.tensor([[0.0, 0.5, 0.0, 0.0]] if kept else [[-0.5, 0.0, 0.0, 0.0]]))
        again, _, _ = value_and_grad("clip_cov", inp, logp, generator=torch.Generator().manual_seed(seed))
        assert again == loss
        draws.append(kept)
    assert 0 < sum(draws) < len(draws)  # both tokens get drawn across seeds


def test_clip_cov_never_drops_tokens_ppo_already_clipped_or_outside_the_band():
    """Token 0 has ratio 1.5 > 1.2 with A = 2 > 0: PPO clips it (L = -2.4, no gradient), so only token 1
    can be dropped: loss (-2.4 + 0 + 0 + 0) / 4 = -0.6, no gradient anywhere. A band (3, 5) holds no token."""
    logp, inp = clip_cov_input(first_ratio=1.5)
    loss, grad, metrics = value_and_grad("clip_cov", inp, logp, clip_cov_ratio=0.5)
    assert_close(loss, torch.tensor(-0.6))
    assert (grad == 0).all()
    assert_close(metrics["clip_cov_frac"], torch.tensor(0.25))
    assert_close(metrics["pg_clipfrac"], torch.tensor(0.25))
    logp, inp = clip_cov_input()
    loss, grad, metrics = value_and_grad("clip_cov", inp, logp, clip_cov_ratio=0.5, clip_cov_lb=3.0)
    assert_close(grad, torch.tensor([[-0.5, 0.5, 0.0, 0.0]]))
    assert metrics["clip_cov_frac"].item() == 0.0
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        POLICY_LOSSES.get("clip_cov")(inp, clip_cov_ratio=0.0)


# ----------------------------------------------------------------------------- shared checks


@pytest.mark.parametrize("name", ["gspo", "cispo", "aepo", "clip_cov"])
def test_losses_validate_clip_ranges_and_ignore_masked_non_finite_logprobs(name):
    logp = torch.tensor([[-0.5, float("-inf")]], requires_grad=True)
    inp = PolicyLossInput(logp, torch.tensor([[-0.6, float("-inf")]]), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]),
                          entropy=torch.zeros(1, 2))
    loss, metrics = POLICY_LOSSES.get(name)(inp)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    assert all(torch.isfinite(m) for m in metrics.values())
    with pytest.raises(ValueError, match="clip_low"):
        POLICY_LOSSES.get(name)(inp, clip_low=-0.1)


def test_new_losses_are_registered_with_descriptions():
    described = POLICY_LOSSES.describe()
    for name in ("gspo", "cispo", "aepo", "clip_cov", "ppo_clip"):
        assert len(described[name]) > 30


# ----------------------------------------------------------------------------- KL in the reward


def test_kl_in_reward_reference_value():
    """2.2: old logp -1, ref -1.5 -> k1 = 0.5, k3 = 0.10653. coef 0.001: r - 0.0005 (k1), r - 0.00010653
    (k3) on sampled tokens; a mask==0 token (with -inf log-probs) keeps its reward."""
    rewards = torch.tensor([[0.0, 1.0, 7.0]])
    old = torch.tensor([[-1.0, -1.0, float("-inf")]])
    ref = torch.tensor([[-1.5, -1.5, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert_close(kl_in_reward(rewards, old, ref, mask, 0.001, "k1"), torch.tensor([[-0.0005, 0.9995, 7.0]]))
    assert_close(kl_in_reward(rewards, old, ref, mask, 0.001, "k3"),
                 torch.tensor([[-0.00010653, 1.0 - 0.00010653, 7.0]]), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="share one shape"):
        kl_in_reward(rewards, old, ref[:, :2], mask, 0.001)
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_in_reward(rewards, old, ref, mask, 0.001, "k9")
