"""`tirl eval` end to end on the tiny random model: pass@k with k samples, resuming after an interruption,
re-running a finished evaluation, and the errors for settings that do not go together."""

from __future__ import annotations

import json
import math

import pytest

from tests.eval.helpers import PARITY, SHORT
from tirl.cli import main
from tirl.eval import runner
from tirl.rollout.io import read_jsonl


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _pass_at_k_by_definition(n: int, c: int, k: int) -> float:
    return 1 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_with_samples(in_tmp, tiny_model_dir, capsys):
    """4 samples at temperature 1 for each of 4 problems, judged by a reward whose verdict varies per
    sample: pass@k for k = 1..4 is the mean over problems of 1 - C(n-c,k)/C(n,k), recomputed here from the
    JSONL's verdicts; each value lies in its interval; the table shows pass@1, @2, @4 and mean@4."""
    rc = main(["eval", "--model", str(tiny_model_dir), "--size", "4", "--samples", "4", "--temperature", "1",
               f"task.reward={PARITY}", *SHORT])
    assert rc == 0
    [out] = (in_tmp / "runs").glob("eval-*-arithmetic-k4-t1")
    trajs = list(read_jsonl(out / "eval" / "eval.jsonl"))
    assert len(trajs) == 16
    correct: dict[str, list[bool]] = {}
    for t in trajs:
        correct.setdefault(t.meta.task_id, []).append(bool(t.correct))
    assert 0 < sum(map(sum, correct.values())) < 16, "the verdicts should vary for this test to mean anything"
    summary = json.loads((out / "eval" / "eval.summary.json").read_text())
    for k in (1, 2, 3, 4):
        expected = sum(_pass_at_k_by_definition(4, sum(v), k) for v in correct.values()) / 4
        assert summary[f"pass@{k}"] == pytest.approx(expected)
        lo, hi = summary["ci"][f"pass@{k}"]
        assert lo <= summary[f"pass@{k}"] <= hi
    assert summary["mean@4"] == pytest.approx(summary["accuracy"]) == pytest.approx(summary["pass@1"])
    shown = capsys.readouterr().out
    for label in ("pass@1", "pass@2", "pass@4", "mean@4", "95% CI", f"output directory: {out.relative_to(in_tmp)}"):
        assert label in shown, label
    assert "pass@3" not in shown  # in the summary, not in the table


def test_interrupted_eval_resumes_without_rerunning_finished_problems(in_tmp, tiny_model_dir, monkeypatch):
    """A Ctrl-C after two problems, then a kill that leaves the second problem with one of its two samples
    and a half-written line: the re-run keeps the first problem's lines byte for byte, runs the other
    four problems whole, and samples exactly what an uninterrupted evaluation does."""
    args = ["eval", "--model", str(tiny_model_dir), "--size", "5", "--samples", "2", "--temperature", "1",
            "--concurrency", "2", *SHORT]
    assert main([*args, "--out", "straight"]) == 0
    written: list[int] = []
    real_append = runner.append_jsonl

    def interrupted_after_two(path, trajs):
        if len(written) == 2:
            raise KeyboardInterrupt
        trajs = list(trajs)
        written.append(len(trajs))
        real_append(path, trajs)

    monkeypatch.setattr(runner, "append_jsonl", interrupted_after_two)
    assert main([*args, "--out", "resumed"]) == 130
    path = in_tmp / "resumed" / "eval" / "eval.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 4 and not (path.parent / "eval.summary.json").exists()
    path.write_text("".join(lines[:3]) + lines[3][:40])  # problem 2: one sample and a cut line

    appended: list[int] = []

    def counting(path, trajs):
        trajs = list(trajs)
        appended.append(len(trajs))
        real_append(path, trajs)

    monkeypatch.setattr(runner, "append_jsonl", counting)
    assert main([*args, "--out", "resumed"]) == 0
    again = path.read_text().splitlines(keepends=True)
    assert again[:2] == lines[:2] and len(again) == 10
    assert sum(appended) == 8  # problems 2-5, two samples each; problem 1 was not run again

    def by_key(p):
        return {(t.meta.task_id, t.meta.sample_index): t.response_ids for t in read_jsonl(p)}

    assert by_key(path) == by_key(in_tmp / "straight" / "eval" / "eval.jsonl")
    summary = json.loads((path.parent / "eval.summary.json").read_text())
    assert summary["problems"] == 5 and summary["samples"] == 10


