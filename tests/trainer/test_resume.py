"""Killing `tirl train` mid-run and re-running the same command resumes from the last checkpoint and
retraces the uninterrupted run step for step (DESIGN.md invariant 6).

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


def test_kill_and_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    env = _env(tmp_path)
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    straight.mkdir()
    interrupted.mkdir()
    subprocess.run(_command(tiny_model_dir), cwd=straight, env=env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_command(tiny_model_dir), cwd=interrupted, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = interrupted / "runs" / "default"
    deadline = time.monotonic() + 600
    while _rl_steps_logged(run_dir) < 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "models" / "final").exists()

    resumed = subprocess.run(_command(tiny_model_dir), cwd=interrupted, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    # it really continued: SFT was not redone, and RL restarted after its last checkpoint, not at step 1
    assert "sft step" not in resumed.stdout and "rl step    1/6" not in resumed.stdout
    assert "rl step    6/6" in resumed.stdout
    a, b = _metrics(straight / "runs" / "default"), _metrics(run_dir)
    assert [(r["stage"], r["step"]) for r in b] == [(r["stage"], r["step"]) for r in a]
    assert len([r for r in a if r["stage"] == "rl"]) == 6
    assert a == b
    assert any(r["train/grad_norm"] > 0 for r in a if r["stage"] == "rl")


def test_rerunning_a_finished_run_is_an_error(tmp_path, tiny_model_dir):
    env = _env(tmp_path)
    cmd = _command(tiny_model_dir)[:-1] + ["run.seed=4", "rl.steps=1", "pipeline.sft=false"]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "is complete" in again.stdout and "zero steps" in again.stdout


@pytest.fixture(autouse=True)
def _no_cache_pollution(tmp_path, monkeypatch):
    monkeypatch.setenv("TIRL_CACHE", os.environ.get("TIRL_CACHE", str(Path.home() / ".cache" / "tirl")))
