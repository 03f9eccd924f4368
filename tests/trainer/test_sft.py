"""The SFT loss on the tiny random model (against an independent cross-entropy, ToRA's tool-output masking)
and `tirl sft` end to end: task traces (the default) and rejection sampling from real rollouts."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from tirl.backends.base import SamplingParams
from tirl.backends.scripted import ScriptedBackend
from tirl.cli import main
from tirl.config import ModelConfig, SFTConfig
from tirl.envs.tool_env import ToolEnv
from tirl.errors import ConfigError, ResumeError
from tirl.rollout.agent import TurnLimits, run_trajectory
from tirl.rollout.io import append_jsonl
from tirl.tasks import TASKS
from tirl.tasks.base import Problem
from tirl.tools import ToolSet, build_toolset, calculator, tool
from tirl.trainer.build import load_policy
from tirl.trainer.sft import _record_data, build_examples, build_sft_data, chunk_loss, sft_loss_step
from tirl.trainer.sft_data import SFTExample, example_of, with_key_weights
from tirl.types import TrajectoryMeta

CALC = '<tool_call>{"name": "calculator", "arguments": {"expression": "4821 * 37"}}</tool_call>'
BOOM = '<tool_call>{"name": "explode", "arguments": {"x": 1}}</tool_call>'
RIGHT = "<answer>178377</answer><|im_end|>"


@tool
def explode(x: int) -> str:
    """Always raises.

    Args:
        x: Anything.
    """
    raise RuntimeError("kaboom")


TOOLS = ToolSet([calculator, explode])


def episode(fmt, script, task_id="p0", correct=True):
    env = ToolEnv(Problem(task_id, f"What is 4821 * 37? ({task_id})", "178377"), "Solve it.", TOOLS)
    traj = asyncio.run(run_trajectory(env, ScriptedBackend(fmt.tokenizer, script), fmt, SamplingParams(),
                                      TurnLimits(), TrajectoryMeta(task_id, "g0"), seed=0))
    return traj.with_reward(float(correct), {}, correct)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(ModelConfig(name=str(tiny_model_dir), dtype="float32", attn_implementation="eager"), "cpu")


@pytest.fixture(scope="module")
def traces(policy):
    """A task trace (reference call run by the real calculator) and a rollout trace (failed call, call, answer)."""
    task = TASKS.get("arithmetic")()
    tools = build_toolset(["calculator"], {})
    [seq] = build_sft_data(task, tools, policy, 1)
    traj = episode(policy.fmt, [BOOM, CALC, RIGHT])
    return {"task": example_of(seq, "task:0"),
            "rollout": SFTExample(traj.prompt_ids, traj.response_ids, traj.loss_mask,
                                  tuple(float(m) for m in traj.loss_mask), "rollout")}


def _loss(policy, e: SFTExample) -> float:
    loss, _ = chunk_loss(policy, [e], sum(e.weights))
    return float(loss.detach())


def _reference_loss(model, e: SFTExample) -> float:
    """Independent: HF logits over the whole sequence, cross-entropy with label -100 on the prompt and on
    every mask-0 response token (ToRA's objective), weighted by `e.weights`."""
    ids = torch.tensor([list(e.prompt_ids) + list(e.response_ids)])
    labels = ids.clone()
    labels[0, :len(e.prompt_ids)] = -100
    labels[0, len(e.prompt_ids):][torch.tensor(e.loss_mask) == 0] = -100
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    ce = F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="none")
    w = torch.cat([torch.zeros(len(e.prompt_ids) - 1), torch.tensor(e.weights)])
    return float((ce * w).sum() / w.sum())


@pytest.mark.parametrize("kind", ["task", "rollout"])
def test_loss_is_cross_entropy_with_tool_output_ignored(policy, traces, kind):
    e = traces[kind]
    assert _loss(policy, e) == pytest.approx(_reference_loss(policy.model, e), rel=1e-5)
    [pkt] = with_key_weights([e], policy.fmt, 9.0)
    assert max(pkt.weights) > 1.0
    assert _loss(policy, pkt) == pytest.approx(_reference_loss(policy.model, pkt), rel=1e-5)
    assert _loss(policy, pkt) != pytest.approx(_loss(policy, e), rel=1e-4)


