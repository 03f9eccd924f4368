"""`tirl eval` for real: the default model on the arithmetic task, a process killed mid-run and resumed,
and a served model through the openai backend (`transformers serve`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.eval.helpers import SHORT
from tirl.cli import main
from tirl.rollout.io import read_jsonl


@pytest.mark.slow
def test_default_model_on_arithmetic(tmp_path, capsys):
    """Three held-out problems with the embedded default model: every trajectory in the JSONL, a summary
    whose main metrics carry 95% intervals around their values, and the table on the terminal."""
    out = tmp_path / "ev"
    assert main(["eval", "--model", "embedded:SmolLM2-135M-Instruct", "--task", "arithmetic", "--size", "3",
                 "--out", str(out), "eval.no_tools=false", "rollout.max_new_tokens=64"]) == 0
    trajs = list(read_jsonl(out / "eval" / "eval.jsonl"))
    assert len(trajs) == 3 and len({t.meta.task_id for t in trajs}) == 3
    assert all(t.turns and t.num_sampled_tokens > 0 for t in trajs)
    summary = json.loads((out / "eval" / "eval.summary.json").read_text())
    for key in ("accuracy", "pass@1", "tool_calls/mean", "tool_calls/rate", "turns/mean", "tokens/sampled_mean"):
        lo, hi = summary["ci"][key]
        assert lo <= summary[key] <= hi, key
    assert summary["bootstrap"]["resamples"] == 1000 and summary["problems"] == 3
    shown = capsys.readouterr().out
    assert "95% CI" in shown and f"output directory: {out}" in shown
    assert (out / "results.md").read_text().startswith("## eval")


@pytest.mark.slow
def test_killed_process_resumes(tmp_path, tiny_model_dir):
    """SIGKILL while problems are being written (one per chunk); the same command then runs only what is
    missing: the lines written before the kill stay byte for byte, and every problem appears once."""
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_model_dir), "--size", "60", "--concurrency", "1", "--out", str(out), *SHORT]
    path = out / "eval" / "eval.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "tirl.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the evaluation ended before it could be killed"
    before = path.read_text()
    complete = before[:before.rfind("\n") + 1].splitlines(keepends=True)
    assert 3 <= len(complete) < 60 and not (out / "eval" / "eval.summary.json").exists()
    assert main(args) == 0
    after = path.read_text().splitlines(keepends=True)
    assert after[:len(complete)] == complete
    assert sorted(t.meta.task_id for t in read_jsonl(path)) == sorted({t.meta.task_id for t in read_jsonl(path)})
    assert len(after) == 60


@pytest.mark.slow
def test_served_model_through_the_openai_backend(transformers_server, smol_dir, tmp_path, monkeypatch):
    """--base-url: one problem, two samples, through `transformers serve`; the weights are never
    loaded here (the server holds them), and pass@2 comes with its interval."""
    from tirl.models import loading

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded although the server generates")

    monkeypatch.setattr(loading, "load_causal_lm", no_weights)
    out = tmp_path / "served"
    assert main(["eval", "--model", str(smol_dir), "--base-url", transformers_server.base_url, "--size", "1",
                 "--samples", "2", "--temperature", "1", "--concurrency", "2", "--out", str(out),
                 "eval.no_tools=false", "rollout.max_turns=1", "rollout.max_new_tokens_per_turn=16",
                 "rollout.max_new_tokens=16"]) == 0
    summary = json.loads((out / "eval" / "eval.summary.json").read_text())
    assert (summary["problems"], summary["samples"], summary["samples_per_problem"]) == (1, 2, 2)
    assert "pass@2" in summary and summary["ci"]["pass@2"] is not None
    trajs = list(read_jsonl(out / "eval" / "eval.jsonl"))
    assert all(t.meta.error is None and t.num_sampled_tokens > 0 for t in trajs)
    assert json.loads((out / "run.json").read_text())["backend"] == "openai"
