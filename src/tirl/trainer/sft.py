"""SFT: the cold start on task traces, or rejection sampling from rollouts; tokenised and masked like RL.

`sft.source=task`: each trace is built by running the real tools on the task's reference calls, so the
observations in SFT are byte-for-byte what the env would insert during RL; `ChatFormat.sft_sequence`
then builds the tokens incrementally (mask 1 on assistant tokens, 0 on prompt and tool output).
`sft.source=rollouts`: filtered trajectories of earlier runs, trained on with their own tokens and
masks (`tirl.trainer.sft_data`).

The loss of a batch is a weighted token mean over the trained tokens (ToRA: tool output is never a
target, reference 5.3):

    loss = sum_{i,t} w_{i,t} * -log pi(x_{i,t} | x_{i,<t}) / sum_{i,t} w_{i,t}

with w = loss_mask (plain token-mean NLL), or TL-Training's PKT weights (`sft.key_token_weighting`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
from pathlib import Path

import torch

from tirl.backends.base import derive_seed
from tirl.chat.format import SFTSequence
from tirl.config import Config, SFTConfig
from tirl.errors import ConfigError, ResumeError
from tirl.tasks.base import Problem, Task
from tirl.tools import ToolSet
from tirl.tools.toolset import injected_fault
from tirl.trainer import distributed
from tirl.trainer.build import Policy
from tirl.trainer.display import console
from tirl.trainer.forward import response_logprobs
from tirl.trainer.logging import MetricsLogger
from tirl.trainer.sft_data import SFTExample, example_of, rollout_examples, with_key_weights
from tirl.trainer.stage import TrainingStage
from tirl.types import Message


async def reference_conversation(task: Task, tools: ToolSet, problem: Problem) -> list[Message]:
    """system, user, (assistant call, tool result)*, assistant answer: with real tool outputs.

    A run without tools (`task.tools=[]` on a task whose problems bring none: the text-only baseline)
    gets the direct answer instead: the tool-free system prompt, no calls. A reference call naming a tool
    the run does not have is a `ConfigError`. Calls listed in `problem.info["failed_calls"]` get the
    injected-fault error instead of running."""
    with_tools = bool(len(tools)) or task.problem_tools
    msgs = [Message("system", task.system_prompt(with_tools)), Message("user", problem.question)]
    failed = set(problem.info.get("failed_calls", ()))
    for i, call in enumerate(problem.reference_calls if with_tools else ()):
        if call.name not in tools and not task.problem_tools:
            raise ConfigError(f"the SFT trace of problem {problem.id!r} calls tool {call.name!r}, which this run "
                              f"does not have (task.tools: {tools.names}); add it, or set task.tools=[] for "
                              "direct-answer traces")
        if i in failed:  # the trace shows this call failing, then what the model does about it
            result = injected_fault(call)
        elif not (result := await tools.execute(call)).ok:
            raise ValueError(f"reference call {call} of problem {problem.id!r} failed: {result.content}")
        msgs += [Message("assistant", "", tool_calls=(call,)),
                 Message("tool", result.content, tool_call_id=call.id, name=call.name)]
    msgs.append(Message("assistant", task.final_answer_text(problem)))
    return msgs


def build_sft_data(task: Task, tools: ToolSet, policy: Policy, count: int) -> list[SFTSequence]:
    """`count` task traces tokenised with the policy's chat format."""
    problems = task.sft_problems(count)

    async def all_convs():
        return await asyncio.gather(*(reference_conversation(task, tools, p) for p in problems))

    convs = asyncio.run(all_convs())
    return [policy.fmt.sft_sequence(c, tools.schemas() or None) for c in convs]


def build_examples(cfg: SFTConfig, policy: Policy, task: Task, tools: ToolSet) -> tuple[list[SFTExample], dict]:
    """The training sequences of `cfg.source`, PKT-weighted if asked, and a summary of where they came from."""
    if cfg.source == "rollouts":
        examples, report = rollout_examples(cfg, policy.fmt)
        summary, detail = {"source": "rollouts", **dataclasses.asdict(report)}, f"; {report.describe()}"
    else:
        seqs = build_sft_data(task, tools, policy, cfg.examples)
        examples = [example_of(s, f"task:{i}") for i, s in enumerate(seqs)]
        summary, detail = {"source": "task", "kept": len(examples)}, ""
    if cfg.key_token_weighting:
        examples = with_key_weights(examples, policy.fmt, cfg.max_key_weight)
    summary["tokens"] = sum(sum(e.loss_mask) for e in examples)
    console.print(f"[cyan]sft data[/] ({cfg.source}): {len(examples)} sequences, {summary['tokens']} trained "
                  f"tokens{detail}", highlight=False)
    return examples, summary


