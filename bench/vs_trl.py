"""tirl vs TRL's GRPOTrainer: RL step time, tokens per second and peak memory, side by side on this machine.

    python bench/vs_trl.py [--steps 6] [--quick] [--prompts 4] [--group-size 8] [--max-tokens 128] ...

Needs TRL (`pip install 'tirl[bench]'`). Runs, one after the other, each in its own subprocess (so each
peak RSS is its own):

- tirl: `python -m tirl.cli train` with RL only (no SFT, no evaluations), read from its metrics.jsonl;
- TRL: `GRPOTrainer` with its tool support (`tools=[calculator]`), timed by a subclass and a callback.

Both get the same settings:

- starting point: tirl's SFT cold start of the model (`tirl sft` at its defaults, run once first, not
  timed; the default recipe's RL starts there too), so that the model calls the calculator and rewards
  vary within groups; `--no-sft` starts both from the raw model (which rarely calls a tool; every reward
  is then 0, and tirl skips the whole update, see below);
- model: the default (`embedded:SmolLM2-135M-Instruct`, or `--model`), the same local transformers
  directory, weights in `--dtype` (float32 by default; bfloat16 loads bf16 weights on both, no autocast);
- task: `arithmetic` train problems (system prompt with tools + question), the `calculator` tool (tirl's
  exact evaluator; for TRL a plain function with the same name, description and argument description, so
  its schema line in the prompt differs from tirl's only by `"additionalProperties": false` and key order),
  the `arithmetic` reward (1 for the right number in <answer>...</answer>, 0.1 for a well-formed one);
- batch: `--prompts` x `--group-size` (tirl: rollout.prompts_per_step x rollout.group_size; TRL:
  num_generations = group size, per-device batch = group size (tirl's default micro-batch), gradient
  accumulation = prompts, so one optimizer step per generated batch in both);
- limits: `--max-tokens` sampled tokens per trajectory, `--max-turns` assistant turns (at most
  max-turns - 1 rounds of tool calls);
- learning: AdamW at `--lr` (constant, no warm-up, grad-norm clip 1.0), GRPO advantages (group mean and
  std), the clipped surrogate averaged over all tokens of the batch (tirl: algorithm.aggregation=token-mean;
  TRL: loss_type="dapo"), no KL (TRL: beta=0), one epoch, no gradient checkpointing; the same seed and
  torch threads; `--lora R`: LoRA adapters of rank R (alpha 2R, every linear layer, no dropout) in both
  (TRL: peft_config), the base weights frozen.

Where the comparison cannot be exact (read the numbers with these in mind):

- Chat template. SmolLM2's own template renders no tools, so TRL refuses tools with it ("The provided chat
  template does not support tool calling", `trl/trainer/grpo_trainer.py`, `supports_tool_calling` in
  `trl/chat_template_utils.py`), and `add_response_schema` knows no parser for it. tirl uses its built-in
  `chatml-tools` template for such models; TRL is given the same template (`tokenizer.chat_template`) and
  TRL's own Qwen3 `response_template` (which parses the same `<tool_call>{json}</tool_call>` calls), so
  both models see identical prompts and tool turns.
- Token limits. tirl counts `--max-tokens` over the sampled tokens only (and per turn:
  rollout.max_new_tokens_per_turn is set to the same value); TRL's max_completion_length also counts
  the tool-result tokens inserted between turns.
- Turn ends. tirl stops a turn at `</tool_call>` (a stop string). TRL's transformers generation has no
  stop strings (GenerationConfig.stop_strings needs the tokenizer passed to `generate`, which TRL does not
  do, and its completion mask ends only at an EOS id), so a TRL turn runs to `<|im_end|>` or the token
  limit. The cold-started model, used to being stopped there, often keeps writing after its call under
  TRL: those tokens are sampled and trained on, and if the tool result no longer fits in
  max_completion_length TRL drops it (the call still runs).
- tirl skips the forward/backward of rows whose advantage is zero everywhere (whole groups with equal
  rewards); TRL computes them.
- TRL also runs one forward per step for `entropy`/clip metrics it logs; that is part of its update time.

Printed per framework: median over the steps after the first of wall time per step, split into
generation (TRL: its `_generate_single_turn` calls; tirl: prefill + decode of its engine), tool execution
(sum of the call latencies; tirl runs tools while other rows decode, so its share may overlap generation),
and update (step minus rollout: log-probs, backward, optimizer); generated tokens per second of step
time; peak RSS of the subprocess; then the ratios tirl/TRL. `--quick` shrinks everything so the whole
script runs in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = {"steps": 2, "prompts": 2, "group_size": 4, "max_tokens": 48, "max_turns": 2}
COLUMNS = ("step_s", "rollout_s", "gen_s", "tool_s", "update_s", "gen_tokens", "reward")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings; `--quick` replaces the sizes with QUICK's (explicit flags are then ignored)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="RL steps (optimizer steps) per framework")
    p.add_argument("--quick", action="store_true", help=f"tiny settings: {QUICK}")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="sampled tokens per trajectory")
    p.add_argument("--max-turns", type=int, default=3, help="assistant turns per trajectory")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-sft", dest="sft", action="store_false",
                   help="start both from the raw model instead of tirl's SFT cold start of it")
    p.add_argument("--sft-examples", type=int, help="examples of the cold start (default: tirl's sft.examples)")
    p.add_argument("--only", choices=("tirl", "trl"), help="run one framework only")
    p.add_argument("--lora", type=int, metavar="R", help="train LoRA adapters of rank R (alpha 2R, all linear "
                                                          "layers, no dropout) instead of every weight")
    p.add_argument("--workdir", type=Path, help="keep the runs and their logs here (default: a temporary directory)")
    p.add_argument("--trl-worker", metavar="SETTINGS_JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for name in ("steps", "prompts", "max_tokens", "max_turns"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.group_size < 2:
        p.error(f"--group-size must be at least 2 (GRPO compares samples of one prompt), got {args.group_size}")
    return args


def run_child(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run `cmd` to completion with its output in `log`: (wall seconds, peak RSS in MiB of that process tree's
    largest process). Raises SystemExit with the log's tail when it fails."""
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): take the child down too
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------- tirl


