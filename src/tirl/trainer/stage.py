"""What SFT and RL share: optimizer and schedule, exact resume from the last checkpoint, per-step
logging and display, and saving the finished model."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from tirl.config import OptimConfig
from tirl.models.loading import save_model
from tirl.trainer.build import Policy
from tirl.trainer import distributed
from tirl.trainer.checkpoint import CheckpointManager
from tirl.trainer.display import StepDisplay
from tirl.trainer.logging import MetricsLogger
from tirl.trainer.optim import make_optimizer, make_scheduler


class TrainingStage:
    """A numbered sequence of optimizer steps that can be killed and resumed exactly."""

    def __init__(self, name: str, run_dir: Path, policy: Policy, optim: OptimConfig, total_steps: int,
                 save_every: int, keep: int, logger: MetricsLogger):
        self.name = name
        self.run_dir = Path(run_dir)
        self.policy = policy
        self.total_steps = total_steps
        self.save_every = save_every
        self.logger = logger
        self.optimizer = make_optimizer(policy.model, optim)
        self.scheduler = make_scheduler(self.optimizer, optim, total_steps)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints" / name, keep)
        self.display: StepDisplay | None = None
        self._t = time.monotonic()

    def resume(self) -> dict[str, Any]:
        """Restore the newest checkpoint (if any); returns the saved state, `step` = steps done."""
        latest = self.ckpt.latest()
        state: dict[str, Any] = {"step": 0}
        if latest is not None:
            state = self.ckpt.load(latest, self.policy.model, self.optimizer, self.scheduler)
        if distributed.world().is_main:  # under torch.distributed, rank 0 alone logs and saves
            self.logger.truncate(self.name, state["step"])
            self.display = StepDisplay(self.name, self.total_steps, state["step"])
        self._t = time.monotonic()
        return state

    def step_done(self, step: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        """After the optimizer step: advance the schedule, log step `step` (1-based count of steps
        done) and checkpoint when due."""
        now = time.monotonic()
        metrics = {**metrics, "train/lr": self.scheduler.get_last_lr()[0], "time/step_s": now - self._t}
        self.scheduler.step()
        self._t = now
        world = distributed.world()
        if world.is_main:
            self.logger.log(self.name, step, metrics)
        if self.display is not None:
            self.display.update(step, metrics)
        if self.saves_at(step):
            model, optimizer = distributed.full_views(self.policy.model, self.optimizer, world)  # fsdp2: gathered
            distributed.main_first(world, lambda: self.ckpt.save(step, model, optimizer, self.scheduler, state))

    def saves_at(self, step: int) -> bool:
        """Whether `step_done(step, ...)` writes a checkpoint."""
        return step % self.save_every == 0 or step == self.total_steps

    def finish(self, out_dir: Path) -> Path:
        """Save the trained model as a transformers directory and drop the training checkpoints."""
        if self.display is not None:
            self.display.close()
        world = distributed.world()
        model = distributed.full_model(self.policy.model, world)  # fsdp2: gathered (on rank 0)
        distributed.main_first(world, lambda: self._save_final(model, out_dir))
        return out_dir

    def _save_final(self, model, out_dir: Path) -> None:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, self.policy.tokenizer, self.policy.fmt.template, tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        self.ckpt.remove_all()
