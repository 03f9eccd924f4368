"""Metrics of a run: JSON lines (the record) and TensorBoard events (for browsing)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends `{"stage", "step", ...metrics}` lines to metrics.jsonl; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._tb_dir = Path(run_dir) / "tb" if tensorboard else None

    def truncate(self, stage: str, after_step: int) -> None:
        """Drop lines of `stage` with step > after_step (a resumed run redoes those steps)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("stage") != stage or rec.get("step", 0) <= after_step:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
        rec = {"stage": stage, "step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        writer = self._writer()
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(f"{stage}/{k}", v, step)
            writer.flush()

    def records(self, stage: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        recs = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in recs if stage is None or r.get("stage") == stage]

    def _writer(self):
        if self._tb_dir is None:
            return None
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self._tb_dir))
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
