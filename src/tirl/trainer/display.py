"""What the user watches: a progress bar with ETA and one line of key metrics per step (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(highlight=False)

_SHOWN = (("reward/mean", "reward", "{:.3f}"), ("accuracy", "acc", "{:.2f}"), ("tool_calls/mean", "tools", "{:.2f}"),
          ("tool_calls/invalid_rate", "invalid", "{:.2f}"), ("train/loss", "loss", "{:.4f}"),
          ("speed/tokens_per_s", "tok/s", "{:.0f}"), ("time/step_s", "step", "{:.1f}s"))


def summary_line(metrics: dict[str, Any]) -> str:
    """'reward 0.412  acc 0.38  tools 1.10 ...' for the metrics present."""
    parts = []
    for key, label, fmt in _SHOWN:
        if key in metrics and metrics[key] is not None:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    return "  ".join(parts)


class StepDisplay:
    """Progress of one stage (sft or rl)."""

    def __init__(self, stage: str, total: int, start: int = 0):
        self.stage = stage
        self.total = total
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.task = self.progress.add_task(stage, total=total, completed=start)
        self.progress.start()

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=step)
        self.progress.console.print(f"[cyan]{self.stage}[/] step {step:>4}/{self.total}  {summary_line(metrics)}")

    def close(self) -> None:
        self.progress.stop()