def tirl_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """`tirl train` with RL only and the shared settings."""
    overrides = {
        "pipeline.eval_before": "false", "pipeline.sft": "false", "pipeline.eval_after_sft": "false",
        "pipeline.eval_after": "false", "rl.steps": args.steps, "rl.save_every": args.steps,
        "rl.save_trajectories": "false", "run.tensorboard": "false", "run.dir": run_dir,
        "run.seed": args.seed, "run.threads": args.threads, "run.device": "cpu",
        "model.name": args.model, "model.dtype": args.dtype, "model.chat_template": "chatml-tools",
        "task.name": "arithmetic", "rollout.prompts_per_step": args.prompts,
        "rollout.group_size": args.group_size, "rollout.max_new_tokens": args.max_tokens,
        "rollout.max_new_tokens_per_turn": args.max_tokens, "rollout.max_turns": args.max_turns,
        "rollout.max_tool_calls": args.max_turns - 1, "rollout.temperature": 1.0, "rollout.top_p": 1.0,
        "rl.optim.lr": args.lr, "rl.optim.warmup_steps": 0, "rl.optim.schedule": "constant",
        "rl.optim.max_grad_norm": 1.0, "algorithm.advantage": "grpo", "algorithm.loss": "ppo_clip",
        "algorithm.aggregation": "token-mean", "algorithm.kl_coef": 0.0, "algorithm.epochs": 1,
        "algorithm.minibatches": 1,
    }
    if args.lora:
        overrides.update({"model.lora.enabled": "true", "model.lora.r": args.lora, "model.lora.alpha": 2 * args.lora,
                          "model.lora.dropout": 0.0, "model.lora.target_modules": "all-linear"})
    return [sys.executable, "-m", "tirl.cli", "train", *(f"{k}={v}" for k, v in overrides.items())]


