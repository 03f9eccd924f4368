"""Rollout time with a tool of fixed latency: batch-synchronous vs tirl's asynchronous scheduling.

    python bench/rollout_async.py [--latency 0.2] [--tool-turns 1 3] [--prompts 4] [--samples 8]

The same trajectories (same prompts, seeds and token budgets; the default model on CPU, in its
generation dtype) are rolled out five ways, side by side in this one process:

- sync: VerlTool's `rollout.mode=sync`, the baseline. A generation batch runs when every live
  trajectory waits for one and answers when all of it is done; tools run after that; every turn
  prefills its whole conversation.
- sync+kept: tirl's `backend.scheduling=sync`: the same barrier, but a turn continues from the KV
  cache its trajectory's previous turn left (only the last token and the tool output are prefilled).
- async: tirl's default. Each trajectory advances on its own: a turn joins the running decode batch
  as soon as its tool is back and is answered as soon as it ends, with the kept cache.
- async, no kept cache: the same scheduling, every turn prefilling its whole conversation.
- pure generation: async with a tool that answers at once: the limit where tool latency is fully
  hidden.

Every trajectory calls the tool after each of its first `k` turns (whatever it wrote: the env below
answers every turn but the last with a tool message after `--latency` seconds), then answers. A turn
ends at the end of a sentence or line (the env's stop strings, as `</tool_call>` ends a real tool
call), so turns are short and of varying length, like tool calls; a turn that runs out of its token
budget instead ends its trajectory early (the printed tool-call counts show how many did).
Each setting runs `--repeats` times with other seeds (the same seeds in every mode); printed per k:
the mean times, sync/async, and how much of the tool time async leaves visible.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from tirl.backends.base import SamplingParams
from tirl.backends.hf import HFBackend
from tirl.chat.format import load_chat_format
from tirl.envs.base import Env, StepResult
from tirl.models import loading
from tirl.models.embedded import DEFAULT_MODEL
from tirl.rollout.agent import TurnLimits, run_trajectory
from tirl.tasks.arithmetic import ArithmeticTask
from tirl.types import Message, StopReason, TrajectoryMeta


class LatencyEnv(Env):
    """Answers each of the first `tool_turns` assistant turns with a tool message after `latency` s."""

    tool_schemas: list[dict] = []
    stop_strings = (".", "\n")

    def __init__(self, question: str, tool_turns: int, latency: float):
        self.question, self.tool_turns, self.latency, self.turn = question, tool_turns, latency, 0

    async def reset(self) -> list[Message]:
        return [Message("system", "You are a careful assistant. Think step by step."),
                Message("user", self.question)]

    async def step(self, assistant: Message) -> StepResult:
        self.turn += 1
        if self.turn > self.tool_turns:
            return StepResult(done=True, stop_reason=StopReason.ANSWERED, final_answer=assistant.content)
        await asyncio.sleep(self.latency)
        return StepResult(observations=(Message("tool", f"Result {self.turn}: 42. Continue.", tool_call_id="c",
                                                name="lookup"),))


def rollout(backend, fmt, questions, samples, tool_turns, latency, limits, seed=0) -> tuple[float, list]:
    async def main():
        coros = [run_trajectory(LatencyEnv(q, tool_turns, latency), backend, fmt, SamplingParams(1.0), limits,
                                TrajectoryMeta(f"q{gi}", str(gi), si), seed=seed * 1000 + gi * 100 + si,
                                key=(gi, si))
                 for gi, q in enumerate(questions) for si in range(samples)]
        return await asyncio.gather(*coros)
    t0 = time.perf_counter()
    trajs = asyncio.run(main())
    return time.perf_counter() - t0, trajs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.2, help="tool latency in seconds")
    ap.add_argument("--tool-turns", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens-per-turn", type=int, default=64)
    ap.add_argument("--verbose", action="store_true", help="also print prefill/decode time per run")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per setting, each with other seeds (mean time and tokens per run are reported)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    path = loading.materialize(loading.resolve(DEFAULT_MODEL))
    tok = loading.load_tokenizer(path)
    fmt = load_chat_format(tok)
    dtype = loading.resolve_dtype("auto", "cpu")
    model = loading.load_causal_lm(path, dtype, "tirl_gqa", "cpu")
    task = ArithmeticTask()
    questions = [task.train_problem(i).question for i in range(args.prompts)]
    n = args.prompts * args.samples
    print(f"{DEFAULT_MODEL} ({str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads), "
          f"{n} trajectories, tool latency {args.latency * 1000:.0f} ms, <= {args.tokens_per_turn} tokens per turn")
    print(f"{'tool turns':>10} {'sync s':>8} {'async s':>8} {'sync/async':>10} {'pure gen s':>10} "
          f"{'async - pure':>12} {'tool time':>9} {'tokens':>7} {'sync+kept s':>16} {'async, no kept s':>16}")
    for k in args.tool_turns:
        limits = TurnLimits(max_turns=k + 1, max_new_tokens_per_turn=args.tokens_per_turn,
                            max_new_tokens=args.tokens_per_turn * (k + 1), max_context=2048)
        times, tokens, calls = {}, {}, {}
        for mode, scheduling, keep, latency in (("sync", "sync", False, args.latency),
                                                ("sync+kept", "sync", True, args.latency),
                                                ("fresh", "async", False, args.latency),
                                                ("async", "async", True, args.latency), ("pure", "async", True, 0.0)):
            backend = HFBackend(model, tok, [fmt.eos_token_id], 2048, max_batch_size=128, scheduling=scheduling,
                                keep_kv=keep)
            total, trajs = 0.0, []
            for seed in range(args.repeats):
                snap = backend.metrics_snapshot()
                seconds, run = rollout(backend, fmt, questions, args.samples, k, latency, limits, seed=seed)
                total, trajs = total + seconds, trajs + run
                if args.verbose:
                    m = backend.metrics_since(snap)
                    print(f"    {mode}: {seconds:.1f}s, prefill {m['time/prefill_s']:.1f}s "
                          f"({m['gen/prefill_tokens']:.0f} tokens, {m['gen/batches']:.0f} batches), decode "
                          f"{m['time/decode_s']:.1f}s ({m['gen/decode_steps']:.0f} steps)")
            backend.close()
            times[mode], tokens[mode] = total / args.repeats, sum(t.num_sampled_tokens for t in trajs) // args.repeats
            calls[mode] = sum(len(t.turns) - 1 for t in trajs) // args.repeats
        hidden = 1 - (times["async"] - times["pure"]) / (k * args.latency) if args.latency else 1.0
        print(f"{k:>10} {times['sync']:>8.1f} {times['async']:>8.1f} {times['sync'] / times['async']:>9.2f}x "
              f"{times['pure']:>10.1f} {times['async'] - times['pure']:>11.1f}s {k * args.latency:>8.1f}s "
              f"{tokens['async']:>7} {times['sync+kept']:>7.1f} ({times['sync'] / times['sync+kept']:.2f}x) "
              f"{times['fresh']:>7.1f} ({times['sync'] / times['fresh']:.2f}x)")
        print(f"{'':>10} tokens sampled: " + ", ".join(f"{m} {tokens[m]}" for m in tokens) + "; "
              f"tool calls: " + ", ".join(f"{m} {calls[m]}" for m in calls) + f" (of {n * k}); "
              f"share of one trajectory's tool time hidden by async: {hidden:.0%}")


if __name__ == "__main__":
    main()