def weighted_token_mean(nll_B_T: torch.Tensor, weights_B_T: torch.Tensor, total_weight: float) -> torch.Tensor:
    """sum(w * nll) / total_weight, where total_weight is sum(w) over the whole batch (all micro-batches)."""
    return (nll_B_T * weights_B_T).sum() / total_weight


def chunk_loss(policy: Policy, chunk: list[SFTExample], total_weight: float) -> tuple[torch.Tensor, float]:
    """This micro-batch's share of the batch loss (differentiable), and its summed unweighted NLL."""
    scored = response_logprobs(policy.model, [e.prompt_ids for e in chunk], [e.response_ids for e in chunk],
                               [e.loss_mask for e in chunk], compute_dtype=policy.compute_dtype)
    weights_B_T = torch.zeros_like(scored.mask)
    for i, e in enumerate(chunk):
        weights_B_T[i, :len(e.weights)] = torch.tensor(e.weights, dtype=weights_B_T.dtype)
    nll_B_T = -scored.logprobs * scored.mask
    return weighted_token_mean(nll_B_T, weights_B_T, total_weight), float(nll_B_T.detach().sum())


def sft_loss_step(policy: Policy, optimizer, batch: list[SFTExample], micro: int, max_grad_norm) -> dict:
    """One optimizer step of the weighted token-mean NLL (module docstring) over the trained tokens of `batch`.
    Under torch.distributed each rank runs its share of `batch` with the whole batch's normaliser and the
    gradients are summed (module `distributed`), which gives the single-process step."""
    world = distributed.world()
    total_weight = float(sum(sum(e.weights) for e in batch))
    tokens = float(sum(sum(e.loss_mask) for e in batch))
    loss_sum, nll_sum = 0.0, 0.0
    mine = world.share(batch)
    chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
    for chunk in chunks:
        loss, nll = chunk_loss(policy, chunk, total_weight)
        distributed.backward(loss, world)
        loss_sum += float(loss.detach())
        nll_sum += nll
    distributed.match_collectives(len(chunks), lambda: chunk_loss(policy, batch[:1], total_weight)[0], world)
    sums = distributed.reduce_accumulated([policy.model], {"loss": loss_sum, "nll": nll_sum}, world)
    loss_sum, nll_sum = sums.get("loss", 0.0), sums.get("nll", 0.0)
    params = [p for p in policy.model.parameters() if p.grad is not None]
    norm = (distributed.clip_grad_norm(params, max_grad_norm) if world.sharded
            else torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"train/loss": loss_sum, "train/nll": nll_sum / tokens, "train/tokens": tokens,
            "train/grad_norm": float(norm)}


def run_sft(cfg: Config, policy: Policy, task: Task, tools: ToolSet, run_dir: Path, logger: MetricsLogger) -> Path:
    """Train, resuming from the newest checkpoint; returns the directory of the trained model."""
    s = cfg.sft
    data, summary = build_examples(s, policy, task, tools)
    per_epoch = math.ceil(len(data) / s.batch_size)
    stage = TrainingStage("sft", run_dir, policy, s.optim, per_epoch * s.epochs, s.save_every,
                          s.keep_checkpoints, logger)
    state = stage.resume()
    distributed.prepare_model(policy.model, distributed.world(), stage)
    if distributed.world().is_main:
        _record_data(run_dir / "sft_data.json", summary, resuming=state["step"] > 0)
    for step in range(state["step"], stage.total_steps):
        epoch, k = divmod(step, per_epoch)
        order = list(range(len(data)))
        random.Random(derive_seed(cfg.run.seed, "sft", epoch)).shuffle(order)
        batch = [data[i] for i in order[k * s.batch_size:(k + 1) * s.batch_size]]
        metrics = sft_loss_step(policy, stage.optimizer, batch, s.micro_batch_size or s.batch_size,
                                s.optim.max_grad_norm)
        stage.step_done(step + 1, metrics, {})
    return stage.finish(run_dir / "models" / "sft")


def _record_data(path: Path, summary: dict, resuming: bool) -> None:
    """Write the data summary; a resumed run must find the same data it started with."""
    if resuming and path.exists():
        old = json.loads(path.read_text())
        if old != summary:
            raise ResumeError(f"the SFT data changed since this run started ({path}: {old.get('kept')} sequences, "
                              f"{old.get('tokens')} tokens; now {summary.get('kept')}, {summary.get('tokens')}); "
                              "use another run.name, or restore the rollout files")
    path.write_text(json.dumps(summary, indent=1))
