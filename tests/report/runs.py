"""Run directories for the report tests, written with tirl's own writers (config, MetricsLogger,
append_jsonl, trajectory_metrics) and real token ids of the default model's tokenizer.

The RL steps and evals hold tool calls that succeed and fail, several turns, reward components, a
multi-byte character split over tokens, and one trajectory whose model text, tool output and task
id are hostile HTML (`HOSTILE`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tirl.config import Config
from tirl.rollout.io import append_jsonl
from tirl.rollout.metrics import trajectory_metrics
from tirl.trainer.logging import MetricsLogger
from tirl.types import (Message, StopReason, ToolCall, ToolResult, ToolStatus, Trajectory, TrajectoryMeta, Turn)

HOSTILE = '<script>window.__pwned = 1</script></script><img src=x onerror="window.__pwned = 2">'
"""Model-written HTML that must show as text and never run."""
HOSTILE_TASK = "arithmetic/train/<b>bold</b>"
SYSTEM = "Solve the problem. Use the calculator tool, then answer as <answer>number</answer>."
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17 * 23"}}\n</tool_call>'
BAD_CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expr": "17*23"}}\n</tool_call>'
UNICODE_TEXT = "Résumé: 17 × 23 🦜 鸚鵡 <answer>391</answer>"


@dataclass(frozen=True)
class ToolUse:
    """One call attempt of a turn and what came back."""

    name: str
    arguments: dict[str, Any]
    content: str
    status: ToolStatus = ToolStatus.OK


class Encoder:
    """Token ids of text with the default model's tokenizer (tokenizer.json; special tokens recognised)."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def __call__(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def trajectory(enc: Encoder, question: str, turns: list[tuple[str, list[ToolUse]]], *, reward: float,
               components: dict[str, float], correct: bool | None, step: int = 0, group: str = "g0",
               sample: int = 0, task_id: str = "arithmetic/train/0", answer: str | None = None) -> Trajectory:
    """A trajectory with ChatML-style tokens: each turn's text + <|im_end|> sampled (mask 1), its tool
    responses and the next generation prompt inserted (mask 0)."""
    prompt = enc(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                 "<|im_start|>assistant\n")
    ids: list[int] = []
    mask: list[int] = []
    out_turns, messages = [], [Message("system", SYSTEM), Message("user", question)]
    for k, (text, uses) in enumerate(turns):
        sampled = enc(text + "<|im_end|>")
        start = len(ids)
        ids += sampled
        mask += [1] * len(sampled)
        calls = tuple(ToolCall(f"c{k}_{i}", u.name, u.arguments) for i, u in enumerate(uses))
        results = tuple(ToolResult(c.id, u.name, u.content, u.status, 0.01 * (i + 1))
                        for i, (c, u) in enumerate(zip(calls, uses)))
        if uses:
            obs = enc("\n<|im_start|>user\n" + "".join(f"<tool_response>\n{u.content}\n</tool_response>\n"
                                                        for u in uses) + "<|im_end|>\n<|im_start|>assistant\n")
            ids += obs
            mask += [0] * len(obs)
        out_turns.append(Turn(start, start + len(sampled), len(ids), text, "stop" if uses else "eos", calls, results,
                              0.2, 0.01 * len(uses)))
        messages.append(Message("assistant", text, calls))
        messages += [Message("tool", r.content, tool_call_id=r.call_id, name=r.name) for r in results]
    return Trajectory(
        prompt_ids=tuple(prompt), response_ids=tuple(ids), loss_mask=tuple(mask),
        logprobs=tuple(-0.5 if m else 0.0 for m in mask), turns=tuple(out_turns), messages=tuple(messages),
        stop_reason=StopReason.ANSWERED, meta=TrajectoryMeta(task_id, group, sample, step),
        final_answer=answer, reward=reward, reward_components=components, correct=correct)


def solved(enc: Encoder, step: int, group: str, sample: int, task_id: str) -> Trajectory:
    """Calls the calculator (ok), then answers right."""
    return trajectory(enc, "What is 17 * 23?", [(CALL, [ToolUse("calculator", {"expression": "17 * 23"}, "391")]),
                                                ("<answer>391</answer>", [])],
                      reward=1.2, components={"correct": 1.0, "format": 0.2}, correct=True, step=step, group=group,
                      sample=sample, task_id=task_id, answer="391")


def failed_call(enc: Encoder, step: int, group: str, sample: int, task_id: str) -> Trajectory:
    """A call with a wrong argument name (validation error), then a wrong answer."""
    error = "validation_error: calculator() missing required argument 'expression'"
    return trajectory(enc, "What is 17 * 23?", [(BAD_CALL, [ToolUse("calculator", {"expr": "17*23"}, error,
                                                                    ToolStatus.VALIDATION_ERROR)]),
                                                ("<answer>400</answer>", [])],
                      reward=0.1, components={"correct": 0.0, "format": 0.1}, correct=False, step=step, group=group,
                      sample=sample, task_id=task_id, answer="400")


