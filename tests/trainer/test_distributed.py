"""Data-parallel training (module `tirl.trainer.distributed`) with two real gloo processes on the CPU.

A two-rank update on a fixed batch whose ranks hold unequal token counts gives the single-process
update (ddp and fsdp2), while the naive mean of the ranks' own updates does not; a short `tirl train`
run under torchrun saved at world size 2 resumes at world size 1; config errors name the key.

This file is also the ranks' program: `python -m torch.distributed.run --nproc-per-node 2 <this file>
update <model dir> <out file> <strategy>`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tirl.config import load_config
from tirl.errors import ConfigError
from tirl.trainer import distributed
from tirl.trainer.distributed import World, share_bounds
from tirl.trainer.update import Batch, UpdateSettings, advantages_for, rl_update
from tirl.types import StopReason, Trajectory, TrajectoryGroup, TrajectoryMeta, Turn

LR = 0.5
CLIP = 0.05
"""A max_grad_norm small enough that clipping is active: the ranks must clip with the global norm. (Without
clipping, a wrong gradient scale shows; with it, a wrong norm.)"""


def _traj(prompt, response, reward, gid, k):
    turns = (Turn(0, len(response), len(response), "", "eos"),)
    return Trajectory(tuple(prompt), tuple(response), (1,) * len(response), (-1.0,) * len(response), turns, (),
                      StopReason.ANSWERED, TrajectoryMeta("t", gid, k), reward=reward)


def _groups() -> list[TrajectoryGroup]:
    """Two groups of 4; rank 0's rows (group 0) hold 10 tokens, rank 1's (group 1) 34."""
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(0, 500, (n,), generator=g).tolist()  # noqa: E731
    lengths = [(2, 3, 1, 4), (12, 5, 9, 8)]
    groups = []
    for gi in range(2):
        prompt = rand(5)
        trajs = [_traj(prompt, rand(n), float(k % 2) + 0.25 * gi * k, str(gi), k) for k, n in enumerate(lengths[gi])]
        groups.append(TrajectoryGroup(str(gi), "t", tuple(trajs)))
    return groups


def _settings(max_grad_norm: float | None, world: World = World()) -> UpdateSettings:
    return UpdateSettings(max_grad_norm=max_grad_norm, micro_batch_size=1, world=world)


def _model(model_dir, lora: bool = False):
    """The tiny model, with LoRA adapters (seeded: every process makes the same ones) when `lora`."""
    from transformers import AutoModelForCausalLM

    from tirl.models.loading import apply_lora

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(0)
    return apply_lora(model, 4, 8, 0.0, "all-linear") if lora else model


def _updated(model, batch: Batch, s: UpdateSettings) -> dict[str, torch.Tensor]:
    rl_update(model, torch.optim.SGD(model.parameters(), lr=LR), batch, s)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _rows(batch: Batch, rows: list[int]) -> Batch:
    """`batch` restricted to `rows` (its own normalisers: what a rank that knew only its rows would do)."""
    pick = lambda t: t[rows] if isinstance(t, torch.Tensor) else t  # noqa: E731
    return dataclasses.replace(batch, trajs=[batch.trajs[i] for i in rows], mask=pick(batch.mask),
                               advantages=pick(batch.advantages), old_logprobs=pick(batch.old_logprobs),
                               train_mask=pick(batch.train_mask))


# ----------------------------------------------------------------------------- the ranks' program


def _rank_update(model_dir: str, out: str, strategy: str, max_grad_norm: str, lora: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world = World(strategy, dist.get_rank(), dist.get_world_size())
    distributed.use(world)
    model = distributed.prepare_model(_model(model_dir, lora == "lora"), world)
    s = _settings(float(max_grad_norm) or None, world)
    metrics = rl_update(model, torch.optim.SGD(model.parameters(), lr=LR), advantages_for(_groups(), s), s)
    state = {n: v.detach().clone() for n, v in distributed.full_model_state(model, world).items()}
    if world.is_main:
        torch.save({"params": state, "metrics": metrics}, out)
    distributed.teardown()


# ----------------------------------------------------------------------------- helpers


def _torchrun(args: list[str], cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("strategy, max_grad_norm, lora", [
    ("ddp", None, False), ("ddp", CLIP, False), ("ddp", CLIP, True), ("fsdp2", None, False), ("fsdp2", CLIP, False)])
def test_two_rank_update_equals_single_process(tiny_model_dir, tmp_path, strategy, max_grad_norm, lora):
    """Exact: the ranks' summed gradients are the single-process gradient (token mean over the global
    batch, global clipping norm). The naive mean of the ranks' own updates (each normalised by its own
    tokens, clipped by its own norm) is far off, so the comparison can fail."""
    groups = _groups()
    s = _settings(max_grad_norm)
    batch = advantages_for(groups, s)
    reference = _updated(_model(tiny_model_dir, lora), batch, s)
    rows = list(range(len(batch.trajs)))
    shares = [rows[slice(*share_bounds(len(rows), r, 2))] for r in range(2)]
    assert [int(batch.mask[sh].sum()) for sh in shares] == [10, 34]
    per_rank = [_updated(_model(tiny_model_dir, lora), _rows(batch, sh), s) for sh in shares]
    naive = {n: (per_rank[0][n] + per_rank[1][n]) / 2 for n in reference}

    out = tmp_path / "params.pt"
    _torchrun([__file__, "update", str(tiny_model_dir), str(out), strategy, str(max_grad_norm or 0),
               "lora" if lora else "full"])
    got = torch.load(out)["params"]
    start = dict(_model(tiny_model_dir, lora).named_parameters())

    def max_diff(a, b):
        return max(float((a[n] - b[n]).abs().max()) for n in reference)

    step_size = max_diff(reference, start)
    assert step_size > 1e-3, "the update must move the weights"
    assert max_diff(naive, reference) > 1e-3 * step_size * 100, "the naive mean of rank means must differ"
    assert max_diff(got, reference) < 1e-6, f"{strategy}: differs from the single-process update"


REWARD = '''
def token_parity(trajectory, problem, group):
    """Fraction of sampled tokens with an even id: varies on random outputs."""
    ids = [t for t, m in zip(trajectory.response_ids, trajectory.loss_mask) if m]
    return {"even": sum(1 for t in ids if t % 2 == 0) / max(1, len(ids))}
'''

VOLATILE = ("time/", "speed/", "gen/batches", "gen/decode_steps", "gen/prefill_tokens")


def _train_args(model_dir: Path, steps: int) -> list[str]:
    return ["-m", "tirl.cli", "train", f"model.name={model_dir}", "task.reward=dist_reward:token_parity",
            "pipeline.eval_before=false", "pipeline.sft=false", "pipeline.eval_after_sft=false",
            "pipeline.eval_after=false", f"rl.steps={steps}", "rl.save_every=1", "rollout.group_size=3",
            "rollout.prompts_per_step=2", "rollout.max_new_tokens_per_turn=12", "rollout.max_new_tokens=24",
            "rollout.max_turns=2", "rl.optim.lr=1e-3", "run.tensorboard=false", "run.seed=3"]


def _metrics(run_dir: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in recs if r["stage"] == "rl"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} was written: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.1)


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "dist_reward.py").write_text(REWARD)
    path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    # --standalone: the rendezvous picks a free port itself (a port chosen here could be taken meanwhile)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory) -> tuple[dict[int, dict], Path]:
    """Metrics and final model directory of an uninterrupted single-process run of 4 RL steps."""
    tmp = tmp_path_factory.mktemp("straight")
    subprocess.run([sys.executable, *_train_args(tiny_model_dir, 4)], cwd=tmp, env=_env(tmp), check=True,
                   capture_output=True, timeout=300)
    return _metrics(tmp / "runs" / "default"), tmp / "runs" / "default" / "models" / "final"


def _assert_equals_straight_run(run_dir: Path, straight_run) -> None:
    """Four RL steps whose metrics equal the single-process run's (1e-4) and a final model within 1e-6."""
    got = _metrics(run_dir)
    straight_metrics, straight_final = straight_run
    assert sorted(got) == [1, 2, 3, 4]
    for step, want in straight_metrics.items():
        assert got[step].keys() == want.keys()
        for k, v in want.items():
            assert got[step][k] == (pytest.approx(v, rel=1e-4, abs=1e-6) if isinstance(v, float) else v), (step, k)
    final, want_final = _model(run_dir / "models" / "final"), _model(straight_final)
    assert max(float((a - b).abs().max()) for a, b in zip(final.parameters(), want_final.parameters())) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("strategy, first, then", [("ddp", 2, 1), ("fsdp2", 2, 1), ("fsdp2", 1, 2)])
