"""The RL update: gradient accumulation over micro-batches equals one full batch (with and without a
critic); the estimator is the registered one and gets every input it may need; KL to a reference model
enters the loss or the reward; a lora_base reference is the base model without a second copy."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from tirl.algorithms import ADVANTAGES, POLICY_LOSSES
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


# ----------------------------------------------------------------------------- critic, KL placement, reference


def _gae_groups():
    """Rows with observation tokens (mask 0) inside the response, so masked GAE carries over them."""
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(0, 500, (n,), generator=g).tolist()  # noqa: E731
    groups = []
    for gi in range(2):
        prompt = rand(6)
        trajs = [_traj(prompt, rand(n), [1] * (n - 3) + [0, 0, 1], r, str(gi), k)
                 for k, (n, r) in enumerate([(7, 1.0), (9, 0.0), (5, 0.25), (8, 0.75)])]
        groups.append(TrajectoryGroup(str(gi), "t", tuple(trajs)))
    return groups


@pytest.mark.parametrize("with_critic", [False, True])
def test_micro_batch_2_equals_8_with_and_without_critic(tiny_model_dir, with_critic):
    """One rl_update with micro_batch_size 2 (gradient accumulation over 4 micro-batches) and 8 (one) gives the
    same parameters, value head included. Updates are ~1e-2; the tolerance covers float32 summation order
    (old values scored in different micro-batches shift the whitened GAE advantages by ~1e-7)."""
    from tirl.trainer.critic import make_value_head

    groups = _gae_groups() if with_critic else _groups()
    params = []
    for micro in (2, 8):
        model = _model(tiny_model_dir)
        head = make_value_head(model) if with_critic else None
        if head is not None:
            torch.nn.init.normal_(head.linear.weight, std=0.5, generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD([*model.parameters(), *(head.parameters() if head else [])], lr=0.5)
        s = UpdateSettings(advantage="gae" if with_critic else "grpo", micro_batch_size=micro, max_grad_norm=None,
                           critic_coef=0.5)
        metrics = rl_update(model, opt, advantages_for(groups, s, model, head), s, critic=head)
        params.append([p.detach().clone() for p in [*model.parameters(), *(head.parameters() if head else [])]])
        assert ("critic/vf_loss" in metrics) == with_critic
    moved = max(float((a - b).abs().max()) for a, b in zip(params[0], _model(tiny_model_dir).parameters()))
    assert moved > 1e-3
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_kl_in_reward_hand_value():
    """r=[0,0,1], old=[-1,-1,-1], ref=[-1.5,-1,-1.5], mask=[1,0,1], coef 0.1, k1: KL=[0.5,(masked),0.5]
    -> r=[-0.05, 0, 0.95]; the mean KL over sampled tokens is 0.5."""
    from tirl.trainer.update import rewards_with_kl

    rewards, stats = rewards_with_kl(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[-1.0, -1.0, -1.0]]),
                                  torch.tensor([[-1.5, -1.0, -1.5]]), torch.tensor([[1.0, 0.0, 1.0]]), 0.1, "k1")
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.95]]))
    assert stats["train/kl"] == pytest.approx(0.5)


def _perturbed(model, scale=0.05):
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def test_kl_in_reward_changes_the_advantages_as_the_formula_says(tiny_model_dir):
    """kl_placement=reward: the estimator sees r_t - coef * (old_logp - ref_logp)_t (k1) on sampled tokens."""
    from tirl.algorithms import AdvantageInput, grpo_advantages, outcome_token_rewards
    from tirl.trainer.forward import response_logprobs

    groups = _groups()
    model, ref = _model(tiny_model_dir), _perturbed(_model(tiny_model_dir))
    s = UpdateSettings(kl_coef=0.2, kl_estimator="k1", kl_placement="reward")
    batch = advantages_for(groups, s, model, reference=ref)
    trajs = batch.trajs
    args = ([t.prompt_ids for t in trajs], [t.response_ids for t in trajs], [t.loss_mask for t in trajs])
    with torch.no_grad():
        old, ref_lp = response_logprobs(model, *args).logprobs, response_logprobs(ref, *args).logprobs
    rewards = outcome_token_rewards(torch.tensor([t.reward for t in trajs]), batch.mask)
    rewards = rewards - 0.2 * (old - ref_lp) * batch.mask
    expected, _ = grpo_advantages(AdvantageInput(rewards, batch.mask, torch.tensor([0] * 4 + [1] * 4)))
    torch.testing.assert_close(batch.advantages, expected, atol=1e-5, rtol=1e-5)
    plain = advantages_for(groups, UpdateSettings())
    assert float((batch.advantages - plain.advantages).abs().max()) > 1e-3
    assert batch.stats["train/kl"] == pytest.approx(float(((old - ref_lp) * batch.mask).sum() / batch.mask.sum()),
                                                    abs=1e-5)
    with pytest.raises(ValueError, match="needs the model"):
        advantages_for(groups, s)


def _lora(tiny_model_dir):
    from tirl.models.loading import apply_lora

    policy = apply_lora(_model(tiny_model_dir), r=2, alpha=4, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return policy


def test_lora_base_reference_is_the_base_model_without_a_copy(tiny_model_dir):
    from tirl.trainer.forward import response_logprobs
    from tirl.trainer.reference import Reference

    base, policy = _model(tiny_model_dir), _lora(tiny_model_dir)
    trajs = [t for g in _groups() for t in g.trajectories][:4]
    args = ([t.prompt_ids for t in trajs], [t.response_ids for t in trajs], [t.loss_mask for t in trajs])
    with torch.no_grad():
        base_lp, policy_lp = response_logprobs(base, *args).logprobs, response_logprobs(policy, *args).logprobs
    ref = Reference(policy, lora_base=True)
    torch.testing.assert_close(ref.logprobs(trajs), base_lp, atol=1e-5, rtol=0)
    assert float((policy_lp - base_lp).abs().max()) > 1e-2  # the adapter does change the policy
    with torch.no_grad():  # and it is back on afterwards
        torch.testing.assert_close(response_logprobs(policy, *args).logprobs, policy_lp)
    assert ref.model is policy
    policy_storage = {p.data_ptr() for p in policy.parameters()}
    assert {p.data_ptr() for p in ref.model.parameters()} <= policy_storage


def test_build_reference_picks_lora_base_or_a_frozen_copy(tiny_model_dir, monkeypatch):
    import tirl.trainer.build as build
    from tirl.config import load_config
    from tirl.errors import ConfigError

    policy = build.Policy(_lora(tiny_model_dir), None, None, str(tiny_model_dir), "cpu", torch.float32, "eager")

    def no_second_model(*a, **k):
        raise AssertionError("lora_base must not load a second model")

    monkeypatch.setattr(build, "load_policy", no_second_model)
    ref = build.build_reference(load_config(None, ["model.lora.enabled=true", "algorithm.kl_coef=0.01"]), policy)
    assert ref.lora_base and ref.model is policy.model
    assert build.build_reference(load_config(None, []), policy) is None
    monkeypatch.undo()
    copy_ref = build.build_reference(load_config(None, ["model.lora.enabled=true", "algorithm.kl_coef=0.01",
                                                        "algorithm.reference=copy"]), policy)
    assert not copy_ref.lora_base and copy_ref.model is not policy.model
    assert not any(p.requires_grad for p in copy_ref.model.parameters())
    with pytest.raises(ConfigError, match="lora_base"):
        build.preflight(load_config(None, ["pipeline.eval_before=false", "algorithm.kl_coef=0.01",
                                           "algorithm.reference=lora_base"]))
    with pytest.raises(ConfigError, match="has no effect while algorithm.kl_coef is 0"):
        load_config(None, ["algorithm.kl_placement=reward"])


# ----------------------------------------------------------------------------- inputs of estimators and losses

_SEEN: dict = {}


def _capture_advantage(inp):
    _SEEN["advantage"] = inp
    return ADVANTAGES.get("grpo")(inp)


def _capture_loss(inp):
    _SEEN["loss"] = inp
    return POLICY_LOSSES.get("ppo_clip")(inp)


@pytest.fixture
def capture_registered(monkeypatch):
    """The capturing estimator and loss, registered for this test only (the registries are global)."""
    for registry, fn in ((ADVANTAGES, _capture_advantage), (POLICY_LOSSES, _capture_loss)):
        monkeypatch.setitem(registry._items, "test_capture_inputs", fn)
        monkeypatch.setitem(registry._docs, "test_capture_inputs", "captures its input (test)")


def test_estimator_and_loss_get_correctness_tool_calls_and_entropy(tiny_model_dir, capture_registered):
    """AdvantageInput.correct is 1/0/NaN from Trajectory.correct, tool_calls counts each row's tool results;
    PolicyLossInput.entropy is the detached token entropy of the forward."""
    from tirl.trainer.forward import response_logprobs
    from tirl.types import ToolResult, ToolStatus

    [g0, _] = _groups()
    calls = lambda n: tuple(ToolResult(str(i), "calc", "", ToolStatus.OK if i else ToolStatus.TIMEOUT)  # noqa: E731
                            for i in range(n))
    trajs = []
    for t, correct, n in zip(g0.trajectories, (True, False, None, True), (0, 1, 3, 2)):
        turn = replace(t.turns[0], tool_results=calls(n))
        trajs.append(replace(t, turns=(turn,), correct=correct))
    model = _model(tiny_model_dir)
    s = UpdateSettings(advantage="test_capture_inputs", loss="test_capture_inputs", micro_batch_size=8)
    rl_update(model, torch.optim.SGD(model.parameters(), lr=0.0), advantages_for([replace(g0, trajectories=tuple(
        trajs))], s), s)
    inp = _SEEN["advantage"]
    torch.testing.assert_close(inp.correct, torch.tensor([1.0, 0.0, float("nan"), 1.0]), equal_nan=True)
    torch.testing.assert_close(inp.tool_calls, torch.tensor([0.0, 1.0, 3.0, 2.0]))
    entropy = _SEEN["loss"].entropy
    with torch.no_grad():
        direct = response_logprobs(model, [t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                                   [t.loss_mask for t in trajs], with_entropy=True).entropy
    assert entropy is not None and not entropy.requires_grad
    torch.testing.assert_close(entropy, direct, atol=1e-5, rtol=0)


PARITY_REWARD = '''
def token_parity(trajectory, problem, group):
    """Fraction of sampled tokens with an even id: varies on random outputs."""
    ids = [t for t, m in zip(trajectory.response_ids, trajectory.loss_mask) if m]
    return {"even": sum(1 for t in ids if t % 2 == 0) / max(1, len(ids))}
'''


def test_kl_in_reward_with_a_lora_base_reference_end_to_end(tmp_path, monkeypatch, tiny_model_dir):
    """`tirl train` with LoRA, kl_placement=reward and the default reference (auto -> lora_base)."""
    import json

    from tirl.cli import main

    (tmp_path / "kl_parity_reward.py").write_text(PARITY_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"model.name={tiny_model_dir}", "task.reward=kl_parity_reward:token_parity",
                 "model.lora.enabled=true", "model.lora.r=2",
                 "algorithm.kl_coef=0.1", "algorithm.kl_placement=reward", "algorithm.kl_estimator=k1",
                 "pipeline.eval_before=false", "pipeline.sft=false", "pipeline.eval_after=false", "rl.steps=2",
                 "rollout.group_size=2", "rollout.prompts_per_step=2", "rollout.max_new_tokens_per_turn=8",
                 "rollout.max_new_tokens=16", "rollout.max_turns=2", "run.tensorboard=false"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "runs" / "default" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["train/kl"] is not None and r["train/kl"] >= 0 for r in recs)
    assert recs[0]["train/kl"] == pytest.approx(0.0, abs=1e-5)  # step 1: the adapter starts at zero
    assert recs[1]["train/kl"] > 0


def test_a_kl_penalty_without_a_reference_is_an_error(tiny_model_dir):
    model = _model(tiny_model_dir)
    s = UpdateSettings(kl_coef=0.1)
    with pytest.raises(ValueError, match="needs a reference policy"):
        rl_update(model, torch.optim.SGD(model.parameters(), lr=0.0), advantages_for(_groups(), s), s)
    with pytest.raises(ValueError, match="needs a reference policy"):
        advantages_for(_groups(), replace(s, kl_placement="reward"), model)
