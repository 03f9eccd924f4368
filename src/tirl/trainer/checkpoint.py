"""Checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG states, trainer state,
and any attached parts (a critic's value head, a replay buffer).

A checkpoint is written into a temporary directory and renamed into place, so a run killed while
saving leaves the previous checkpoint intact; `latest()` only ever sees complete ones.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tirl.errors import ResumeError

_DONE = "COMPLETE"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates (all for full fine-tuning, the adapters for LoRA)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


class CheckpointManager:
    """Numbered checkpoints `step_000123/` under one directory, keeping the newest `keep`."""

    def __init__(self, root: Path, keep: int = 1):
        self.root = Path(root)
        self.keep = keep
        self.parts: dict[str, Any] = {}

    def attach(self, name: str, part: Any) -> None:
        """Save and restore `part` with every checkpoint: a torch module (its state dict, in
        `<name>.safetensors`) or an object with a JSON-safe `state_dict()` and `load_state_dict()`
        (in `<name>.json`)."""
        if name in self.parts or name in ("trainable", "optim", "state"):
            raise ValueError(f"checkpoint part {name!r} is taken")
        self.parts[name] = part

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step_*") if (p / _DONE).exists())
        return done[-1] if done else None

    def save(self, step: int, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp_step_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        self._save_parts(tmp)
        (tmp / _DONE).touch()
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self._prune()
        return final

    def load(self, path: Path, model, optimizer, scheduler) -> dict[str, Any]:
        """Restore everything saved at `path`; returns the trainer state (with `step`)."""
        weights = load_file(str(path / "trainable.safetensors"))
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != expected:
            raise ResumeError(f"checkpoint {path} does not match the model: missing "
                              f"{sorted(expected - set(weights))[:3]}, unexpected {sorted(set(weights) - expected)[:3]}")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        blob = torch.load(path / "optim.pt", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        self._load_parts(path)
        return json.loads((path / "state.json").read_text())

    def _save_parts(self, directory: Path) -> None:
        for name, part in self.parts.items():
            if isinstance(part, torch.nn.Module):
                save_file({k: v.detach().cpu().contiguous() for k, v in part.state_dict().items()},
                          str(directory / f"{name}.safetensors"))
            else:
                (directory / f"{name}.json").write_text(json.dumps(part.state_dict()))

    def _load_parts(self, directory: Path) -> None:
        for name, part in self.parts.items():
            is_module = isinstance(part, torch.nn.Module)
            file = directory / f"{name}.{'safetensors' if is_module else 'json'}"
            if not file.exists():
                raise ResumeError(f"checkpoint {directory} has no {file.name}: it was written by a run without "
                                  f"the {name.replace('_', ' ')}")
            if is_module:
                device = next(part.parameters()).device
                part.load_state_dict({k: v.to(device) for k, v in load_file(str(file)).items()})
            else:
                part.load_state_dict(json.loads(file.read_text()))

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / _DONE).exists())
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
