"""The whole pipeline on a tiny random model: what a run directory holds, LoRA, `tirl sft` and `tirl eval`."""

from __future__ import annotations

import json

import pytest

from tirl.cli import main
from tirl.rollout.io import read_jsonl

FAST = ["sft.examples=8", "sft.batch_size=4", "rl.steps=2", "rollout.group_size=2", "rollout.prompts_per_step=2",
        "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16", "rollout.max_turns=2", "eval.size=4"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_writes_a_complete_run_directory(in_tmp, tiny_model_dir):
    assert main(["train", f"model.name={tiny_model_dir}", *FAST]) == 0
    run = in_tmp / "runs" / "default"
    for name in ("config.yaml", "run.json", "metrics.jsonl", "results.md", "results.json"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    stages = [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["sft", "sft", "rl", "rl"]
    trajs = list(read_jsonl(run / "trajectories" / "rl" / "step_000002.jsonl"))
    assert len(trajs) == 4 and all(t.meta.step == 1 for t in trajs)
    results = json.loads((run / "results.json").read_text())["results"]
    assert set(results) == {"base", "base_no_tools", "sft", "final", "final_no_tools"}
    assert all(r["problems"] == 4 for r in results.values())
    levels = {k for k in results["final"] if k.startswith("accuracy/level_")}
    assert levels == {f"accuracy/level_{k}" for k in (1, 2, 3, 4)}  # held-out is stratified over levels
    for model in ("sft", "final"):
        assert (run / "models" / model / "config.json").is_file()
        assert "chat_template" in (run / "models" / model / "tokenizer_config.json").read_text() or \
            (run / "models" / model / "chat_template.jinja").is_file()
    assert not list((run / "checkpoints").rglob("step_*"))  # dropped once the stage finished


def test_lora_run_and_eval_of_its_output(in_tmp, tiny_model_dir):
    assert main(["train", f"model.name={tiny_model_dir}", "model.lora.enabled=true", "model.lora.r=2",
                 "pipeline.eval_before=false", "pipeline.eval_after_sft=false", *FAST]) == 0
    final = in_tmp / "runs" / "default" / "models" / "final"
    assert main(["eval", "--model", str(final), "--task", "arithmetic", "eval.size=3", "eval.no_tools=false",
                 "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16"]) == 0
    [summary] = (in_tmp / "runs").glob("eval-*/eval/eval.summary.json")
    assert json.loads(summary.read_text())["problems"] == 3


def test_sft_only(in_tmp, tiny_model_dir):
    assert main(["sft", f"model.name={tiny_model_dir}", *FAST]) == 0
    run = in_tmp / "runs" / "default"
    assert (run / "models" / "sft" / "config.json").is_file() and not (run / "models" / "final").exists()
    assert not (run / "eval").exists()


def test_eval_interrupted_mid_write_resumes_without_redoing_finished_problems(in_tmp, tiny_model_dir):
    args = ["eval", "--model", str(tiny_model_dir), "--task", "arithmetic", "eval.size=6", "eval.no_tools=false",
            "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16"]
    assert main(args) == 0
    [out] = (in_tmp / "runs").glob("eval-*/eval")
    path = out / "eval.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    summary = json.loads((out / "eval.summary.json").read_text())
    # a kill after four problems, in the middle of writing the fifth
    path.write_text("".join(lines[:4]) + lines[4][:50])
    (out / "eval.summary.json").unlink()
    (out.parent / "results.json").unlink()
    assert main(args) == 0
    again = path.read_text().splitlines(keepends=True)
    assert again[:4] == lines[:4] and len(again) == 6
    assert json.loads((out / "eval.summary.json").read_text()) == summary


def test_train_with_the_python_tool_records_its_sandbox(in_tmp, tiny_model_dir):
    """The arithmetic recipe with the sandboxed interpreter instead of the calculator: SFT traces run their
    calls through the sandbox, and run.json records the isolation and the interpreter mode."""
    args = ["train", f"model.name={tiny_model_dir}", *FAST, "task.kwargs.tool=python",
            "tools.python.preload=[math]", "pipeline.eval_before=false"]
    assert main(args) == 0
    info = json.loads((in_tmp / "runs" / "default" / "run.json").read_text())
    python = info["tools"]["python"]
    assert (python["isolation"], python["mode"]) == ("bwrap", "persistent")
    assert list(info["tools"]) == ["python"]
