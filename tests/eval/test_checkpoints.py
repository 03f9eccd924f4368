"""`tirl eval --model <run dir or checkpoint>`: which policy a run directory stands for, and checkpoints
(full fine-tuning and LoRA) merged into loadable models with exactly the trained weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tests.eval.helpers import SHORT
from tirl.cli import main
from tirl.config import load_config
from tirl.errors import ModelNotFoundError, ResumeError
from tirl.eval.checkpoints import merge_checkpoint, resolve_eval_model
from tirl.models import loading
from tirl.trainer.build import load_policy
from tirl.trainer.checkpoint import CheckpointManager


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _save_checkpoint(root, step, model) -> None:
    """A checkpoint as training writes it (trainable weights, optimizer, scheduler, RNG, state)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    CheckpointManager(root).save(step, model, optimizer, scheduler, {})


def _perturbed_policy(run_cfg, base: str):
    policy = load_policy(run_cfg.model, "cpu", base, trainable=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return policy


def test_run_directory_stands_for_its_latest_policy(in_tmp, tiny_model_dir, capsys):
    """An SFT-only run: models/sft. An interrupted RL stage's newest complete checkpoint beats it (a step
    without its COMPLETE marker does not count); `tirl eval --model <run>` merges that checkpoint onto
    models/sft, evaluates it on the run's own task settings, and records where it came from. Once
    models/final exists, it wins."""
    assert main(["sft", f"model.name={tiny_model_dir}", "sft.examples=8", "sft.batch_size=4",
                 "task.kwargs.heldout_size=12", "run.name=r"]) == 0
    run = in_tmp / "runs" / "r"
    assert resolve_eval_model("runs/r").path == "runs/r/models/sft"

    policy = _perturbed_policy(load_config(run / "config.yaml"), str(run / "models" / "sft"))
    _save_checkpoint(run / "checkpoints" / "rl", 3, policy.model)
    (run / "checkpoints" / "rl" / "step_000009").mkdir()  # a save cut short: no COMPLETE marker
    chosen = resolve_eval_model("runs/r")
    assert (chosen.checkpoint, chosen.path, chosen.stage) == (True, "runs/r/checkpoints/rl/step_000003", "rl")
    assert resolve_eval_model("runs/r/checkpoints/rl").path == chosen.path

    capsys.readouterr()
    assert main(["eval", "--model", "runs/r", "--size", "2", *SHORT]) == 0
    [out] = (in_tmp / "runs").glob("eval-runs_r_checkpoints_rl_step_000003-arithmetic")
    merged = loading.load_causal_lm(str(out / "model"), torch.float32, "eager", "cpu")
    expected = policy.model.state_dict()
    for name, value in merged.state_dict().items():
        assert torch.equal(value, expected[name]), name
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["task"]["kwargs"] == {"heldout_size": 12} and in_tmp / cfg["model"]["name"] == out / "model"
    info = json.loads((out / "run.json").read_text())
    assert info["checkpoint"] == "runs/r/checkpoints/rl/step_000003" and info["model"] == "runs/r"
    assert json.loads((out / "eval" / "eval.summary.json").read_text())["problems"] == 2

    shutil.copytree(run / "models" / "sft", run / "models" / "final")
    assert resolve_eval_model("runs/r").path == "runs/r/models/final"


def test_lora_checkpoint_merges_to_the_adapted_weights(in_tmp, tiny_model_dir):
    """An SFT checkpoint of a LoRA run holds only the adapters: merged onto the run's model, the saved
    weights equal the adapted policy's (W + BA). The merge is reused for the same checkpoint and refused
    for another one."""
    run = in_tmp / "runs" / "lora"
    run.mkdir(parents=True)
    run_cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.lora.enabled=true", "model.lora.r=2"])
    (run / "config.yaml").write_text(run_cfg.to_yaml())
    policy = _perturbed_policy(run_cfg, str(tiny_model_dir))
    trained = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    _save_checkpoint(run / "checkpoints" / "sft", 1, policy.model)

    model = resolve_eval_model(str(run))
    assert model.checkpoint and model.stage == "sft"
    out = merge_checkpoint(model, in_tmp / "merged")
    merged = loading.load_causal_lm(str(out), torch.float32, "eager", "cpu").state_dict()
    for name, value in loading.merged_state_dict(policy.model).items():
        assert torch.allclose(merged[name], value, atol=1e-6), name
    base = loading.load_causal_lm(str(tiny_model_dir), torch.float32, "eager", "cpu").state_dict()
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the adapters changed something

    assert merge_checkpoint(model, in_tmp / "merged") == out  # reused
    _save_checkpoint(run / "checkpoints" / "sft", 2, policy.model)
    with pytest.raises(ResumeError, match="another checkpoint"):
        merge_checkpoint(resolve_eval_model(str(run)), in_tmp / "merged")


def test_run_directory_without_a_policy_is_an_error(in_tmp, capsys):
    run = in_tmp / "runs" / "empty"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(load_config().to_yaml())
    with pytest.raises(ModelNotFoundError, match="has no policy checkpoint yet"):
        resolve_eval_model(str(run))
    assert main(["eval", "--model", str(run)]) == 2
    assert "has no policy checkpoint yet" in " ".join(capsys.readouterr().out.split())


def test_a_checkpoint_cannot_be_evaluated_through_a_server(in_tmp, tiny_model_dir, capsys):
    run = in_tmp / "runs" / "c"
    run.mkdir(parents=True)
    run_cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    (run / "config.yaml").write_text(run_cfg.to_yaml())
    _save_checkpoint(run / "checkpoints" / "sft", 1, load_policy(run_cfg.model, "cpu", str(tiny_model_dir)).model)
    assert main(["eval", "--model", str(run), "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "a server cannot load" in " ".join(capsys.readouterr().out.split())
