"""Reading run directories: finished, in progress (half-written lines), without RL, without eval."""

from __future__ import annotations

import json

import pytest

from tests.report.runs import HOSTILE_TASK, write_run
from tirl.errors import DataError
from tirl.report.build import build_report
from tirl.report.data import pick_spread, read_run


def test_a_finished_run_is_read_whole(run_dir):
    run = read_run(run_dir)
    assert run.complete and run.notes == ()
    assert [r["step"] for r in run.stage_metrics("rl")] == [1, 2, 3]
    assert [r["step"] for r in run.stage_metrics("sft")] == [1, 2]
    assert [s.step for s in run.steps] == [1, 2, 3] and all(len(s.trained) == 6 for s in run.steps)
    assert HOSTILE_TASK in {t.meta.task_id for t in run.steps[1].trained}
    assert [e.name for e in run.evals] == ["base", "base_no_tools", "final"]  # pipeline order, not alphabetical
    assert all(e.complete and e.summary["accuracy"] == 0.5 for e in run.evals)
    assert run.config["run"]["name"] == "report-test" and run.info["device"] == "cpu"


def test_a_half_written_last_line_is_skipped_with_a_note(run_dir):
    """What a run being written (or killed mid-write) leaves: the complete lines are all kept."""
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"stage": "rl", "step": 4, "reward/me')
    step = run_dir / "trajectories" / "rl" / "step_000003.jsonl"
    lines = step.read_text().splitlines(keepends=True)
    step.write_text("".join(lines[:4]) + lines[4][:200])
    run = read_run(run_dir)
    assert [r["step"] for r in run.stage_metrics("rl")] == [1, 2, 3]
    assert len(run.steps[2].trained) == 4
    assert len(run.notes) == 2 and all("unfinished last line" in n for n in run.notes)
    assert "metrics.jsonl" in run.notes[0] and "step_000003.jsonl" in run.notes[1]
    assert "unfinished last line" in (build_report(run_dir).path.read_text())  # said in the page too


def test_a_malformed_line_before_the_end_is_an_error_naming_file_and_line(run_dir):
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0] + "not json\n" + "".join(lines[1:]))
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: malformed line"):
        read_run(run_dir)
    metrics.write_text("".join(lines))
    step = run_dir / "trajectories" / "rl" / "step_000001.jsonl"
    step.write_text('{"prompt_ids": []}\n' + step.read_text())
    with pytest.raises(DataError, match=r"step_000001\.jsonl:1: malformed line \(KeyError"):
        read_run(run_dir)


def test_a_run_without_rl(tmp_path, smol_dir):
    run_dir = write_run(tmp_path / "sft-only", smol_dir, rl_steps=0, evals=("base", "sft"))
    run = read_run(run_dir)
    assert run.steps == () and run.stage_metrics("rl") == [] and len(run.stage_metrics("sft")) == 2
    report = build_report(run_dir)
    assert {p.stem for p in report.plots} == {"sft_loss", "eval"}  # no RL curve drawn from nothing
    page = report.path.read_text()
    assert 'data-plot="reward"' not in page and 'data-stage="sft"' in page


def test_a_run_without_eval_and_one_with_an_eval_in_progress(tmp_path, smol_dir):
    run_dir = write_run(tmp_path / "no-eval", smol_dir, evals=(), complete=False)
    run = read_run(run_dir)
    assert run.evals == () and not run.complete
    page = build_report(run_dir).path.read_text()
    assert "This run has no evaluation." in page and "incomplete" in page
    assert 'data-plot="eval"' not in page and 'data-plot="reward"' in page
    # an eval that was interrupted: trajectories, no summary yet
    write_run(tmp_path / "other", smol_dir, rl_steps=0, evals=("base",))
    (run_dir / "eval").mkdir()
    (tmp_path / "other" / "eval" / "base.jsonl").rename(run_dir / "eval" / "base.jsonl")
    [stage] = read_run(run_dir).evals
    assert not stage.complete and stage.summary["samples"] == 4 and stage.summary["accuracy"] == 0.5
    assert "<td>partial</td>" in build_report(run_dir).path.read_text()


def test_what_is_not_a_run_directory(tmp_path):
    with pytest.raises(DataError, match="no such run directory"):
        read_run(tmp_path / "missing")
    with pytest.raises(DataError, match="not a tirl run directory"):
        read_run(tmp_path)
    (tmp_path / "config.yaml").write_text("- a\n- list\n")
    with pytest.raises(DataError, match="expected a mapping"):
        read_run(tmp_path)


def test_non_finite_metrics_read_as_none(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"stage": "rl", "step": 1, "train/kl": float("nan")}) + "\n")
    assert read_run(tmp_path).metrics[0]["train/kl"] is None


def test_pick_spread_takes_every_bucket_before_any_second_item():
    items = [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("c", 2)]
    assert pick_spread(items, 4, key=lambda x: x[0]) == [("a", 1), ("b", 1), ("c", 1), ("a", 2)]
    assert pick_spread(items, 100, key=lambda x: x[0]) == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("c", 2),
                                                           ("a", 3)]
    assert pick_spread(items, 0, key=lambda x: x[0]) == []
