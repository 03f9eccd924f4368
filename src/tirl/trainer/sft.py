"""SFT cold start on tool-use traces the task generates, tokenised and masked exactly like RL.

Each trace is built by running the real tools on the task's reference calls, so the observations in
SFT are byte-for-byte what the env would insert during RL; `ChatFormat.sft_sequence` then builds the
tokens incrementally (mask 1 on assistant tokens, 0 on prompt and tool output).
"""

from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path

import torch

from tirl.backends.base import derive_seed
from tirl.chat.format import SFTSequence
from tirl.config import Config
from tirl.tasks.base import Problem, Task
from tirl.tools import ToolSet
from tirl.trainer.build import Policy
from tirl.trainer.forward import response_logprobs
from tirl.trainer.logging import MetricsLogger
from tirl.trainer.stage import TrainingStage
from tirl.types import Message


async def reference_conversation(task: Task, tools: ToolSet, problem: Problem) -> list[Message]:
    """system, user, (assistant call, tool result)*, assistant answer: with real tool outputs."""
    msgs = [Message("system", task.system_prompt(True)), Message("user", problem.question)]
    for call in problem.reference_calls:
        result = await tools.execute(call)
        if not result.ok:
            raise ValueError(f"reference call {call} of problem {problem.id!r} failed: {result.content}")
        msgs += [Message("assistant", "", tool_calls=(call,)),
                 Message("tool", result.content, tool_call_id=call.id, name=call.name)]
    msgs.append(Message("assistant", task.final_answer_text(problem)))
    return msgs


def build_sft_data(task: Task, tools: ToolSet, policy: Policy, count: int) -> list[SFTSequence]:
    problems = task.sft_problems(count)

    async def all_convs():
        return await asyncio.gather(*(reference_conversation(task, tools, p) for p in problems))

    convs = asyncio.run(all_convs())
    return [policy.fmt.sft_sequence(c, tools.schemas()) for c in convs]


def sft_loss_step(policy: Policy, optimizer, seqs: list[SFTSequence], micro: int, max_grad_norm) -> dict:
    """One optimizer step of token-mean NLL over the assistant tokens of `seqs`."""
    total = float(sum(sum(s.loss_mask) for s in seqs))
    nll = 0.0
    for i in range(0, len(seqs), micro):
        chunk = seqs[i:i + micro]
        scored = response_logprobs(policy.model, [s.prompt_ids for s in chunk], [s.response_ids for s in chunk],
                                   [s.loss_mask for s in chunk], compute_dtype=policy.compute_dtype)
        loss = -(scored.logprobs * scored.mask).sum() / total
        loss.backward()
        nll += float(loss.detach())
    params = [p for p in policy.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"train/loss": nll, "train/tokens": total, "train/grad_norm": float(norm)}


def run_sft(cfg: Config, policy: Policy, task: Task, tools: ToolSet, run_dir: Path, logger: MetricsLogger) -> Path:
    """Train, resuming from the newest checkpoint; returns the directory of the trained model."""
    s = cfg.sft
    data = build_sft_data(task, tools, policy, s.examples)
    per_epoch = math.ceil(len(data) / s.batch_size)
    stage = TrainingStage("sft", run_dir, policy, s.optim, per_epoch * s.epochs, s.save_every,
                          s.keep_checkpoints, logger)
    state = stage.resume()
    for step in range(state["step"], stage.total_steps):
        epoch, k = divmod(step, per_epoch)
        order = list(range(len(data)))
        random.Random(derive_seed(cfg.run.seed, "sft", epoch)).shuffle(order)
        batch = [data[i] for i in order[k * s.batch_size:(k + 1) * s.batch_size]]
        metrics = sft_loss_step(policy, stage.optimizer, batch, s.micro_batch_size or s.batch_size,
                                s.optim.max_grad_norm)
        stage.step_done(step + 1, metrics, {})
    return stage.finish(run_dir / "models" / "sft")
