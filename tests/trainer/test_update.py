"""The RL update: gradient accumulation over micro-batches equals one full batch; the estimator is the
registered one; KL to a reference model enters the loss."""

from __future__ import annotations

import copy

import torch

from tirl.trainer.update import UpdateSettings, advantages_for, rl_update
from tirl.types import StopReason, Trajectory, TrajectoryGroup, TrajectoryMeta, Turn


def _traj(prompt, response, mask, reward, gid, k):
    turns = (Turn(0, len(response), len(response), "", "eos"),)
    return Trajectory(tuple(prompt), tuple(response), tuple(mask), tuple([-1.0 if m else 0.0 for m in mask]),
                      turns, (), StopReason.ANSWERED, TrajectoryMeta("t", gid, k), reward=reward)


def _groups():
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, 500, (n,), generator=g).tolist()  # noqa: E731
    groups = []
    for gi in range(2):
        prompt = rand(6)
        trajs = []
        for k, (n, r) in enumerate([(5, 1.0), (8, 0.0), (3, 0.0), (6, 1.0)]):
            trajs.append(_traj(prompt, rand(n), [1] * n, r + 0.5 * gi * k, str(gi), k))
        groups.append(TrajectoryGroup(str(gi), "t", tuple(trajs)))
    return groups


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")


def _step(model, groups, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    s = UpdateSettings(max_grad_norm=None, **kw)
    metrics = rl_update(model, opt, advantages_for(groups, s), s)
    return metrics


def test_grpo_advantages_per_group():
    batch = advantages_for(_groups(), UpdateSettings())
    adv_first = batch.advantages[:4, 0]
    torch.testing.assert_close(adv_first, torch.tensor([0.86602, -0.86602, -0.86602, 0.86602]), atol=1e-4, rtol=0)
    assert (batch.advantages[batch.mask == 0] == 0).all()


def test_micro_batches_equal_full_batch(tiny_model_dir):
    """Updates are ~1e-2 here; a wrong normaliser changes them by that much. The tolerance only covers
    float32 summation order (observed <= 3e-6)."""
    groups = _groups()
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        a, b = _model(tiny_model_dir), _model(tiny_model_dir)
        _step(a, groups, micro_batch_size=8, aggregation=agg)
        _step(b, groups, micro_batch_size=3, aggregation=agg)
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5, msg=f"{agg}: {n}")


def test_update_changes_weights_toward_high_advantage(tiny_model_dir):
    groups = _groups()
    model = _model(tiny_model_dir)
    before = copy.deepcopy(model)
    best = groups[0].trajectories[0]  # reward 1 in a group with mean 0.5
    from tirl.trainer.forward import response_logprobs

    def lp(m):
        with torch.no_grad():
            return response_logprobs(m, [best.prompt_ids], [best.response_ids], [best.loss_mask]).logprobs.sum()

    metrics = _step(model, groups, micro_batch_size=4)
    assert lp(model) > lp(before)
    assert metrics["train/ratio_mean"] == 1.0 and metrics["train/pg_clipfrac"] == 0.0


def test_kl_to_reference_enters_the_loss(tiny_model_dir):
    groups = _groups()
    model, ref = _model(tiny_model_dir), _model(tiny_model_dir)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    s = UpdateSettings(kl_coef=0.5, kl_estimator="k3")
    metrics = rl_update(model, opt, advantages_for(groups, s), s, ref_model=ref)
    assert metrics["train/kl"] > 0
    s0 = UpdateSettings()
    metrics0 = rl_update(model, opt, advantages_for(groups, s0), s0)
    assert abs(metrics["train/loss"] - metrics0["train/loss"] - 0.5 * metrics["train/kl"]) < 1e-3


def test_several_epochs_use_old_logprobs(tiny_model_dir):
    model = _model(tiny_model_dir)
    metrics = _step(model, _groups(), epochs=2, minibatches=2)
    assert metrics["train/ratio_mean"] != 1.0  # the second pass sees a moved policy


def test_skipping_zero_advantage_rows_is_exact(tiny_model_dir):
    groups = _groups()
    flat = TrajectoryGroup("h", "t", tuple(t.with_reward(1.0, {}, True) for t in groups[1].trajectories))
    batch_groups = [groups[0], flat]
    a, b = _model(tiny_model_dir), _model(tiny_model_dir)
    ma = _step(a, batch_groups, micro_batch_size=4)
    _step(b, batch_groups, micro_batch_size=4, skip_zero_advantage=False)
    assert ma["train/rows_skipped"] == 4
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=n)
