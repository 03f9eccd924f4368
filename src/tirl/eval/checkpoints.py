"""What `tirl eval --model` may name besides a model: a training run's directory or one of its checkpoints.

A run directory (`runs/<name>`, holding the run's `config.yaml`) stands for its latest policy, the first
of these that exists: `models/final` (RL finished), the newest complete `checkpoints/rl/step_*` (RL
interrupted), `models/sft`, the newest complete `checkpoints/sft/step_*`. A `models/*` directory is a
plain transformers model. A checkpoint (`checkpoints/<stage>/step_N`, or `checkpoints/<stage>` for its
newest) holds only the trained parameters (all of them, or the LoRA adapters); it is merged with the
model its stage started from (the run's `model.name`, or for RL after SFT the run's `models/sft`) and
saved once as a transformers directory before evaluation, with a `source.json` naming the checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tirl.errors import ModelNotFoundError, ResumeError

COMPLETE = "COMPLETE"
"""Marker file of a finished checkpoint (written last by `CheckpointManager.save`)."""
STAGES = ("sft", "rl")


@dataclass(frozen=True)
class EvalModel:
    """`--model`, resolved: a loadable model, or a training checkpoint still to be merged."""

    name: str
    """As the user wrote it."""
    path: str
    """A model name `loading.resolve` accepts, or the checkpoint directory (`step_N`) to merge."""
    checkpoint: bool = False
    """True when `path` is a training checkpoint (see `merge_checkpoint`)."""
    run_dir: Path | None = None
    """The training run it comes from, if any."""

    @property
    def stage(self) -> str | None:
        """sft or rl for a checkpoint."""
        return Path(self.path).parent.name if self.checkpoint else None


def resolve_eval_model(name: str) -> EvalModel:
    """Resolve `--model` without loading anything; a run directory with no policy yet is an error."""
    path = Path(name).expanduser()
    if not path.is_dir() or (path / "config.json").is_file():
        return EvalModel(name, name, run_dir=_run_of_model(path))
    if _is_checkpoint(path):
        return EvalModel(name, str(path), True, _run_root(path.parent.parent.parent, name))
    if path.parent.name == "checkpoints" and path.name in STAGES:
        step = _latest_step(path)
        if step is None:
            raise ModelNotFoundError(f"{name!r} holds no complete checkpoint (no {path}/step_*/{COMPLETE})")
        return EvalModel(name, str(step), True, _run_root(path.parent.parent, name))
    if (path / "config.yaml").is_file():
        return _latest_policy(path, name)
    return EvalModel(name, name)  # loading.resolve explains what is missing


def _latest_policy(run_dir: Path, name: str) -> EvalModel:
    final, sft = run_dir / "models" / "final", run_dir / "models" / "sft"
    if (final / "config.json").is_file():
        return EvalModel(name, str(final), run_dir=run_dir)
    rl_step = _latest_step(run_dir / "checkpoints" / "rl")
    if rl_step is not None:
        return EvalModel(name, str(rl_step), True, run_dir)
    if (sft / "config.json").is_file():
        return EvalModel(name, str(sft), run_dir=run_dir)
    sft_step = _latest_step(run_dir / "checkpoints" / "sft")
    if sft_step is not None:
        return EvalModel(name, str(sft_step), True, run_dir)
    raise ModelNotFoundError(
        f"run directory {name!r} has no policy checkpoint yet (looked for models/final, checkpoints/rl/step_*, "
        "models/sft, checkpoints/sft/step_*): train it first, or name a model")


def _is_checkpoint(path: Path) -> bool:
    return path.name.startswith("step_") and (path / "trainable.safetensors").is_file()


def _latest_step(stage_dir: Path) -> Path | None:
    done = sorted(p for p in stage_dir.glob("step_*") if (p / COMPLETE).exists() and _is_checkpoint(p))
    return done[-1] if done else None


def _run_root(run_dir: Path, name: str) -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise ModelNotFoundError(f"{name!r} looks like a training checkpoint, but {run_dir} has no config.yaml "
                                 "(the run's config is needed to rebuild the model)")
    return run_dir


def _run_of_model(path: Path) -> Path | None:
    """The run directory of `runs/<name>/models/<stage>`, if that is what `path` is."""
    run_dir = path.parent.parent
    return run_dir if path.parent.name == "models" and (run_dir / "config.yaml").is_file() else None


# ----------------------------------------------------------------------------- merging a checkpoint


def checkpoint_base(model: EvalModel, run_cfg) -> str:
    """The model the checkpoint's stage started from: `models/sft` for RL after SFT, else the run's model."""
    from tirl.models import loading

    assert model.checkpoint and model.run_dir is not None
    if model.stage == "rl" and run_cfg.pipeline.sft:
        sft = model.run_dir / "models" / "sft"
        if not (sft / "config.json").is_file():
            raise ModelNotFoundError(f"{model.path} continues the run's SFT model, but {sft} is missing")
        return str(sft)
    return loading.materialize(loading.resolve(run_cfg.model.name))


def load_run_config(run_dir: Path):
    """The run's saved config (a `tirl.config.Config`)."""
    from tirl.config import load_config
    from tirl.errors import ConfigError

    try:
        return load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise ModelNotFoundError(f"cannot read the config of the run in {run_dir}: {e}") from None


def merge_checkpoint(model: EvalModel, out: Path) -> Path:
    """Write the checkpoint's policy as a transformers directory at `out` (LoRA merged) and return it.

    Reused when `out` already holds this checkpoint; an `out` made from another checkpoint is an error.
    """
    source = {"checkpoint": str(Path(model.path).resolve())}
    if (out / "source.json").is_file():
        held = json.loads((out / "source.json").read_text())
        if held != source:
            raise ResumeError(f"{out} holds the model of another checkpoint ({held.get('checkpoint')}), not "
                              f"{source['checkpoint']}; evaluate into another directory (run.name / run.dir)")
        return out
    from safetensors.torch import load_file

    from tirl.models.loading import save_model
    from tirl.trainer.build import load_policy

    run_cfg = load_run_config(model.run_dir)
    policy = load_policy(run_cfg.model, "cpu", checkpoint_base(model, run_cfg), trainable=True)
    weights = load_file(str(Path(model.path) / "trainable.safetensors"))
    params = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ModelNotFoundError(f"checkpoint {model.path} does not match the run's model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
    import torch

    with torch.no_grad():
        for key, value in weights.items():
            params[key].copy_(value)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(policy.model, policy.tokenizer, policy.fmt.template, tmp)
    (tmp / "source.json").write_text(json.dumps(source))
    tmp.rename(out)
    return out
