"""Killing `tirl train` mid-run and re-running the same command resumes from the last checkpoint and
retraces the uninterrupted run step for step (DESIGN.md invariant 6), also with a critic, a replay
buffer and in-reward KL.

Uses a tiny random model and a reward that varies on its random outputs, so every step really
changes the weights and every later step depends on the restored state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REWARD = '''
def token_parity(trajectory, problem, group):
    """Fraction of sampled tokens with an even id: varies on random outputs."""
    ids = [t for t, m in zip(trajectory.response_ids, trajectory.loss_mask) if m]
    return {"even": sum(1 for t in ids if t % 2 == 0) / max(1, len(ids))}
'''

VOLATILE = ("time/", "speed/", "gen/batches", "gen/decode_steps", "gen/prefill_tokens")
"""Clock readings, and how the asynchronous batcher happened to group turns into decode batches (timing)."""


def _command(model_dir: Path) -> list[str]:
    return [sys.executable, "-m", "tirl.cli", "train", f"model.name={model_dir}", "task.reward=resume_reward:token_parity",
            "pipeline.eval_before=false", "pipeline.eval_after_sft=false", "pipeline.eval_after=false",
            "sft.examples=12", "sft.batch_size=4", "sft.save_every=1", "rl.steps=6", "rl.save_every=1",
            "rollout.group_size=3", "rollout.prompts_per_step=2", "rollout.max_new_tokens_per_turn=12",
            "rollout.max_new_tokens=24", "rollout.max_turns=2", "rl.optim.lr=1e-3", "run.tensorboard=false",
            "run.seed=3"]


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "resume_reward.py").write_text(REWARD)
    return {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _metrics(run_dir: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in recs]


def _rl_steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"stage": "rl"' in line)


def _kill_and_resume(tmp_path: Path, cmd: list[str], kill_after: int) -> tuple[Path, Path, str]:
    """Run `cmd` straight through in `a/`; in `b/`, kill it (SIGKILL) once `kill_after` RL steps are logged
    and run it again. Returns both run directories and the resumed run's output."""
    env = _env(tmp_path)
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    straight.mkdir()
    interrupted.mkdir()
    subprocess.run(cmd, cwd=straight, env=env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(cmd, cwd=interrupted, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = interrupted / "runs" / "default"
    deadline = time.monotonic() + 600
    while _rl_steps_logged(run_dir) < kill_after:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "models" / "final").exists()

    resumed = subprocess.run(cmd, cwd=interrupted, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    return straight / "runs" / "default", run_dir, resumed.stdout


def test_kill_and_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    straight, run_dir, out = _kill_and_resume(tmp_path, _command(tiny_model_dir), kill_after=3)
    # it really continued: SFT was not redone, and RL restarted after its last checkpoint, not at step 1
    assert "sft step" not in out and "rl step    1/6" not in out
    assert "rl step    6/6" in out
    a, b = _metrics(straight), _metrics(run_dir)
    assert [(r["stage"], r["step"]) for r in b] == [(r["stage"], r["step"]) for r in a]
    assert len([r for r in a if r["stage"] == "rl"]) == 6
    assert a == b
    assert any(r["train/grad_norm"] > 0 for r in a if r["stage"] == "rl")


def test_resume_with_critic_replay_and_kl_in_reward(tmp_path, tiny_model_dir):
    """PPO (gae, with a critic warm-up step), SPEAR replay and in-reward KL: the value head, its optimizer
    state and the replay buffer come back from the checkpoint, so the resumed run retraces the straight one,
    and both leave the same value head next to the final model."""
    from safetensors.torch import load_file

    cmd = _command(tiny_model_dir)[:-1] + [
        "run.seed=5", "pipeline.sft=false", "rl.steps=5", "algorithm.advantage=gae", "algorithm.critic.warmup_steps=1",
        "algorithm.replay.enabled=true", "algorithm.replay.threshold=0.0", "algorithm.replay.warmup_steps=2",
        "algorithm.kl_coef=0.05", "algorithm.kl_placement=reward", "algorithm.kl_estimator=k1"]
    straight, run_dir, out = _kill_and_resume(tmp_path, cmd, kill_after=2)
    assert "rl step    1/5" not in out and "rl step    5/5" in out
    a, b = _metrics(straight), _metrics(run_dir)
    assert len(a) == 5 and a == b
    assert all(r["critic/vf_loss"] is not None for r in a) and a[-1]["replay/size"] > 0
    assert any(r["replay/rows"] > 0 for r in a[2:]) and a[-1]["train/kl"] > 0
    heads = [load_file(str(d / "models" / "final.value_head.safetensors")) for d in (straight, run_dir)]
    assert heads[0].keys() == heads[1].keys() and all((heads[0][k] == heads[1][k]).all() for k in heads[0])


@pytest.mark.parametrize("k", [1, 2])
def test_asynchronous_run_resumes_exactly(tmp_path, tiny_model_dir, k):
    """rl.max_staleness=k: the rollout of step s runs on a thread with the weights after update s-k. The
    checkpoint after each step holds the k batches sampled ahead, so a run killed mid-way and resumed
    retraces the uninterrupted one, although thread timing differs between the runs; the logged
    staleness is min(s, k) and the behaviour weights are real (the sampling policy lags the trainer)."""
    cmd = _command(tiny_model_dir)[:-1] + ["run.seed=6", "pipeline.sft=false", "rl.steps=5",
                                           f"rl.max_staleness={k}"]
    straight, run_dir, out = _kill_and_resume(tmp_path, cmd, kill_after=2)
    assert "rl step    1/5" not in out and "rl step    5/5" in out
    a, b = _metrics(straight), _metrics(run_dir)
    assert len(a) == 5 and a == b
    assert [r["async/staleness"] for r in a] == [min(s, k) for s in range(5)]
    assert [r["async/version"] for r in a] == [max(0, s - k) for s in range(5)]
    assert all(r["async/is_weight_mean"] == pytest.approx(1.0, abs=1e-4) for r in a[:1])
    assert any(abs(r["async/kl_sample_old"]) > 1e-6 for r in a[k:])


def test_sampled_token_budget_stops_after_the_step_that_reaches_it_also_after_a_resume(tmp_path, tiny_model_dir):
    """rl.max_sampled_tokens: a run stops after the step at which the generated tokens (gen/tokens summed,
    logged as gen/tokens_total) reach the budget; the count is in the checkpoint, so a resumed run stops at
    the same step; up to there it is the unbudgeted run."""
    base = _command(tiny_model_dir)[:-1] + ["run.seed=7", "pipeline.sft=false"]
    probe = tmp_path / "probe"
    probe.mkdir()
    subprocess.run(base, cwd=probe, env=_env(tmp_path), check=True, capture_output=True, timeout=600)
    unbudgeted = _metrics(probe / "runs" / "default")
    totals = [r["gen/tokens_total"] for r in unbudgeted]
    assert totals == pytest.approx([sum(r["gen/tokens"] for r in unbudgeted[:i + 1]) for i in range(6)])
    budget = int(totals[3]) - 1  # reached by the 4th step, not by the 3rd
    straight, run_dir, out = _kill_and_resume(tmp_path, base + [f"rl.max_sampled_tokens={budget}"], kill_after=2)
    a, b = _metrics(straight), _metrics(run_dir)
    assert len(a) == 4 and a == b and a == unbudgeted[:4]
    assert (run_dir / "models" / "final" / "config.json").exists()


def test_rerunning_a_finished_run_is_an_error(tmp_path, tiny_model_dir):
    env = _env(tmp_path)
    cmd = _command(tiny_model_dir)[:-1] + ["run.seed=4", "rl.steps=1", "pipeline.sft=false"]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "is complete" in again.stdout and "zero steps" in again.stdout


@pytest.fixture(autouse=True)
def _no_cache_pollution(tmp_path, monkeypatch):
    monkeypatch.setenv("TIRL_CACHE", os.environ.get("TIRL_CACHE", str(Path.home() / ".cache" / "tirl")))