def test_run_resumes_at_another_world_size(tiny_model_dir, tmp_path, straight_run, strategy, first, then):
    """`tirl train` with `first` ranks (torchrun, gloo), stopped after its step-2 checkpoint, then the same
    command with `then` ranks: it resumes at step 2 (cursor 4) and its four steps' metrics equal those of
    an uninterrupted single-process run (same sampling seeds, same groups, an exact update), and so does
    the final model."""
    env = _env(tmp_path)
    args = [*_train_args(tiny_model_dir, 4), f"distributed.strategy={strategy if first > 1 else 'none'}"]
    proc = subprocess.Popen([*_launcher(first), *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "runs" / "default" / "checkpoints" / "rl" / "step_000002"
    try:
        _wait_for(ckpt / "COMPLETE", proc)
    finally:
        proc.terminate()  # torchrun stops its ranks
        proc.wait(timeout=60)
    assert json.loads((ckpt / "state.json").read_text())["cursor"] == 4
    assert not (tmp_path / "runs" / "default" / "models" / "final").exists()

    args[-1] = f"distributed.strategy={strategy if then > 1 else 'none'}"
    resumed = subprocess.run([*_launcher(then), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the run" in resumed.stdout
    _assert_equals_straight_run(tmp_path / "runs" / "default", straight_run)


def test_sync_when_no_rank_has_a_gradient():
    """A step whose every advantage is 0 gives no rank a gradient: the sum is skipped, not an error (it
    was `torch.cat` of an empty list)."""
    _torchrun([__file__, "nograd"])


@pytest.mark.slow
def test_ray_launcher_equals_single_process(tiny_model_dir, tmp_path, straight_run):
    """`distributed.launcher=ray`: `tirl train` starts two Ray Train ranks (TorchTrainer, gloo, a local Ray)
    that run the pipeline under ddp; metrics and the final model equal the single-process run's."""
    args = [*_train_args(tiny_model_dir, 4), "distributed.launcher=ray", "distributed.strategy=ddp",
            "distributed.num_workers=2"]
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_equals_straight_run(tmp_path / "runs" / "default", straight_run)
    assert not list(tmp_path.glob("**/ray_results")) and not (tmp_path / "runs" / "default" / "ray").exists()


def test_ray_launcher_settings_are_checked():
    with pytest.raises(ConfigError, match="distributed.num_workers has no effect unless distributed.launcher=ray"):
        load_config(None, ["distributed.num_workers=4"])
    with pytest.raises(ConfigError, match="launcher=ray starts ranks for data-parallel training"):
        load_config(None, ["distributed.launcher=ray"])


def _sft_args(model_dir: Path) -> list[str]:
    return ["-m", "tirl.cli", "train", f"model.name={model_dir}", "pipeline.eval_before=false", "pipeline.rl=false",
            "pipeline.eval_after_sft=false", "pipeline.eval_after=false", "sft.examples=12", "sft.batch_size=4",
            "sft.micro_batch_size=1", "sft.save_every=1", "run.tensorboard=false", "run.seed=3"]


@pytest.fixture(scope="module")
def single_process_sft(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    subprocess.run([sys.executable, *_sft_args(tiny_model_dir)], cwd=tmp, env=_env(tmp), check=True,
                   capture_output=True, timeout=300)
    return tmp / "runs" / "default"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_rank_sft_equals_single_process(tiny_model_dir, tmp_path, single_process_sft, strategy):
    """The SFT cold start under torchrun (each rank its share of every batch, the batch's token count as
    the normaliser) logs the single-process metrics and saves the single-process model."""
    proc = subprocess.run([*_launcher(2), *_sft_args(tiny_model_dir), f"distributed.strategy={strategy}"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "default"
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    got, want = lines(run), lines(single_process_sft)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
    for g, w in zip(got, want):
        for k, rel in (("train/loss", 1e-5), ("train/nll", 1e-5), ("train/tokens", 0), ("train/grad_norm", 1e-4)):
            assert g[k] == pytest.approx(w[k], rel=rel), k  # the norm: float32 sums of shards in another order
    final, want_final = _model(run / "models" / "sft"), _model(single_process_sft / "models" / "sft")
    assert max(float((a - b).abs().max()) for a, b in zip(final.parameters(), want_final.parameters())) < 1e-6


@pytest.mark.parametrize("overrides, key", [
    (["distributed.strategy=ddp"], "WORLD_SIZE"),
    (["distributed.strategy=fsdp2"], "WORLD_SIZE"),
])
def test_strategy_without_torchrun_is_a_config_error(overrides, key):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=key):
        distributed.resolve_strategy(cfg, env={})


def test_auto_resolves_by_launch():
    cfg = load_config(None, ["distributed.strategy=auto", "rollout.prompts_per_step=4"])
    assert distributed.resolve_strategy(cfg, env={}) == "none"
    assert distributed.resolve_strategy(cfg, env={"WORLD_SIZE": "2"}) == "ddp"
    assert distributed.resolve_strategy(load_config(None, []), env={"WORLD_SIZE": "2"}) == "none"


@pytest.mark.parametrize("overrides, key", [
    (["rollout.prompts_per_step=3"], "rollout.prompts_per_step"),
    (["rollout.prompts_per_step=4", "rollout.dynamic_sampling.enabled=true"], "rollout.dynamic_sampling.enabled"),
    (["rollout.prompts_per_step=4", "distributed.strategy=fsdp2", "model.lora.enabled=true"], "model.lora.enabled"),
    (["rollout.prompts_per_step=4", "distributed.strategy=fsdp2", "algorithm.advantage=gae"], "algorithm.critic"),
    (["rollout.prompts_per_step=4", "rollout.strategy=fission"], "rollout.strategy"),
])
def test_unsupported_or_indivisible_is_a_config_error(overrides, key):
    cfg = load_config(None, ["distributed.strategy=ddp", *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        distributed.resolve_strategy(cfg, env={"WORLD_SIZE": "2"})


def test_unknown_strategy_names_the_key():
    with pytest.raises(ConfigError, match="distributed.strategy"):
        load_config(None, ["distributed.strategy=zero3"])


def test_shares_cover_in_order():
    for n in range(7):
        parts = [list(range(n))[slice(*share_bounds(n, r, 3))] for r in range(3)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _rank_sync_without_gradients() -> None:
    """Both ranks: a model none of whose parameters got a gradient (every advantage 0) syncs to no gradients,
    and one where only rank 1 has a gradient gets rank 1's on both."""
    import torch.distributed as dist

    from tirl.trainer.distributed import World, sync_gradients

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    world = World("ddp", rank, 2)
    model = torch.nn.Linear(3, 2)
    sync_gradients([model], world)
    assert all(p.grad is None for p in model.parameters())
    if rank == 1:
        model(torch.ones(1, 3)).sum().backward()
    sync_gradients([model], world)
    assert torch.equal(model.weight.grad, torch.ones(2, 3)) and torch.equal(model.bias.grad, torch.ones(2))
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "update":
        _rank_update(*sys.argv[2:7])
    elif sys.argv[1] == "nograd":
        _rank_sync_without_gradients()
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