def _through_first_observation(e: SFTExample) -> tuple[SFTExample, int, int]:
    """The example cut right after its first tool output, and that output's [start, end)."""
    m = e.loss_mask
    start = next(i for i in range(1, len(m)) if m[i - 1] and not m[i])
    end = next((i for i in range(start, len(m)) if m[i]), len(m))
    cut = lambda xs: tuple(xs[:end])  # noqa: E731
    return SFTExample(e.prompt_ids, cut(e.response_ids), cut(m), cut(e.weights), e.origin), start, end


@pytest.mark.parametrize("kind", ["task", "rollout"])
def test_loss_unchanged_when_tool_output_tokens_are_perturbed(policy, traces, kind):
    """ToRA (reference 5.3): tool-output tokens (mask 0) are never targets, so perturbing them leaves the loss of
    everything before them unchanged; the control, with those tokens trained on, does change."""
    e, start, end = _through_first_observation(traces[kind])
    assert end > start and sum(e.loss_mask[start:end]) == 0
    ids = list(e.response_ids)
    ids[start:end] = [(t * 7 + 13) % 1000 for t in ids[start:end]]
    perturbed = dataclasses.replace(e, response_ids=tuple(ids))
    assert perturbed.response_ids != e.response_ids
    assert _loss(policy, perturbed) == _loss(policy, e)
    trained = lambda x: dataclasses.replace(x, loss_mask=(1,) * len(x.loss_mask),  # noqa: E731
                                            weights=(1.0,) * len(x.loss_mask))
    assert _loss(policy, trained(perturbed)) != pytest.approx(_loss(policy, trained(e)), rel=1e-4)


def test_task_source_builds_the_task_traces_with_plain_weights(policy):
    task, tools = TASKS.get("arithmetic")(), build_toolset(["calculator"], {})
    examples, summary = build_examples(SFTConfig(examples=3), policy, task, tools)
    seqs = build_sft_data(task, tools, policy, 3)
    assert [(e.prompt_ids, e.response_ids, e.loss_mask) for e in examples] == \
        [(s.prompt_ids, s.response_ids, s.loss_mask) for s in seqs]
    assert all(e.weights == tuple(map(float, e.loss_mask)) for e in examples)
    assert summary == {"source": "task", "kept": 3, "tokens": sum(sum(s.loss_mask) for s in seqs)}


def test_step_reports_weighted_loss_and_plain_nll(tiny_model_dir, traces):
    """Plain weights: loss == token-mean NLL (the pre-PKT objective); PKT: the two differ."""
    fresh = load_policy(ModelConfig(name=str(tiny_model_dir), dtype="float32", attn_implementation="eager"), "cpu")
    opt = torch.optim.SGD(fresh.model.parameters(), lr=0.0)
    batch = [traces["task"], traces["rollout"]]
    m = sft_loss_step(fresh, opt, batch, 1, 1.0)
    assert m["train/loss"] == pytest.approx(m["train/nll"], rel=1e-5)
    assert m["train/tokens"] == sum(sum(e.loss_mask) for e in batch)
    m = sft_loss_step(fresh, opt, with_key_weights(batch, fresh.fmt, 9.0), 2, 1.0)
    assert m["train/loss"] != pytest.approx(m["train/nll"], rel=1e-4)


def test_resumed_run_refuses_changed_data(tmp_path):
    path = tmp_path / "sft_data.json"
    _record_data(path, {"kept": 3, "tokens": 40}, resuming=False)
    _record_data(path, {"kept": 3, "tokens": 40}, resuming=True)
    with pytest.raises(ResumeError, match="SFT data changed"):
        _record_data(path, {"kept": 2, "tokens": 30}, resuming=True)
    _record_data(path, {"kept": 2, "tokens": 30}, resuming=False)  # a fresh start may use new data


