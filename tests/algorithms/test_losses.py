"""Policy loss, aggregation, KL, critic loss and helpers: hand-computed values (reference sections
2.1-2.3). Gradient-accumulation and data-parallel equivalence with the full batch: test_equivalence.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tirl.algorithms import (
    AGG_MODES,
    POLICY_LOSSES,
    PolicyLossInput,
    agg_loss,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    masked_whiten,
    value_loss,
)

ppo_clip = POLICY_LOSSES.get("ppo_clip")


def one_token(ratio: float, advantage: float) -> tuple[torch.Tensor, PolicyLossInput]:
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    inp = PolicyLossInput(logp, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1))
    return logp, inp


# ----------------------------------------------------------------------------- PPO clip


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected_loss"),
    [(1.5, 1.0, -1.2), (0.5, -1.0, 0.8), (5.0, -1.0, 3.0)],
)
def test_ppo_clip_hand_values_have_zero_gradient(ratio, advantage, expected_loss):
    logp, inp = one_token(ratio, advantage)
    loss, _ = ppo_clip(inp)
    loss.backward()
    assert_close(loss, torch.tensor(expected_loss))
    assert logp.grad.abs().max().item() == 0.0


def test_dual_clip_can_be_disabled():
    logp, inp = one_token(5.0, -1.0)
    loss, metrics = ppo_clip(inp, dual_clip=None)
    loss.backward()
    assert_close(loss, torch.tensor(5.0))
    assert_close(logp.grad, torch.tensor([[5.0]]))  # d(-A ratio)/dlogp = -A ratio
    assert metrics["pg_clipfrac_lower"].item() == 0.0


def test_unclipped_token_has_policy_gradient():
    logp, inp = one_token(1.1, 2.0)
    loss, _ = ppo_clip(inp)
    loss.backward()
    assert_close(loss, torch.tensor(-2.2))
    assert_close(logp.grad, torch.tensor([[-2.2]]))


def test_clip_higher_widens_upper_bound():
    _, inp = one_token(1.25, 1.0)
    assert_close(ppo_clip(inp)[0], torch.tensor(-1.2))
    assert_close(ppo_clip(inp, clip_high=0.28)[0], torch.tensor(-1.25))
    assert_close(ppo_clip(inp, clip_low=0.2, clip_high=0.28)[0], torch.tensor(-1.25))


def test_ppo_metrics_are_masked_means():
    ratios = torch.tensor([[1.5, 1.0, 5.0, 1.5]])
    inp = PolicyLossInput(
        logprobs=ratios.log().requires_grad_(),
        old_logprobs=torch.zeros(1, 4),
        advantages=torch.tensor([[1.0, 1.0, -1.0, 1.0]]),
        mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
    )
    loss, metrics = ppo_clip(inp)
    assert_close(loss, torch.tensor((-1.2 - 1.0 + 3.0) / 3))
    assert_close(metrics["pg_clipfrac"], torch.tensor(1 / 3))
    assert_close(metrics["pg_clipfrac_lower"], torch.tensor(1 / 3))
    assert_close(metrics["ppo_kl"], torch.tensor(-(math.log(1.5) + math.log(5.0)) / 3))
    assert_close(metrics["ratio_mean"], torch.tensor(2.5))
    assert all(not m.requires_grad for m in metrics.values())


def test_ratio_is_clamped_and_masked_tokens_get_no_gradient():
    logp = torch.tensor([[30.0, 0.1, -1e4]], requires_grad=True)
    inp = PolicyLossInput(logp, torch.zeros(1, 3), torch.tensor([[-1.0, 1.0, 5.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    loss, metrics = ppo_clip(inp, dual_clip=None)
    loss.backward()
    assert torch.isfinite(loss)
    assert_close(metrics["ratio_mean"], torch.tensor((math.exp(20.0) + math.exp(0.1)) / 2))
    assert logp.grad[0, 2].item() == 0.0
    assert logp.grad[0, 0].item() == 0.0  # the clamp stops the gradient beyond |log ratio| = 20


def test_non_finite_logprobs_on_masked_tokens_do_not_poison_the_gradient():
    logp = torch.tensor([[-0.5, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-0.6, float("-inf")]])
    inp = PolicyLossInput(logp, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    loss, metrics = ppo_clip(inp)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(m) for m in metrics.values())


def test_ppo_clip_validates_input():
    _, inp = one_token(1.0, 1.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip(inp, dual_clip=1.0)
    with pytest.raises(ValueError, match="one shape"):
        PolicyLossInput(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="token-mean"):
        PolicyLossInput(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), agg_mode="mean")


# ----------------------------------------------------------------------------- KL


def test_kl_hand_values_and_aliases():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    expected = {"k1": 0.5, "kl": 0.5, "k2": 0.125, "mse": 0.125, "abs": 0.5, "k3": 0.10653, "low_var_kl": 0.10653}
    for kind, value in expected.items():
        assert_close(kl_penalty(logp, ref, kind), torch.tensor([[value]]), atol=1e-5, rtol=0)
        assert_close(kl_penalty(logp, ref, kind + "+"), torch.tensor([[value]]), atol=1e-5, rtol=0)
    assert_close(kl_penalty(ref, logp, "abs"), torch.tensor([[0.5]]))


def test_k3_is_clamped_both_ways():
    logp = torch.tensor([[-40.0, 0.0]])
    ref = torch.tensor([[0.0, -40.0]])
    k3 = kl_penalty(logp, ref, "k3")
    assert_close(k3, torch.tensor([[10.0, math.exp(-20.0) + 20.0 - 1.0]]).clamp(max=10.0))


@pytest.mark.parametrize("kind", ["k1", "abs", "k3", "low_var_kl"])
def test_straight_through_kl_takes_value_of_kind_and_gradient_of_k2(kind):
    gen = torch.Generator().manual_seed(0)
    logp_data = -torch.rand(3, 5, generator=gen) * 3
    ref = -torch.rand(3, 5, generator=gen) * 3

    def value_and_grad(k: str) -> tuple[torch.Tensor, torch.Tensor]:
        logp = logp_data.clone().requires_grad_()
        value = kl_penalty(logp, ref, k)
        (value * torch.arange(15.0).view(3, 5)).sum().backward()
        return value.detach(), logp.grad

    st_value, st_grad = value_and_grad(kind + "+")
    plain_value, plain_grad = value_and_grad(kind)
    _, k2_grad = value_and_grad("k2")
    assert_close(st_value, plain_value)
    assert_close(st_grad, k2_grad)
    assert not torch.allclose(plain_grad, k2_grad)


def test_unknown_kl_kind_lists_valid_kinds():
    for bad in ("k4", "full", "k3++", "+"):
        with pytest.raises(ValueError, match="low_var_kl"):
            kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), bad)


# ----------------------------------------------------------------------------- aggregation


def two_sequences() -> tuple[torch.Tensor, torch.Tensor]:
    """Seq A: 2 tokens of loss 1; seq B: 4 tokens of loss 3; masked positions hold junk."""
    loss = torch.tensor([[1.0, 1.0, 99.0, float("inf")], [3.0, 3.0, 3.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    return loss, mask


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 14 / 6),
        ("seq-mean-token-mean", 2.0),
        ("seq-mean-token-sum", 7.0),
        ("seq-mean-token-sum-norm", 3.5),
    ],
)
def test_agg_loss_hand_values(mode, expected):
    loss, mask = two_sequences()
    assert_close(agg_loss(loss, mask, mode, norm_constant=4), torch.tensor(expected))
    assert_close(agg_loss(loss, mask.bool(), mode), torch.tensor(expected))  # default C = T = 4
    # a fully masked sequence changes no denominator
    padded_loss = torch.cat([loss, torch.full((1, 4), 7.0)])
    padded_mask = torch.cat([mask, torch.zeros(1, 4)])
    assert_close(agg_loss(padded_loss, padded_mask, mode), torch.tensor(expected))


def test_norm_constant_is_used():
    loss, mask = two_sequences()
    assert_close(agg_loss(loss, mask, "seq-mean-token-sum-norm", norm_constant=8.0), torch.tensor(1.75))


def test_agg_loss_rejects_unknown_mode_and_handles_empty_mask():
    loss, mask = two_sequences()
    with pytest.raises(ValueError) as info:
        agg_loss(loss, mask, "mean")
    assert all(mode in str(info.value) for mode in AGG_MODES)
    for mode in AGG_MODES:
        empty = agg_loss(loss, torch.zeros_like(mask), mode)
        assert empty.item() == 0.0


# ----------------------------------------------------------------------------- critic and helpers


def test_value_loss_hand_values():
    values = torch.tensor([[1.0, 0.2, 5.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = value_loss(values, old, returns, mask, clip=0.5)
    loss.backward()
    # token 0: max((1-2)^2, (0.5-2)^2) = 2.25 (clipped, no grad); token 1: 0.64 (unclipped)
    assert_close(loss, torch.tensor(0.5 * (2.25 + 0.64) / 2))
    assert_close(values.grad, torch.tensor([[0.0, 0.5 * 2 * (0.2 - 1.0) / 2, 0.0]]))
    assert_close(metrics["vf_clipfrac"], torch.tensor(0.5))
    unclipped, metrics = value_loss(values, old, returns, mask, clip=None)
    assert_close(unclipped, torch.tensor(0.5 * (1.0 + 0.64) / 2))
    assert metrics["vf_clipfrac"].item() == 0.0


def test_masked_whiten_and_mean():
    values = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.ones(2, 3)
    assert_close(masked_whiten(values, mask), torch.tensor([[0.91287] * 3, [-0.91287] * 3]), atol=1e-5, rtol=0)
    assert_close(masked_whiten(values, mask, shift_mean=False), masked_whiten(values, mask) + 0.5)
    assert_close(masked_mean(torch.tensor([[2.0, float("nan")]]), torch.tensor([[1.0, 0.0]])), torch.tensor(2.0))
    assert masked_mean(values, torch.zeros(2, 3)).item() == 0.0
    with pytest.raises(ValueError, match="one element"):
        masked_whiten(values, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_entropy_from_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=gen) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert_close(entropy_from_logits(logits), expected)
    assert_close(entropy_from_logits(torch.zeros(4, 7)), torch.full((4,), math.log(7)))
    huge = torch.tensor([[1e4, 1e4, -1e4]])
    assert_close(entropy_from_logits(huge), torch.tensor([math.log(2)]))
    banned = torch.tensor([[0.0, 0.0, float("-inf")]], requires_grad=True)
    ent = entropy_from_logits(banned)
    ent.sum().backward()
    assert_close(ent.detach(), torch.tensor([math.log(2)]))
    assert torch.isfinite(banned.grad).all()
