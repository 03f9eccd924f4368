"""The command line: clear one-line errors before any work starts, and the registry listings."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest


def tirl(*args, cwd=None, timeout=120):
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tirl.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)
    return proc, time.monotonic() - t


@pytest.mark.parametrize("args, message", [
    (["train", "rollout.grup_size=3"], "rollout.grup_size: unknown key"),
    (["train", "rl.optim.lr=-1"], "rl.optim.lr: Input should be greater than 0"),
    (["train", "missing_recipe.yaml"], "recipe 'missing_recipe.yaml' does not exist"),
    (["train", "model.name=./no/such/model"], "model path './no/such/model' does not exist"),
    (["train", "model.name=embedded:Nope"], "unknown embedded model 'embedded:Nope'"),
    (["train", "task.name=nope"], "unknown task 'nope'"),
    (["train", "task.tools=[calculator,nope]"], "unknown tool 'nope'"),
    (["train", "algorithm.advantage=nope"], "unknown advantage estimator 'nope'"),
    (["train", "task.kwargs.levels=[9]"], "task.kwargs for 'arithmetic'"),
    (["eval", "--model", "/no/such/dir", "--task", "arithmetic"], "does not exist"),
    (["serve-tools", "--tools", "calculator", "--port", "0", "--token", "short"], "at least 16 characters"),
    (["serve-tools", "--tools", "nope", "--port", "0"], "unknown tool 'nope'"),
])
def test_errors_are_one_line_and_before_any_work(tmp_path, args, message):
    proc, seconds = tirl(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    out = proc.stdout + proc.stderr
    assert "error:" in out and message in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "runs").exists()  # nothing was started
    assert seconds < 60


def test_existing_run_with_other_config_is_refused(tmp_path):
    from tirl.config import load_config

    off = ["pipeline.eval_before=false", "pipeline.sft=false", "pipeline.rl=false", "pipeline.eval_after_sft=false",
           "pipeline.eval_after=false"]
    (tmp_path / "runs" / "default").mkdir(parents=True)
    (tmp_path / "runs" / "default" / "config.yaml").write_text(load_config(None, ["rl.steps=3", *off]).to_yaml())
    proc, _ = tirl("train", "rl.steps=4", *off, cwd=tmp_path)
    assert proc.returncode == 2 and "different config" in proc.stdout and "rl.steps: 3 -> 4" in proc.stdout


@pytest.mark.parametrize("command, expected", [("algos", "grpo"), ("tools", "calculator"), ("envs", "arithmetic")])
def test_listings(command, expected):
    proc, _ = tirl(command)
    assert proc.returncode == 0 and expected in proc.stdout


def test_algos_lists_every_estimator_loss_and_reward_with_a_description():
    """`tirl algos` shows each registered name with the first line of its docstring."""
    from tirl.algorithms import ADVANTAGES, POLICY_LOSSES
    from tirl.rewards import REWARDS

    proc, _ = tirl("algos")
    assert proc.returncode == 0
    out = " ".join(proc.stdout.split())
    for registry in (ADVANTAGES, POLICY_LOSSES, REWARDS):
        for name, doc in registry.describe().items():
            assert doc, f"{registry.what} {name!r} has no description"
            assert name in out, f"tirl algos does not list {registry.what} {name!r}"
    names = set(ADVANTAGES) | set(POLICY_LOSSES) | set(REWARDS)
    assert {"grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae", "mt_grpo", "portool", "igpo",
            "matchtir", "hdpo", "ppo_clip", "gspo", "cispo", "aepo", "toolrl", "otc_ppo", "otc_grpo", "toolstar",
            "etagent", "irm", "rlcr_brier", "mscr", "deepeyes", "dapo_overlong", "cm2_checklist", "judge_rubric",
            "math_verify", "qa_em", "qa_f1", "weighted_sum", "product", "gate"} <= names


def test_recipe_and_overrides_may_sit_between_and_after_flags():
    """`tirl eval --model M recipe.yaml --size 20 k=v`: every positional is kept, in order;
    an unknown flag is still refused by name."""
    from tirl.cli import _parse, _parser

    args = _parse(_parser(), ["eval", "--model", "m", "r.yaml", "--size", "20", "a=1", "--no-tools", "b=2"])
    assert args.items == ["r.yaml", "a=1", "b=2"] and args.size == 20 and args.no_tools
    assert _parse(_parser(), ["train", "r.yaml", "x=1"]).items == ["r.yaml", "x=1"]
    with pytest.raises(SystemExit):
        _parse(_parser(), ["eval", "--model", "m", "--bogus", "a=1"])
    with pytest.raises(SystemExit):
        _parse(_parser(), ["tools", "stray"])
