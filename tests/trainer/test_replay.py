"""SPEAR self-imitation replay (reference 4.3): P50 recalibration, the cosine warm-up of beta, threshold,
FIFO and age eviction, JSON checkpointing, the replay term of the loss, and a real short run."""

from __future__ import annotations

import json

import pytest
import torch

from tirl.trainer.replay import ReplayBuffer, ReplayEntry, p50, recalibrated, replay_batch, replay_weight
from tirl.trainer.update import Batch, UpdateSettings, advantages_for, loss_masks, rl_update, with_old_logprobs
from tirl.types import StopReason, ToolCall, ToolResult, Trajectory, TrajectoryGroup, TrajectoryMeta, Turn


def _traj(reward, n=4, gid="g", k=0, prompt=(5, 6, 7)):
    response = tuple(range(10 + k, 10 + k + n))
    mask = (1,) * (n - 1) + (0,) if n > 1 else (1,)
    turns = (Turn(0, n - 1 if n > 1 else 1, n, "x", "stop", (ToolCall("c", "calc", {"a": 1}),),
                  (ToolResult("c", "calc", "2"),)),)
    return Trajectory(tuple(prompt), response, mask, tuple(-0.5 * m for m in mask), turns, (),
                      StopReason.ANSWERED, TrajectoryMeta("t", gid, k), reward=reward, correct=reward > 0.5)


def _batch(rewards, advantages):
    trajs = [_traj(r, k=i) for i, r in enumerate(rewards)]
    mask = loss_masks(trajs)
    adv = torch.tensor(advantages, dtype=torch.float32).unsqueeze(-1) * mask
    old = -0.25 * mask
    return Batch(trajs, mask, adv, old_logprobs=old)


def test_p50_recalibration_reference_values():
    """D_R = [0,0,1,1,1] -> P50 = 1; a stored trajectory with R = 1 gets A~ = 0 and is dropped, R = 1.5 is kept
    with A~ = 0.5."""
    assert p50([0, 0, 1, 1, 1]) == 1.0
    assert p50([0, 1]) == 0.5  # linear interpolation
    entries = [ReplayEntry(_traj(r), (), 1.0, 0) for r in (1.0, 1.5)]
    [(kept, adv)] = recalibrated(entries, p50([0, 0, 1, 1, 1]))
    assert kept.traj.reward == 1.5 and adv == 0.5
    with pytest.raises(ValueError, match="empty"):
        p50([])


def test_beta_cosine_warmup():
    """beta(s) = coef (1 - cos(pi s/T)) / 2: beta(0) = 0, beta(T/2) = coef/2, beta(T) = coef, coef after."""
    assert replay_weight(0, 0.8, 100) == 0.0
    assert replay_weight(50, 0.8, 100) == pytest.approx(0.4)
    assert replay_weight(100, 0.8, 100) == 0.8
    assert replay_weight(250, 0.8, 100) == 0.8
    assert replay_weight(0, 0.8, 0) == 0.8


def test_threshold_fifo_and_old_logprobs_stored():
    buf = ReplayBuffer(size=3, threshold=1.0, tolerate_steps=10, reward_window=100)
    assert buf.add(_batch([1.0, 0.0, 1.0, 1.0], [1.5, -1.0, 1.0, 2.0]), step=0) == 2  # 1.0 is not > 1.0
    assert [e.advantage for e in buf.entries] == [1.5, 2.0]
    assert buf.entries[0].old_logprobs == (-0.25, -0.25, -0.25, 0.0)  # masked position stored as 0
    buf.add(_batch([1.0, 1.0], [3.0, 4.0]), step=1)
    assert [e.advantage for e in buf.entries] == [2.0, 3.0, 4.0]  # the oldest went first
    with pytest.raises(ValueError, match="old log-probs"):
        buf.add(Batch([_traj(1.0)], loss_masks([_traj(1.0)]), torch.ones(1, 4)), step=2)


def test_entries_older_than_tolerate_steps_are_evicted():
    buf = ReplayBuffer(size=10, threshold=0.0, tolerate_steps=2, reward_window=100)
    for step in range(4):
        buf.add(_batch([1.0], [1.0]), step=step)
    assert buf.evict(4) == 2  # stored at steps 0 and 1 are 4 and 3 versions old
    assert [e.step for e in buf.entries] == [2, 3]
    assert buf.evict(4) == 0


def test_step_recalibrates_samples_and_is_seeded():
    buf = ReplayBuffer(size=10, threshold=0.0, tolerate_steps=5, reward_window=5)
    buf.add(_batch([2.0, 1.0, 0.5], [1.0, 1.0, 1.0]), step=0)
    rows, metrics = buf.step(_batch([0.0, 0.0, 1.0, 1.0, 1.0], [-1.0, -1.0, 0.5, 0.5, 0.5]), step=1, seed=0,
                             batch_size=None)
    assert metrics["replay/p50"] == 1.0 and metrics["replay/eligible"] == 1.0 and metrics["replay/rows"] == 1.0
    assert [t.reward for t in rows.trajs] == [2.0]
    torch.testing.assert_close(rows.advantages, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))  # A~ = 2 - 1 on sampled
    torch.testing.assert_close(rows.old_logprobs, torch.tensor([[-0.25, -0.25, -0.25, 0.0]]))
    many = ReplayBuffer(size=50, threshold=0.0, tolerate_steps=5, reward_window=5)
    many.add(_batch([float(r) for r in range(2, 22)], [1.0] * 20), step=0)
    picks = [tuple(t.reward for t in many.step(_batch([0.0], [0.0]), 1, seed, 4)[0].trajs) for seed in (0, 0, 1)]
    assert len(picks[0]) == 4 and picks[0] == picks[1] and picks[0] != picks[2]