def unicode_answer(enc: Encoder, step: int, group: str, sample: int, task_id: str) -> Trajectory:
    """No tool call; an answer with accents, a multiplication sign and an emoji (split over tokens)."""
    return trajectory(enc, "What is 17 * 23?", [(UNICODE_TEXT, [])], reward=0.9,
                      components={"correct": 1.0, "format": -0.1}, correct=True, step=step, group=group,
                      sample=sample, task_id=task_id, answer="391")


def hostile(enc: Encoder, step: int, group: str, sample: int) -> Trajectory:
    """Model text, tool output and task id that are HTML."""
    return trajectory(enc, f"Echo {HOSTILE}", [(f"I will print {HOSTILE}", [ToolUse("python", {"code": HOSTILE},
                                                                                     HOSTILE,
                                                                                     ToolStatus.EXECUTION_ERROR)]),
                                               (f"<answer>{HOSTILE}</answer>", [])],
                      reward=-0.5, components={"correct": 0.0, "format": -0.5}, correct=False, step=step,
                      group=group, sample=sample, task_id=HOSTILE_TASK, answer=HOSTILE)


def step_trajectories(enc: Encoder, step: int) -> list[Trajectory]:
    """Two groups of three samples; step 2 has the hostile one."""
    out = []
    for g in range(2):
        task = f"arithmetic/train/{2 * (step - 1) + g}"
        makers = (solved, failed_call, unicode_answer)
        out += [make(enc, step, f"{step}-{g}", i, task) for i, make in enumerate(makers)]
    if step == 2:
        out[-1] = hostile(enc, step, f"{step}-1", 2)
    return out


def rl_metrics(step: int, trajs: list[Trajectory]) -> dict[str, Any]:
    return {**trajectory_metrics(trajs), "train/loss": 0.5 / step, "train/grad_norm": 1.0 + step,
            "train/entropy": 1.5 - 0.1 * step, "train/kl": 0.001 * step, "train/pg_clipfrac": 0.02 * step,
            "speed/tokens_per_s": 100.0 + step, "time/step_s": 2.0, "train/lr": 3e-5}


def write_run(run_dir: Path, model_dir: Path, *, sft: bool = True, rl_steps: int = 3,
              evals: tuple[str, ...] = ("base", "base_no_tools", "final"), complete: bool = True) -> Path:
    """A run directory as the pipeline leaves it (only the stages asked for)."""
    enc = Encoder(model_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config.model_validate({"run": {"name": "report-test", "dir": str(run_dir)},
                                 "model": {"name": str(model_dir)},
                                 "task": {"reward_kwargs": {"note": HOSTILE}},
                                 "pipeline": {"sft": sft, "rl": rl_steps > 0}})
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "run.json").write_text(json.dumps({"tirl_version": "0.1.0", "model": str(model_dir),
                                                  "model_path": str(model_dir), "device": "cpu",
                                                  "compute_dtype": "float32", "tools": {}}))
    logger = MetricsLogger(run_dir, tensorboard=False)
    if sft:
        for step in (1, 2):
            logger.log("sft", step, {"train/loss": 1.0 / step, "train/nll": 1.0 / step, "train/grad_norm": 3.0})
    for step in range(1, rl_steps + 1):
        trajs = step_trajectories(enc, step)
        append_jsonl(run_dir / "trajectories" / "rl" / f"step_{step:06d}.jsonl", trajs)
        logger.log("rl", step, rl_metrics(step, trajs))
    results = {name: write_eval(run_dir, enc, name) for name in evals}
    if complete:
        (run_dir / "results.json").write_text(json.dumps({"seconds": 1.0, "results": results}))
    return run_dir


def write_eval(run_dir: Path, enc: Encoder, name: str) -> dict[str, Any]:
    """Four held-out problems (two right, two wrong) and their summary, as `run_eval` writes them."""
    makers = (solved, failed_call, unicode_answer, failed_call)
    trajs = [make(enc, 0, f"0-{i}", 0, f"arithmetic/heldout/{i}") for i, make in enumerate(makers)]
    append_jsonl(run_dir / "eval" / f"{name}.jsonl", trajs)
    summary = {"name": name, "problems": 4, "samples": 4, **trajectory_metrics(trajs)}
    (run_dir / "eval" / f"{name}.summary.json").write_text(json.dumps(summary, indent=1))
    return summary
