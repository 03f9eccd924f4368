"""PPO critic: the value head reads the hidden state that predicts each token, its old values feed GAE,
the clipped value loss trains it (head only during warm-up), it is saved with checkpoints and next to
the final model, and the config decides when it runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tirl.algorithms import gae_advantages
from tirl.config import OptimConfig, load_config
from tirl.errors import ConfigError
from tirl.trainer.checkpoint import CheckpointManager
from tirl.trainer.critic import ValueHead, explained_variance, load_value_head, make_value_head, save_value_head
from tirl.trainer.forward import response_logprobs
from tirl.trainer.optim import make_optimizer, make_scheduler
from tirl.trainer.update import UpdateSettings, advantages_for, rl_update
from tirl.types import StopReason, Trajectory, TrajectoryGroup, TrajectoryMeta, Turn


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")


def _traj(prompt, response, mask, reward, gid, k):
    turns = (Turn(0, len(response), len(response), "", "eos"),)
    return Trajectory(tuple(prompt), tuple(response), tuple(mask), tuple(-1.0 if m else 0.0 for m in mask), turns,
                      (), StopReason.ANSWERED, TrajectoryMeta("t", gid, k), reward=reward)


def _groups():
    g = torch.Generator().manual_seed(5)
    rand = lambda n: torch.randint(0, 500, (n,), generator=g).tolist()  # noqa: E731
    groups = []
    for gi in range(2):
        prompt = rand(5)
        trajs = [_traj(prompt, rand(n), [1] * (n - 2) + [0, 1], r, str(gi), k)
                 for k, (n, r) in enumerate([(6, 1.0), (4, 0.0), (7, 0.5)])]
        groups.append(TrajectoryGroup(str(gi), "t", tuple(trajs)))
    return groups


def _head(model, seed=0):
    head = make_value_head(model)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(head.linear.weight.shape, generator=torch.Generator().manual_seed(seed)))
        head.linear.bias.fill_(0.3)
    return head


def test_values_come_from_the_hidden_state_that_predicts_each_token(tiny_model_dir):
    """V_t is read where log pi(token t) is: at prompt+response position len(prompt)+t-1; 0 where the mask is 0."""
    model = _model(tiny_model_dir)
    head = _head(model)
    prompts, responses, masks = [[5, 6, 7], [5, 6, 8, 9]], [[10, 11, 12], [13, 14]], [[1, 0, 1], [1, 1]]
    with torch.no_grad():
        out = response_logprobs(model, prompts, responses, masks, value_head=head)
        for i, (p, r, m) in enumerate(zip(prompts, responses, masks)):
            hidden = model.model(input_ids=torch.tensor([p + r])).last_hidden_state[0]
            for k, on in enumerate(m):
                expected = float(head(hidden[len(p) + k - 1:len(p) + k])[0]) if on else 0.0
                assert out.values[i, k].item() == pytest.approx(expected, abs=1e-5)
    assert out.values.shape == out.logprobs.shape


def test_zero_initialised_head_starts_at_zero(tiny_model_dir):
    head = make_value_head(_model(tiny_model_dir))
    with torch.no_grad():
        assert float(head(torch.randn(3, head.linear.in_features)).abs().sum()) == 0.0


def test_explained_variance_hand_value():
    """Ret=[1,2,3,4], V=[1,2,3,3]: Var(Ret-V)=0.25, Var(Ret)=5/3 (unbiased) -> 1 - 0.15 = 0.85; a masked-out
    position does not count."""
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    val = torch.tensor([[1.0, 2.0, 3.0, 3.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(val, ret, mask) == pytest.approx(0.85)
    assert math.isnan(explained_variance(val, torch.ones_like(ret), mask))


def test_gae_gets_the_old_values_and_returns_are_targets(tiny_model_dir):
    """The batch's old values are the head's values; with whiten=False the advantages are masked GAE of
    (outcome rewards, old values) and returns = A + V_old on sampled tokens."""
    model = _model(tiny_model_dir)
    head = _head(model)
    s = UpdateSettings(advantage="gae", advantage_kwargs={"whiten": False, "lam": 0.9})
    batch = advantages_for(_groups(), s, model, head)
    trajs = batch.trajs
    with torch.no_grad():
        direct = response_logprobs(model, [t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                                   [t.loss_mask for t in trajs], value_head=head).values
    torch.testing.assert_close(batch.old_values[:, :direct.shape[1]], direct, atol=1e-5, rtol=0)
    from tirl.algorithms import AdvantageInput, outcome_token_rewards

    rewards = outcome_token_rewards(torch.tensor([t.reward for t in trajs]), batch.mask)
    inp = AdvantageInput(rewards, batch.mask, torch.tensor([0, 0, 0, 1, 1, 1]), values=batch.old_values)
    adv, ret = gae_advantages(inp, whiten=False, lam=0.9)
    torch.testing.assert_close(batch.advantages, adv)
    torch.testing.assert_close(batch.returns, (adv + batch.old_values) * batch.mask)
    assert batch.stats["critic/values_mean"] == pytest.approx(float((batch.old_values * batch.mask).sum()
                                                                    / batch.mask.sum()), abs=1e-6)


def test_gae_without_a_critic_is_an_error():
    with pytest.raises(ValueError, match="needs critic values"):
        advantages_for(_groups(), UpdateSettings(advantage="gae"))


def test_value_loss_enters_the_update(tiny_model_dir):
    """With lr 0 the values in the loss equal the old values, so the clipped loss is the plain one:
    vf_loss = 0.5 * mean over sampled tokens of (V_old - Ret)^2, and the total loss adds coef * vf_loss."""
    model = _model(tiny_model_dir)
    head = _head(model)
    s = UpdateSettings(advantage="gae", critic_coef=0.25, max_grad_norm=None)
    batch = advantages_for(_groups(), s, model, head)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.0)
    metrics = rl_update(model, opt, batch, s, critic=head)
    m = batch.mask
    expected = 0.5 * float((((batch.old_values - batch.returns) ** 2) * m).sum() / m.sum())
    assert metrics["critic/vf_loss"] == pytest.approx(expected, rel=1e-4)
    assert metrics["critic/vf_clipfrac"] == 0.0
    s0 = UpdateSettings(advantage="gae", critic_coef=0.0, max_grad_norm=None)
    metrics0 = rl_update(model, opt, batch, s0, critic=head)
    assert metrics["train/loss"] - metrics0["train/loss"] == pytest.approx(0.25 * expected, rel=1e-3)
    for key in ("critic/values_mean", "critic/explained_variance", "critic/returns_mean"):
        assert key in metrics


def test_critic_learns_the_returns(tiny_model_dir):
    """A few updates of the head alone (warm-up) bring the values toward the returns."""
    model = _model(tiny_model_dir)
    head = make_value_head(model)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    s = UpdateSettings(advantage="gae", critic_only=True, critic_clip=None)
    first = last = None
    for _ in range(15):
        metrics = rl_update(model, opt, advantages_for(_groups(), s, model, head), s, critic=head)
        first = metrics["critic/vf_loss"] if first is None else first
        last = metrics["critic/vf_loss"]
    assert last < 0.5 * first


def test_warmup_trains_the_head_only(tiny_model_dir):
    model = _model(tiny_model_dir)
    head = _head(model)
    before = [p.detach().clone() for p in model.parameters()]
    head_before = head.linear.weight.detach().clone()
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.5)
    s = UpdateSettings(advantage="gae", critic_only=True)
    metrics = rl_update(model, opt, advantages_for(_groups(), s, model, head), s, critic=head)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not torch.equal(head_before, head.linear.weight)
    assert "train/pg_clipfrac" not in metrics and metrics["critic/vf_loss"] > 0


def test_head_is_checkpointed_and_resumes_exactly(tmp_path, tiny_model_dir):
    """The head is a parameter group with its own lr (same schedule) and part of every checkpoint: restoring
    it into a fresh head and optimizer continues bit for bit."""
    class Stage:
        pass

    def setup():
        torch.manual_seed(0)
        stage = Stage()
        stage.model = torch.nn.Linear(4, 4)
        cfg = OptimConfig(lr=0.01, warmup_steps=2, schedule="cosine")
        stage.optimizer = make_optimizer(stage.model, cfg)
        stage.scheduler = make_scheduler(stage.optimizer, cfg, 10)
        stage.ckpt = CheckpointManager(tmp_path / "ck")
        head = ValueHead(4)
        from tirl.trainer.critic import attach_to_stage

        attach_to_stage(head, stage, 0.05, cfg, 10)
        return stage, head

    def train(stage, head, steps):
        for _ in range(steps):
            x = torch.randn(3, 4)
            (head(stage.model(x)) - 1).pow(2).mean().backward()
            stage.optimizer.step()
            stage.optimizer.zero_grad()
            stage.scheduler.step()

    stage, head = setup()
    assert [g["lr"] for g in stage.optimizer.param_groups] == pytest.approx([0.005, 0.025])  # warm-up 1/2
    train(stage, head, 3)
    stage.ckpt.save(3, stage.model, stage.optimizer, stage.scheduler, {})
    train(stage, head, 2)
    expected = head.linear.weight.detach().clone()
    stage2, head2 = setup()
    stage2.ckpt.load(stage2.ckpt.latest(), stage2.model, stage2.optimizer, stage2.scheduler)
    train(stage2, head2, 2)
    assert torch.equal(head2.linear.weight, expected)


def test_a_checkpoint_without_the_head_is_refused(tmp_path):
    from tirl.errors import ResumeError

    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, OptimConfig())
    sched = make_scheduler(opt, OptimConfig(), 3)
    CheckpointManager(tmp_path).save(1, model, opt, sched, {})
    ckpt = CheckpointManager(tmp_path)
    ckpt.attach("value_head", ValueHead(2))
    with pytest.raises(ResumeError, match="value_head.safetensors"):
        ckpt.load(ckpt.latest(), model, opt, sched)


def test_save_and_load_value_head(tmp_path):
    head = ValueHead(3)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    save_value_head(head, tmp_path / "final.value_head.safetensors")
    again = load_value_head(tmp_path / "final.value_head.safetensors")
    assert torch.equal(again.linear.weight, head.linear.weight)


@pytest.mark.parametrize(("overrides", "message"), [
    (["algorithm.advantage=gae", "algorithm.critic.enabled=false"], "needs critic values"),
    (["algorithm.critic.coef=0.5"], "algorithm.critic.* has no effect"),
    (["algorithm.advantage=gae", "algorithm.critic.warmup_steps=5", "rl.steps=5"], "leaves no policy update"),
])
def test_preflight_checks_the_critic_settings(overrides, message):
    from tirl.trainer.build import preflight

    with pytest.raises(ConfigError, match=message):
        preflight(load_config(None, ["pipeline.eval_before=false", *overrides]))


def test_critic_is_on_when_the_estimator_needs_values():
    from tirl.trainer.build import critic_enabled

    assert critic_enabled(load_config(None, ["algorithm.advantage=gae"]))
    assert not critic_enabled(load_config(None, []))
    assert critic_enabled(load_config(None, ["algorithm.critic.enabled=true", "algorithm.critic.coef=0.2"]))
    with pytest.raises(ConfigError, match="has no effect while algorithm.critic.enabled=false"):
        load_config(None, ["algorithm.critic.enabled=false", "algorithm.critic.coef=0.2"])


PARITY_REWARD = '''
def token_parity(trajectory, problem, group):
    """Fraction of sampled tokens with an even id: varies on random outputs."""
    ids = [t for t, m in zip(trajectory.response_ids, trajectory.loss_mask) if m]
    return {"even": sum(1 for t in ids if t % 2 == 0) / max(1, len(ids))}
'''

RL_ONLY = ["pipeline.eval_before=false", "pipeline.sft=false", "pipeline.eval_after=false", "rl.steps=2",
           "rollout.group_size=2", "rollout.prompts_per_step=2", "rollout.max_new_tokens_per_turn=8",
           "rollout.max_new_tokens=16", "rollout.max_turns=2", "run.tensorboard=false",
           "task.reward=critic_parity_reward:token_parity"]
"""A fast RL-only run on the tiny model, with a reward that varies on its random outputs."""


def test_ppo_with_gae_trains_end_to_end(tmp_path, monkeypatch, tiny_model_dir):
    """`tirl train` with algorithm.advantage=gae: critic metrics every step (the first a warm-up step) and the
    head saved next to the final model."""
    from tirl.cli import main

    (tmp_path / "critic_parity_reward.py").write_text(PARITY_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"model.name={tiny_model_dir}", "algorithm.advantage=gae", "algorithm.critic.warmup_steps=1",
                 *RL_ONLY]) == 0
    run = tmp_path / "runs" / "default"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["critic/warmup"] for r in recs] == [1.0, 0.0]
    assert all(r["critic/vf_loss"] is not None and "critic/explained_variance" in r for r in recs)
    assert "train/pg_clipfrac" in recs[1] and "train/pg_clipfrac" not in recs[0]
    head = load_value_head(run / "models" / "final.value_head.safetensors")
    assert head.linear.weight.abs().sum() > 0  # trained from its zero start