def tirl_step_row(metrics: dict) -> dict[str, float]:
    """One tirl RL metrics row in this script's columns (tool time: the sum of all call latencies)."""
    tool_s = sum(metrics[k] * metrics.get(k.replace("/calls", "/latency_mean_s").replace("tool/", "time/tool/", 1), 0.0)
                 for k in metrics if k.startswith("tool/") and k.endswith("/calls"))
    return {"step_s": metrics["time/step_s"], "rollout_s": metrics["time/rollout_s"],
            "gen_s": metrics.get("time/prefill_s", 0.0) + metrics.get("time/decode_s", 0.0), "tool_s": tool_s,
            "update_s": metrics["time/update_s"], "gen_tokens": metrics.get("gen/tokens", 0.0),
            "reward": metrics.get("reward/mean", 0.0), "tool_calls": metrics.get("tool_calls/mean", 0.0)}


def cold_start(args: argparse.Namespace, root: Path) -> str:
    """Run tirl's SFT cold start (`tirl sft`, its defaults) on `args.model`; the trained model's directory."""
    run_dir = root / "sft_run"
    cmd = [sys.executable, "-m", "tirl.cli", "sft", f"model.name={args.model}", f"model.dtype={args.dtype}",
           "model.chat_template=chatml-tools", f"run.dir={run_dir}", f"run.seed={args.seed}",
           f"run.threads={args.threads}", "run.device=cpu", "run.tensorboard=false"]
    if args.sft_examples:
        cmd.append(f"sft.examples={args.sft_examples}")
    wall, _ = run_child(cmd, root, root / "sft.log")
    print(f"cold start: tirl sft in {wall:.0f} s -> both frameworks start from its model", flush=True)
    return str(run_dir / "models" / "sft")