def test_buffer_state_is_json_and_round_trips():
    buf = ReplayBuffer(size=10, threshold=0.0, tolerate_steps=5, reward_window=3)
    buf.add(_batch([1.0, 2.0], [0.5, 0.7]), step=3)
    buf.rewards.extend([0.0, 1.0, 2.0, 3.0])
    state = json.loads(json.dumps(buf.state_dict()))
    again = ReplayBuffer(size=10, threshold=0.0, tolerate_steps=5, reward_window=3)
    again.load_state_dict(state)
    assert again.entries == buf.entries and list(again.rewards) == [1.0, 2.0, 3.0]


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")


def _group():
    trajs = tuple(_traj(r, n=5, k=k) for k, r in enumerate([1.0, 0.0, 0.0, 1.0]))
    return TrajectoryGroup("g", "t", trajs)


def test_replay_term_adds_beta_times_the_policy_loss(tiny_model_dir):
    """The update's loss is the on-policy loss + beta * the replay rows' policy loss (own normalisers); with
    equal old and current log-probs the ppo_clip loss of a row set is -token-mean(A~)."""
    model = _model(tiny_model_dir)
    s = UpdateSettings(max_grad_norm=None)
    batch = with_old_logprobs(model, advantages_for([_group()], s), s)
    rows = replay_batch([(ReplayEntry(t, tuple(batch.old_logprobs[i, :5].tolist()), 1.0, 0), a)
                         for i, (t, a) in enumerate(zip(batch.trajs[:2], (0.5, 2.0)))])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    base = rl_update(model, opt, batch, s)
    with_replay = rl_update(model, opt, batch, s, replay=rows, replay_weight=0.3)
    expected_replay = -(0.5 * 4 + 2.0 * 4) / 8
    assert with_replay["replay/loss"] == pytest.approx(expected_replay, rel=1e-4)
    assert with_replay["train/loss"] == pytest.approx(base["train/loss"] + 0.3 * expected_replay, rel=1e-4)
    assert rl_update(model, opt, batch, s, replay=rows, replay_weight=0.0).keys() == base.keys()


def test_replay_rows_move_the_policy_toward_them(tiny_model_dir):
    from tirl.trainer.forward import response_logprobs

    model = _model(tiny_model_dir)
    s = UpdateSettings(max_grad_norm=None)
    flat = TrajectoryGroup("g", "t", tuple(_traj(0.0, n=5, k=k) for k in range(4)))  # all-equal: no on-policy signal
    batch = with_old_logprobs(model, advantages_for([flat], s), s)
    target = _traj(1.0, n=6, k=9)
    old = with_old_logprobs(model, advantages_for([TrajectoryGroup("h", "t", (target,))], s), s).old_logprobs
    rows = replay_batch([(ReplayEntry(target, tuple(old[0].tolist()), 1.0, 0), 1.0)])

    def lp():
        with torch.no_grad():
            return float(response_logprobs(model, [target.prompt_ids], [target.response_ids],
                                           [target.loss_mask]).logprobs.sum())

    before = lp()
    rl_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, s, replay=rows, replay_weight=1.0)
    assert lp() > before + 1e-3


def test_replay_short_run(tmp_path, monkeypatch, tiny_model_dir):
    """`tirl train` with algorithm.replay.enabled: the buffer fills from good rows and is replayed."""
    from tirl.cli import main

    (tmp_path / "replay_parity_reward.py").write_text(PARITY_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"model.name={tiny_model_dir}", "task.reward=replay_parity_reward:token_parity",
                 "algorithm.replay.enabled=true", "algorithm.replay.threshold=0.0", "algorithm.replay.warmup_steps=2",
                 "algorithm.replay.tolerate_steps=1", "pipeline.eval_before=false", "pipeline.sft=false",
                 "pipeline.eval_after=false", "rl.steps=3", "rollout.group_size=3", "rollout.prompts_per_step=2",
                 "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16", "rollout.max_turns=2",
                 "run.tensorboard=false"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "runs" / "default" / "metrics.jsonl").read_text().splitlines()]
    assert [r["replay/beta"] for r in recs] == pytest.approx([0.0, 0.5, 1.0])
    assert recs[0]["replay/added"] > 0 and recs[-1]["replay/size"] > 0
    assert any(r["replay/rows"] > 0 and "replay/loss" in r for r in recs[1:])


PARITY_REWARD = '''
def token_parity(trajectory, problem, group):
    """Fraction of sampled tokens with an even id: varies on random outputs."""
    ids = [t for t, m in zip(trajectory.response_ids, trajectory.loss_mask) if m]
    return {"even": sum(1 for t in ids if t % 2 == 0) / max(1, len(ids))}
'''


def test_replay_settings_without_replay_are_refused():
    from tirl.config import load_config
    from tirl.errors import ConfigError

    with pytest.raises(ConfigError, match="algorithm.replay.* has no effect"):
        load_config(None, ["algorithm.replay.coef=0.5"])
