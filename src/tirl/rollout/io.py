"""Trajectories to and from JSON lines (one trajectory per line, every field kept)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from tirl.errors import DataError
from tirl.types import (Message, StopReason, ToolCall, ToolResult, ToolStatus, Trajectory, TrajectoryMeta,
                        Turn)


def to_dict(traj: Trajectory) -> dict[str, Any]:
    """A JSON-ready dict of every field."""
    return _plain(dataclasses.asdict(traj))


def _plain(x: Any) -> Any:
    if isinstance(x, Enum):
        return x.value
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def from_dict(d: dict[str, Any]) -> Trajectory:
    """Inverse of `to_dict`."""
    def call(c):
        return ToolCall(c["id"], c["name"], c["arguments"])

    def result(r):
        return ToolResult(r["call_id"], r["name"], r["content"], ToolStatus(r["status"]), r["latency_s"])

    turns = tuple(Turn(t["gen_start"], t["gen_end"], t["obs_end"], t["text"], t["finish_reason"],
                       tuple(map(call, t["tool_calls"])), tuple(map(result, t["tool_results"])),
                       t["gen_seconds"], t["tool_seconds"]) for t in d["turns"])
    messages = tuple(Message(m["role"], m["content"], tuple(map(call, m["tool_calls"])), m["tool_call_id"],
                             m["name"]) for m in d["messages"])
    meta = d["meta"]
    return Trajectory(
        prompt_ids=tuple(d["prompt_ids"]), response_ids=tuple(d["response_ids"]), loss_mask=tuple(d["loss_mask"]),
        logprobs=tuple(d["logprobs"]), turns=turns, messages=messages, stop_reason=StopReason(d["stop_reason"]),
        meta=TrajectoryMeta(meta["task_id"], meta["group_id"], meta["sample_index"], meta["step"],
                            tuple(meta["node_ids"]), meta["error"], meta.get("origin")),
        final_answer=d["final_answer"], reward=d["reward"], reward_components=d["reward_components"],
        correct=d["correct"], turn_rewards=tuple(d.get("turn_rewards", ())))


def append_jsonl(path: Path, trajectories: Iterable[Trajectory]) -> None:
    """Append trajectories to a JSONL file (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for t in trajectories:
            f.write(json.dumps(to_dict(t)) + "\n")


def drop_partial_tail(path: Path) -> int:
    """Cut an unfinished last line (a write interrupted by a kill) off a JSONL file; returns the bytes
    removed. Complete lines are never touched."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(keep)
    return len(data) - keep


def read_jsonl(path: Path) -> Iterator[Trajectory]:
    """Trajectories of a JSONL file; a bad line raises naming the file and line."""
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield from_dict(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{n}: not a tirl trajectory ({type(e).__name__}: {e})") from e