def run_tirl(args: argparse.Namespace, root: Path) -> dict:
    """Train with tirl in a subprocess; its per-step rows, wall time and peak RSS."""
    run_dir = root / "tirl_run"
    wall, rss = run_child(tirl_command(args, run_dir), root, root / "tirl.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rl = sorted((r for r in rows if r.get("stage") == "rl" and "time/step_s" in r), key=lambda r: r["step"])
    if len(rl) != args.steps:
        raise SystemExit(f"tirl logged {len(rl)} RL steps, expected {args.steps}; see {root / 'tirl.log'}")
    return {"steps": [tirl_step_row(r) for r in rl], "wall_s": wall, "peak_rss_mib": rss}


# ----------------------------------------------------------------------------------------------- TRL


def run_trl(args: argparse.Namespace, root: Path) -> dict:
    """Train with TRL in a subprocess (this script in worker mode); its per-step rows, wall time, peak RSS."""
    settings = root / "trl_settings.json"
    result = root / "trl_steps.json"
    settings.write_text(json.dumps({**vars(args), "workdir": None, "out": str(result),
                                    "output_dir": str(root / "trl_out")}))
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true"}
    wall, rss = run_child([sys.executable, __file__, "--trl-worker", str(settings)], root, root / "trl.log", env)
    steps = json.loads(result.read_text())
    if len(steps) != args.steps:
        raise SystemExit(f"TRL logged {len(steps)} steps, expected {args.steps}; see {root / 'trl.log'}")
    return {"steps": steps, "wall_s": wall, "peak_rss_mib": rss}


class StepClock:
    """Time and token counters of the TRL run, reset at every optimizer step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.reset()
        self.t_step = time.perf_counter()

    def reset(self) -> None:
        self.current = {"rollout_s": 0.0, "gen_s": 0.0, "tool_s": 0.0, "gen_tokens": 0.0, "rewards": [],
                        "tool_calls": 0.0}

    def end_step(self) -> None:
        """Close the current step: its wall time since the previous one, update = step - rollout."""
        now = time.perf_counter()
        c = self.current
        step_s = now - self.t_step
        rewards = c.pop("rewards")
        trajectories = max(len(rewards), 1)
        self.rows.append({**c, "step_s": step_s, "update_s": step_s - c["rollout_s"],
                          "reward": sum(rewards) / trajectories, "tool_calls": c["tool_calls"] / trajectories})
        self.t_step = now
        self.reset()


def trl_calculator(clock: StepClock):
    """The calculator as a TRL tool: tirl's evaluator, the same name, description and parameter schema."""
    from tirl.tools.calculator import evaluate

    def calculator(expression: str):
        """Evaluate an arithmetic expression exactly.

        Args:
            expression: The expression to evaluate, written with numbers, + - * / // % ** and parentheses.
        """
        t0 = time.perf_counter()
        try:
            return evaluate(expression)
        finally:
            clock.current["tool_s"] += time.perf_counter() - t0
            clock.current["tool_calls"] += 1

    return calculator


def trl_reward(clock: StepClock):
    """tirl's `arithmetic` reward on TRL completions: the final assistant message (one without tool calls)."""
    from tirl.rewards.answer import FORMAT_BONUS, answers_match, extract_answer, parse_number

    def arithmetic(completions, answer, **_) -> list[float]:
        scores = []
        for messages, gold in zip(completions, answer, strict=True):
            last = messages[-1] if messages else {}
            text = last.get("content") if last.get("role") == "assistant" and not last.get("tool_calls") else None
            extracted = extract_answer(text) if text is not None else None
            score = (1.0 if answers_match(extracted, gold) else 0.0) + (
                FORMAT_BONUS if extracted is not None and parse_number(extracted) is not None else 0.0)
            scores.append(score)
        clock.current["rewards"].extend(scores)
        return scores

    return arithmetic


def trl_dataset(settings: dict):
    """The arithmetic train stream as a TRL conversational dataset (prompt messages + gold answer)."""
    from datasets import Dataset

    from tirl.tasks import TASKS

    task = TASKS.get("arithmetic")(seed=settings["seed"])
    system = task.system_prompt(with_tools=True)
    problems = [task.train_problem(i) for i in range(settings["steps"] * settings["prompts"])]
    return Dataset.from_list([{"prompt": [{"role": "system", "content": system},
                                          {"role": "user", "content": p.question}], "answer": p.answer}
                              for p in problems])


def timed_trainer_class(clock: StepClock):
    """GRPOTrainer with its rollout and each generation call timed into `clock`."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, *a, **kw):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            clock.current["rollout_s"] += time.perf_counter() - t0
            return out

        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            ids, logprobs = super()._generate_single_turn(*a, **kw)
            clock.current["gen_s"] += time.perf_counter() - t0
            clock.current["gen_tokens"] += sum(len(x) for x in ids)
            return ids, logprobs

    return TimedGRPOTrainer


def trl_config(settings: dict):
    """GRPOConfig with the shared settings (see the module docstring)."""
    import torch
    from trl import GRPOConfig

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[settings["dtype"]]
    return GRPOConfig(
        output_dir=settings["output_dir"], max_steps=settings["steps"], seed=settings["seed"], use_cpu=True,
        per_device_train_batch_size=settings["group_size"], gradient_accumulation_steps=settings["prompts"],
        steps_per_generation=settings["prompts"], num_generations=settings["group_size"], num_iterations=1,
        max_completion_length=settings["max_tokens"], max_tool_calling_iterations=settings["max_turns"] - 1,
        temperature=1.0, top_p=1.0, learning_rate=settings["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch", beta=0.0, loss_type="dapo", scale_rewards="group", gradient_checkpointing=False,
        bf16=False, fp16=False, model_init_kwargs={"dtype": dtype}, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, log_completions=False)


def trl_lora(rank: int | None):
    """peft's LoraConfig with tirl's `--lora` settings, or None (full fine-tuning)."""
    if not rank:
        return None
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def trl_tokenizer(model_dir: str):
    """The model's tokenizer with tirl's chatml-tools template and TRL's parser for its tool calls."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import qwen3_template

    from tirl.chat.format import builtin_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = builtin_template("chatml-tools")
    tokenizer.response_template = qwen3_template  # <tool_call>{json}</tool_call> ... <|im_end|>
    return tokenizer


def trl_worker(settings_path: str) -> int:
    """Worker mode: train with TRL and write the per-step rows to settings["out"]."""
    import torch
    from transformers import TrainerCallback

    from tirl.models.loading import materialize, resolve

    settings = json.loads(Path(settings_path).read_text())
    torch.set_num_threads(settings["threads"])
    model_dir = str(materialize(resolve(settings["model"])))
    clock = StepClock()

    class StepEnd(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.t_step = time.perf_counter()

        def on_step_end(self, *_, **__):
            clock.end_step()

    trainer = timed_trainer_class(clock)(
        model=model_dir, reward_funcs=[trl_reward(clock)], args=trl_config(settings),
        train_dataset=trl_dataset(settings), processing_class=trl_tokenizer(model_dir),
        tools=[trl_calculator(clock)], callbacks=[StepEnd()], peft_config=trl_lora(settings["lora"]))
    trainer.train()
    Path(settings["out"]).write_text(json.dumps(clock.rows))
    return 0


# ------------------------------------------------------------------------------------------- report


def medians(steps: list[dict]) -> dict[str, float]:
    """Medians of COLUMNS over the steps after the first (all steps when there is only one)."""
    steady = steps[1:] or steps
    return {k: statistics.median(s.get(k, 0.0) for s in steady) for k in (*COLUMNS, "tool_calls")}


def report(results: dict[str, dict]) -> str:
    """The comparison table and, with both frameworks, the tirl/TRL ratios."""
    head = (f"{'framework':<10} {'step s':>7} {'rollout s':>9} {'gen s':>7} {'tool ms':>7} {'update s':>8} "
            f"{'gen tok':>8} {'tok/s':>7} {'calls/traj':>10} {'reward':>7} {'peak RSS MiB':>12} {'run s':>7}")
    lines = [head]
    summary = {}
    for name, res in results.items():
        m = medians(res["steps"])
        m["tok_s"] = m["gen_tokens"] / m["step_s"] if m["step_s"] else 0.0
        summary[name] = {**m, "peak_rss_mib": res["peak_rss_mib"]}
        lines.append(f"{name:<10} {m['step_s']:>7.2f} {m['rollout_s']:>9.2f} {m['gen_s']:>7.2f} "
                     f"{1000 * m['tool_s']:>7.1f} {m['update_s']:>8.2f} {m['gen_tokens']:>8.0f} {m['tok_s']:>7.1f} "
                     f"{m['tool_calls']:>10.2f} {m['reward']:>7.3f} {res['peak_rss_mib']:>12.0f} {res['wall_s']:>7.1f}")
    if {"tirl", "TRL"} <= summary.keys():
        a, b = summary["tirl"], summary["TRL"]
        lines.append(f"tirl/TRL: step time {a['step_s'] / b['step_s']:.2f} (steps per second "
                     f"{b['step_s'] / a['step_s']:.2f}x), generation {a['gen_s'] / b['gen_s']:.2f}, "
                     f"update {a['update_s'] / b['update_s']:.2f}, tokens/s {a['tok_s'] / b['tok_s']:.2f}, "
                     f"peak RSS {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}")
    return "\n".join(lines)


def check_trl_installed() -> None:
    """Fail early, with the install command, when TRL is missing."""
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: pip install 'tirl[bench]'") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    if args.only != "tirl":
        check_trl_installed()
    lora = f", LoRA r{args.lora}" if args.lora else ""
    print(f"model {args.model} ({args.dtype}{lora}), {args.prompts} prompts x {args.group_size} samples, "
          f"<= {args.max_tokens} sampled tokens and {args.max_turns} turns per trajectory, lr {args.lr}, "
          f"{args.steps} steps, {args.threads} threads; medians over steps 2..{args.steps}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tirl-vs-trl-") as tmp:
        root = Path(tmp) if args.workdir is None else args.workdir.resolve()
        root.mkdir(parents=True, exist_ok=True)
        if args.sft:
            args.model = cold_start(args, root)
        if args.only != "trl":
            results["tirl"] = run_tirl(args, root)
        if args.only != "tirl":
            results["TRL"] = run_trl(args, root)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
