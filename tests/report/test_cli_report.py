"""`tirl report`, and the report every run writes at its end (a report failure keeps the run)."""

from __future__ import annotations

import json

import pytest

from tirl.cli import main

FAST = ["sft.examples=8", "sft.batch_size=4", "rl.steps=2", "rollout.group_size=2", "rollout.prompts_per_step=2",
        "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16", "rollout.max_turns=2", "eval.size=4"]


def test_tirl_report_writes_the_page_and_the_plots(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert str(run_dir / "report.html") in out and "30 trajectories" in out
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert {p.stem for p in (run_dir / "plots").glob("*.png")} >= {"reward", "accuracy", "entropy", "kl", "eval"}
    other = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run_dir), "--out", str(other), "--per-step", "2", "--no-tokens"]) == 0
    assert other.is_file() and (other.parent / "plots" / "reward.png").is_file()
    assert "18 trajectories" in capsys.readouterr().out  # 3 steps x 2 + 3 evals x 4
    assert '"ids"' not in other.read_text()


def test_tirl_report_on_what_is_not_a_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a tirl run directory" in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--per-step", "-1"]) == 2


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_training_run_ends_with_its_report(in_tmp, tiny_model_dir):
    assert main(["train", f"model.name={tiny_model_dir}", *FAST]) == 0
    run = in_tmp / "runs" / "default"
    page = (run / "report.html").read_text()
    for stage in ("base", "base_no_tools", "sft", "final", "final_no_tools"):
        assert f'data-stage="{stage}"' in page
    assert 'data-plot="reward"' in page and 'data-plot="sft_loss"' in page and 'data-plot="eval"' in page
    assert '"label":"RL step 2"' in page


def test_a_report_failure_keeps_the_run_and_exits_3(in_tmp, tiny_model_dir, capsys):
    run = in_tmp / "evalrun"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "stray.jsonl").write_text("not a trajectory\n{}\n")  # the report reads every eval file
    args = ["train", f"model.name={tiny_model_dir}", "pipeline.sft=false", "pipeline.rl=false", "eval.size=2",
            "eval.no_tools=false", "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16", f"run.dir={run}"]
    assert main(args) == 3
    captured = capsys.readouterr()
    assert "stray.jsonl:1: malformed line" in captured.out and f"tirl report {run}" in captured.out
    assert "Traceback" in captured.err  # loud: the whole story, not just one line
    assert json.loads((run / "results.json").read_text())["results"]["eval"]["problems"] == 2  # the run is kept
    (run / "eval" / "stray.jsonl").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report.html").is_file()
