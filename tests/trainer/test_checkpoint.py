"""Checkpoints restore weights, optimizer, scheduler and RNG exactly; incomplete ones are ignored."""

from __future__ import annotations

import random

import torch

from tirl.config import OptimConfig
from tirl.trainer.checkpoint import CheckpointManager
from tirl.trainer.optim import make_optimizer, make_scheduler


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = make_optimizer(model, OptimConfig(lr=0.1, warmup_steps=2, schedule="cosine"))
    sched = make_scheduler(opt, OptimConfig(lr=0.1, warmup_steps=2, schedule="cosine"), 10)
    return model, opt, sched


def _train(model, opt, sched, steps):
    for _ in range(steps):
        loss = model(torch.randn(3, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def test_resume_is_exact(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    ckpt = CheckpointManager(tmp_path, keep=2)
    ckpt.save(3, model, opt, sched, {"cursor": 42})
    _train(model, opt, sched, 2)
    expected = [p.clone() for p in model.parameters()]
    marker = random.random()

    model2, opt2, sched2 = _setup()
    state = ckpt.load(ckpt.latest(), model2, opt2, sched2)
    assert state == {"step": 3, "cursor": 42}
    _train(model2, opt2, sched2, 2)
    for a, b in zip(expected, model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert random.random() == marker  # python RNG restored to the same point


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    model, opt, sched = _setup()
    ckpt = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, model, opt, sched, {})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]
    (tmp_path / "step_000009").mkdir()  # killed while writing: no COMPLETE marker
    assert ckpt.latest().name == "step_000003"


def test_learning_rate_schedule():
    model, opt, sched = _setup()
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.05 and lrs[1] == 0.1
    assert lrs[2] > lrs[5] > lrs[9] > 0
