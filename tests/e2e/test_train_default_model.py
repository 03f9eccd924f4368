"""A short real training run of the default model (SmolLM2-135M-Instruct) through `tirl train`.

Marked slow; CI runs it. A tiny configuration where RL has a reliable signal: one operation written
in words (level 3: "Multiply 2345 by 67.", "What do you get when you add 4479 to 2033?"), which the
model cold-started on "What is a op b?" solves about half of the time, often mapping the word to the
wrong operator; GRPO groups are mixed, and a few steps move the reward and held-out greedy accuracy. The run goes through the same code as the
default job: cold start, evals, GRPO, results table.
"""

from __future__ import annotations

import json

import pytest

from tirl.cli import main

pytestmark = pytest.mark.slow

TINY = ["run.name=e2e", "task.kwargs.levels=[3]", "task.kwargs.heldout_size=40", "eval.no_tools=false",
        "pipeline.eval_before=false", "rl.steps=10", "rollout.prompts_per_step=4", "rollout.group_size=8"]


def test_rl_raises_reward_and_heldout_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY]) == 0
    run = tmp_path / "runs" / "e2e"
    results = json.loads((run / "results.json").read_text())["results"]
    sft, final = results["sft"], results["final"]
    rl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in rl if m["stage"] == "rl"]
    early = sum(m["reward/mean"] for m in rl[:3]) / 3
    late = sum(m["reward/mean"] for m in rl[-3:]) / 3
    assert late > early + 0.05, (early, late)
    assert final["accuracy"] >= sft["accuracy"] + 0.1, (sft["accuracy"], final["accuracy"])
    assert final["tool_calls/invalid_rate"] <= sft["tool_calls/invalid_rate"]