# ----------------------------------------------------------------------------- tirl sft


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tirl_sft_on_filtered_eval_trajectories(in_tmp, tiny_model_dir, capsys):
    """A real eval of the tiny model writes trajectories; `tirl sft RECIPE sft.source=rollouts` trains on them."""
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "arithmetic", "eval.size=4", "eval.no_tools=false",
                 "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16"]) == 0
    [written] = in_tmp.glob("runs/eval-*/eval/eval.jsonl")
    recipe = in_tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}, "sft": {"batch_size": 2}}))
    rollouts = "sft.rollouts=[runs/eval-*/eval/*.jsonl]"
    # the random model answers nothing right: the default filter leaves nothing, and says why
    capsys.readouterr()
    assert main(["sft", str(recipe), "run.name=strict", "sft.source=rollouts", rollouts]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "no trajectories left to train on" in out and "read 4 trajectories from 1 file" in out
    assert "correct_only" in out
    assert main(["sft", str(recipe), "run.name=loose", "sft.source=rollouts", rollouts,
                 "sft.filter.correct_only=false", "sft.filter.drop_truncated=false"]) == 0
    run = in_tmp / "runs" / "loose"
    assert (run / "models" / "sft" / "config.json").is_file()
    data = json.loads((run / "sft_data.json").read_text())
    assert data["files"] == [str(written.relative_to(in_tmp))] and data["read"] == data["kept"] == 4
    assert [r["stage"] for r in _records(run)] == ["sft", "sft"]


def test_tirl_sft_rejection_sampling_with_mae_and_pkt(in_tmp, tiny_model_dir, smol_format):
    """Scripted rollouts with tool calls: right (twice, one a duplicate), wrong, failed call then right."""
    right = episode(smol_format, [CALC, RIGHT])
    trajs = [right, right, episode(smol_format, [CALC, "<answer>1</answer><|im_end|>"], correct=False),
             episode(smol_format, [BOOM, CALC, RIGHT], task_id="p1")]
    append_jsonl(in_tmp / "step_000001.jsonl", trajs)
    assert main(["sft", f"model.name={tiny_model_dir}", "sft.source=rollouts", "sft.rollouts=step_*.jsonl",
                 "sft.filter.mask_error_turns=true", "sft.key_token_weighting=true", "sft.batch_size=2"]) == 0
    run = in_tmp / "runs" / "default"
    data = json.loads((run / "sft_data.json").read_text())
    assert data["removed"] == {"drop_errored": 0, "drop_truncated": 0, "correct_only": 1, "dedupe": 1,
                               "mask_error_turns": 0}
    assert data["kept"] == 2 and data["masked_turns"] == 1
    bad = trajs[3].turns[0]
    assert data["tokens"] == sum(right.loss_mask) + sum(trajs[3].loss_mask) - (bad.gen_end - bad.gen_start)
    [step] = _records(run)
    assert step["train/tokens"] == data["tokens"] and step["train/loss"] != pytest.approx(step["train/nll"])


def test_a_run_without_tools_gets_direct_answer_traces(policy):
    """task.tools=[] (the text-only baseline): the tool-free system prompt, no call, the answer; and a
    reference call naming a tool the run lacks is a ConfigError naming it."""
    task = TASKS.get("arithmetic")()
    [seq] = build_sft_data(task, build_toolset([], {}), policy, 1)
    problem = task.sft_problems(1)[0]
    text = policy.fmt.tokenizer.decode(list(seq.prompt_ids) + list(seq.response_ids))
    assert task.system_prompt(False) in text and "calculator" not in text and "<tool_call>" not in text
    assert text.rstrip().endswith(task.final_answer_text(problem) + "<|im_end|>")
    assert sum(seq.loss_mask) == len(seq.loss_mask)
    with pytest.raises(ConfigError, match="calls tool 'calculator'.*task.tools"):
        build_sft_data(task, build_toolset(["python"], {}), policy, 1)


def test_a_failed_reference_call_shows_the_injected_fault_and_the_recovery(policy):
    """info["failed_calls"] = (0,) (arithmetic retry=1.0): call, the fault's error (not run, never a
    target), the same call with its real result, the answer."""
    from tirl.tools.toolset import FAULT_MESSAGE

    task = TASKS.get("arithmetic")(retry=1.0)
    [seq] = build_sft_data(task, build_toolset(["calculator"], {}), policy, 1)
    text = policy.fmt.tokenizer.decode(list(seq.response_ids))
    trained = policy.fmt.tokenizer.decode([t for t, m in zip(seq.response_ids, seq.loss_mask) if m])
    problem = task.sft_problems(1)[0]
    assert text.count("<tool_call>") == 2 and text.count(FAULT_MESSAGE.format(name="calculator")) == 1
    assert "temporarily unavailable" not in trained and trained.count("<tool_call>") == 2
    assert text.rstrip().endswith(task.final_answer_text(problem) + "<|im_end|>")