def test_finished_eval_shows_its_results_without_loading_the_model(in_tmp, tiny_model_dir, monkeypatch, capsys):
    """Re-running a complete evaluation loads nothing and prints the same table; a larger eval.size runs
    only the new problems."""
    from tirl.models import loading

    args = ["eval", "--model", str(tiny_model_dir), "--out", "ev", *SHORT]
    assert main([*args, "--size", "2"]) == 0
    first = json.loads((in_tmp / "ev" / "eval" / "eval.summary.json").read_text())

    def no_model(*a, **k):
        raise AssertionError("the model was loaded for a finished evaluation")

    load_causal_lm = loading.load_causal_lm
    monkeypatch.setattr(loading, "load_causal_lm", no_model)
    capsys.readouterr()
    assert main([*args, "--size", "2"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert json.loads((in_tmp / "ev" / "eval" / "eval.summary.json").read_text()) == first
    monkeypatch.setattr(loading, "load_causal_lm", load_causal_lm)
    assert main([*args, "--size", "3"]) == 0
    assert json.loads((in_tmp / "ev" / "eval" / "eval.summary.json").read_text())["problems"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--samples", "4"], "identical greedy samples"),
    (["--samples", "4", "eval.samples=2"], "eval.samples is set twice"),
    (["--base-url", "http://127.0.0.1:9/v1", "backend.name=hf"], "backend.name is set twice"),
    (["--base-url", "http://127.0.0.1:9/v1", "--backend", "hf"], "backend.openai.* has no effect"),
    (["--concurrency", "0"], "eval.concurrency"),
    (["--task", "no_such_task"], "no_such_task"),
])
def test_bad_combinations_are_one_line_errors(in_tmp, tiny_model_dir, capsys, extra, message):
    assert main(["eval", "--model", str(tiny_model_dir), *extra]) == 2
    assert message in " ".join(capsys.readouterr().out.split())
    assert not (in_tmp / "runs").exists()  # refused before any work


def test_other_settings_into_the_same_directory_are_refused(in_tmp, tiny_model_dir, capsys):
    args = ["eval", "--model", str(tiny_model_dir), "--size", "1", "--out", "ev", *SHORT]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "rollout.max_turns=3"]) == 2
    assert "rollout.max_turns: 2 -> 3" in " ".join(capsys.readouterr().out.split())


def test_no_tools_runs_only_the_baseline(in_tmp, tiny_model_dir):
    """--no-tools: only the baseline variant, whose prompt offers no tool."""
    assert main(["eval", "--model", str(tiny_model_dir), "--size", "2", "--no-tools", "--out", "ev", *SHORT]) == 0
    names = sorted(p.name for p in (in_tmp / "ev" / "eval").iterdir())
    assert names == ["eval_no_tools.jsonl", "eval_no_tools.summary.json"]
    system = next(read_jsonl(in_tmp / "ev" / "eval" / "eval_no_tools.jsonl")).messages[0].content
    assert "calculator" not in system and "tool_call" not in system
    results = json.loads((in_tmp / "ev" / "results.json").read_text())["results"]
    assert list(results) == ["eval_no_tools"]


def test_default_run_names_tell_evaluations_apart():
    from types import SimpleNamespace

    from tirl.config import load_config
    from tirl.eval.command import default_run_name

    model = SimpleNamespace(name="embedded:SmolLM2-135M-Instruct", path="embedded:SmolLM2-135M-Instruct", run_dir=None)
    assert default_run_name(load_config(), model) == "eval-embedded_SmolLM2-135M-Instruct-arithmetic"
    sampled = load_config(None, ["eval.samples=8", "eval.temperature=0.7", "backend.name=openai"])
    assert default_run_name(sampled, model) == "eval-embedded_SmolLM2-135M-Instruct-arithmetic-openai-k8-t0.7"


def test_concurrency_sets_what_the_backend_keeps_in_flight():
    """eval.concurrency: requests in flight for openai, the generation batch for hf, and the chunk size."""
    from tirl.config import load_config
    from tirl.eval.runner import chunk_size, with_concurrency

    served = with_concurrency(load_config(None, ["backend.name=openai", "eval.concurrency=5"]))
    assert served.backend.openai.max_concurrency == 5 and chunk_size(served) == 5
    local = with_concurrency(load_config(None, ["eval.concurrency=3"]))
    assert local.rollout.max_batch_size == 3 and chunk_size(local) == 3
    default = load_config()
    assert with_concurrency(default) == default and chunk_size(default) == default.rollout.max_batch_size


def test_eval_keys_that_would_do_nothing_are_refused():
    from tirl.config import load_config
    from tirl.errors import ConfigError

    with pytest.raises(ConfigError, match="ci_level has no effect"):
        load_config(None, ["eval.bootstrap_resamples=0", "eval.ci_level=0.9"])
    with pytest.raises(ConfigError, match="identical greedy samples"):
        load_config(None, ["eval.samples=2"])
