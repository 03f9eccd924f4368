"""The training sections of the config: run, model, task, rollout, algorithm, RL, SFT, evaluation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tirl.config.base import _Section
from tirl.models.embedded import DEFAULT_MODEL


class RunConfig(_Section):
    name: str = Field("default", description="Run name; the run directory defaults to runs/<name>.")
    dir: str | None = Field(None, description="Run directory (default: runs/<name>). Re-running resumes it.")
    seed: int = Field(0, description="Fixes data order, sampling and initialisation.")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores).")
    tensorboard: bool = Field(True, description="Also write TensorBoard events.")


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class ModelConfig(_Section):
    name: str = Field(DEFAULT_MODEL, description="embedded:<name>, a local directory, or a Hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype (autocast for training, weights for generation). auto: bfloat16 "
                            "where the CPU/GPU runs it natively, else float32.")
    attn_implementation: str = Field("auto", description="auto: tirl_gqa (copy-free eager) on CPU, sdpa on GPU.")
    chat_template: str = Field("auto", description="auto, model, chatml-tools, or a .jinja path.")
    max_context: int | None = Field(None, ge=16, description="Cap on prompt+response tokens.")
    lora: LoraConfig = LoraConfig()


class TaskConfig(_Section):
    name: str = Field("arithmetic", description="Task name (see `tirl envs`) or module:attr.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to the task's constructor.")
    tools: list[str] | None = Field(None, description="Tool names (default: the task's own).")
    reward: str | None = Field(None, description="Reward name (see `tirl algos`) or module:attr (default: the "
                                                 "task's own).")
    reward_kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "Parameters of the reward (checked against its signature). Rewards built from other rewards take "
        "specs: a name, 'task' (the task's own reward), or {name, kwargs}."))


class TreeConfig(_Section):
    """PORTool tree rollouts (reference 4.1): rollout.group_size leaves per tree."""

    branch_factor: int = Field(2, ge=1, description="f: candidate children proposed per unfinished node.")
    max_depth: int | None = Field(None, ge=1, description="T_max: tree depth in turns (default: rollout.max_turns).")


class FissionConfig(_Section):
    """Fission-GRPO (reference 4.2): recovery groups seeded from trajectories whose tool call failed."""

    group_size: int | None = Field(None, ge=2, description="G': recovery rollouts per failed prefix "
                                                           "(default: rollout.group_size).")
    max_groups: int | None = Field(None, ge=1, description="Recovery groups per step, newest errors first "
                                                           "(default: rollout.prompts_per_step).")
    statuses: list[Literal["invalid_call", "unknown_tool", "validation_error", "execution_error", "timeout"]] = Field(
        ["execution_error", "timeout", "validation_error"], min_length=1, description=(
            "Tool result statuses that count as a tool execution error (validation_error: invalid arguments; "
            "invalid_call: unparseable call)."))
    buffer_size: int | None = Field(None, ge=1, description="LIFO buffer of failed prefixes (default: max_groups).")
    judge: Literal["none", "policy", "server"] = Field("none", description=(
        "Feedback after the failed call: none (the tool's error message); policy (the policy also writes a "
        "short diagnosis of the call, appended to the error); server (a judge model on an OpenAI-compatible "
        "server writes it: judge_base_url, judge_model). A diagnosis that contains the answer is discarded."))
    judge_max_tokens: int = Field(64, ge=1, description="Tokens of a judge's diagnosis at most.")
    judge_base_url: str | None = Field(None, description="judge=server: the server's /v1 URL.")
    judge_model: str | None = Field(None, description="judge=server: the model name (default: the one it serves).")
    judge_api_key_env: str = Field("OPENAI_API_KEY", description="judge=server: environment variable with the key.")

    @model_validator(mode="after")
    def _judge_server(self) -> FissionConfig:
        if self.judge == "server" and not self.judge_base_url:
            raise ValueError("judge=server needs judge_base_url (the judge server's /v1 URL)")
        if self.judge != "server" and (self.judge_base_url or self.judge_model):
            raise ValueError(f"judge_base_url/judge_model are set but judge={self.judge}; set judge=server")
        return self


class EntropyBranchConfig(_Section):
    """ARPO/AEPO entropy-guided branching (reference 4.5): rollout.group_size leaves per prompt in all."""

    initial: int | None = Field(None, ge=1, description="Independent samples started per prompt (ARPO: a fixed "
                                                        "number, e.g. G/2). Set, it replaces pre-monitoring; None: "
                                                        "AEPO pre-monitoring, m = round(G*sigmoid(beta*(H_root - "
                                                        "H_tool))).")
    branch_factor: int = Field(2, ge=2, description="Z: children of a node that branches (the path's own "
                                                    "continuation and Z-1 forks; ARPO's beam_size).")
    probe_tokens: int = Field(10, ge=1, description="Tokens after a tool result whose mean entropy is compared "
                                                    "with the entropy at the start of the answer.")
    alpha: float = Field(0.5, description="Base branching score.")
    beta: float = Field(0.2, description="Pre-monitoring weight: initial samples m = round(G*sigmoid(beta*(H_root "
                                         "- H_tool))).")
    gamma: float = Field(0.2, description="Weight of the normalised entropy change dH in the branching score "
                                          "(ARPO's entropy_weight).")
    penalty: float = Field(0.2, ge=0.0, description="Consecutive-branch penalty step: P(l) = min(penalty*l, 1) "
                                                    "after l branchings in a row on a path.")
    threshold: float = Field(0.5, description="Branch when (alpha + gamma*dH)*(1 - P(l)) exceeds this.")


class DynamicSamplingConfig(_Section):
    """DAPO dynamic sampling (reference 2.5): train only on groups whose rewards differ."""

    enabled: bool = False
    metric: Literal["reward", "correct"] = Field("reward", description="What must vary within a group.")
    max_batches: int = Field(10, ge=1, description="Generation batches per step before giving up with an error.")


class RolloutConfig(_Section):
    group_size: int = Field(8, ge=1, description="G: samples per prompt.")
    prompts_per_step: int = Field(4, ge=1, description="Prompts (groups) per RL step.")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_turns: int = Field(3, ge=1)
    max_tool_calls: int = Field(3, ge=0)
    max_new_tokens_per_turn: int = Field(48, ge=1)
    max_new_tokens: int = Field(128, ge=1, description="Sampled tokens per trajectory, all turns.")
    tool_timeout_s: float = Field(10.0, gt=0)
    max_tool_output_chars: int = Field(1000, ge=16)
    tool_fault_rate: float = Field(0.0, ge=0.0, le=1.0, description=(
        "Share of valid tool calls that fail with an injected 'service unavailable' error instead of running "
        "(error-recovery experiments; evaluation too). Each trajectory draws from its own seeded generator."))
    max_batch_size: int = Field(128, ge=1, description="Generation batch size (hf backend).")
    stall_timeout_s: float = Field(600.0, gt=0, description="Abort a rollout after this long without progress, "
                                                           "with a report of which trajectories are stuck where.")
    check_invariants: bool = Field(True, description="Token-in/token-out checks on every trajectory.")
    timeout_s: float | None = Field(None, gt=0, description="Wall-clock budget per trajectory (checked between turns).")
    step_timeout_s: float | None = Field(None, gt=0, description="Wall-clock budget of a step's rollout: no new "
                                                                 "turn starts after it (trajectories end with timeout).")
    observation_truncation: Literal["head", "tail", "middle"] = Field(
        "middle", description="Which part of a tool output to keep when it must be cut to fit the context.")
    max_failed_fraction: float = Field(0.1, ge=0, le=1, description="A step in which more trajectories than this "
                                                                    "share raise stops the run, showing the errors.")
    strategy: str = Field("flat", description="flat, tree (PORTool), fission (Fission-GRPO), entropy_branch "
                                              "(ARPO/AEPO), or module:attr; settings in rollout.<strategy>.")
    tree: TreeConfig = TreeConfig()
    fission: FissionConfig = FissionConfig()
    entropy_branch: EntropyBranchConfig = EntropyBranchConfig()
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()


class CriticConfig(_Section):
    """PPO critic (reference 1.3, 2.4): a scalar value head (a linear layer) on the policy's final hidden
    states (shared trunk), trained with the clipped value loss."""

    enabled: Literal["auto"] | bool = Field("auto", description=(
        "auto: on when the advantage estimator needs values (gae); true: on for any estimator (it gets "
        "AdvantageInput.values); false: off (an error with an estimator that needs values)."))
    coef: float = Field(0.1, gt=0, description="Weight of the critic loss in the total loss (its gradient also "
                                               "reaches the shared trunk).")
    lr: float | None = Field(None, gt=0, description="Learning rate of the value head (default: 5x rl.optim.lr; "
                                                     "same schedule). The trunk learns at rl.optim.lr.")
    clip: float | None = Field(0.5, gt=0, description="cliprange_value: the loss also scores V clipped to V_old "
                                                      "+- clip and takes the larger (None: no clipping).")
    warmup_steps: int = Field(0, ge=0, description="First RL steps that train only the value head (trunk "
                                                   "detached; the policy is not updated).")


class ReplayConfig(_Section):
    """SPEAR self-imitation replay (reference 4.3): good past trajectories trained on again, with a
    recalibrated advantage and a cosine warm-up of their weight."""

    enabled: bool = False
    threshold: float = Field(1.0, description="Store on-policy trajectories whose advantage (mean over their "
                                              "trained tokens) exceeds this (SPEAR: 1).")
    size: int = Field(2048, ge=1, description="Capacity; the oldest entries go first (FIFO).")
    tolerate_steps: int = Field(10, ge=0, description="Drop entries stored more than this many policy versions "
                                                      "(RL steps) ago.")
    reward_window: int = Field(10240, ge=1, description="D_R: the last N on-policy rewards; a replayed row gets "
                                                        "A = R - P50(D_R) and is used only when A > 0.")
    batch_size: int | None = Field(None, ge=1, description="Entries sampled per step (default: the on-policy "
                                                           "batch size).")
    coef: float = Field(1.0, gt=0, description="beta(s) = coef * (1 - cos(pi s / warmup_steps)) / 2, then coef: "
                                               "the replay loss weight.")
    warmup_steps: int = Field(200, ge=0, description="T of the cosine warm-up of beta (SPEAR: 100-300; 0: coef "
                                                     "from the start).")


class InfoGainConfig(_Section):
    """IGPO information-gain turn rewards (reference 4.4): before each turn the policy is teacher-forced on
    the gold answer; a non-final turn earns the rise in its probability, the last turn the outcome reward.
    Pair with algorithm.advantage=igpo (turn rewards normalised within the group, summed over later turns)."""

    enabled: bool = False
    log_space: bool = Field(False, description="Gains of log-probabilities instead of probabilities.")


class AlgorithmConfig(_Section):
    advantage: str = Field("grpo", description="Advantage estimator (see `tirl algos`).")
    advantage_kwargs: dict[str, Any] = Field(default_factory=dict)
    loss: str = Field("ppo_clip", description="Policy loss (see `tirl algos`).")
    loss_kwargs: dict[str, Any] = Field(default_factory=dict)
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                         "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = Field(0.0, ge=0.0, description="KL-to-reference weight (0: no reference model).")
    kl_estimator: str = Field("k3", description="k1, k2, k3, abs, with optional '+' (straight-through).")
    kl_placement: Literal["loss", "reward"] = Field("loss", description=(
        "loss: kl_coef * agg(KL(pi || ref)) is added to the loss (GRPO); reward: r_t -= kl_coef * "
        "KL(old || ref)_t on every sampled token before the advantage estimator (PPO, REINFORCE++; "
        "kl_estimator=k1 gives old_logp - ref_logp)."))
    reference: Literal["auto", "copy", "lora_base"] = Field("auto", description=(
        "The KL reference: copy (a frozen copy of the starting weights), lora_base (the policy with its LoRA "
        "adapter switched off: no second model), auto (lora_base when model.lora.enabled, else copy)."))
    entropy_coef: float = Field(0.0, description="Entropy bonus weight (0: entropy only logged).")
    epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    minibatches: int = Field(1, ge=1, description="Optimizer steps per pass.")
    critic: CriticConfig = CriticConfig()
    replay: ReplayConfig = ReplayConfig()
    info_gain: InfoGainConfig = InfoGainConfig()

    @model_validator(mode="after")
    def _no_idle_keys(self) -> AlgorithmConfig:
        if not self.info_gain.enabled and self.info_gain != InfoGainConfig():
            raise ValueError("algorithm.info_gain.* has no effect unless algorithm.info_gain.enabled=true")
        if self.kl_coef == 0:
            for key, default in (("kl_placement", "loss"), ("reference", "auto")):
                if getattr(self, key) != default:
                    raise ValueError(f"algorithm.{key} has no effect while algorithm.kl_coef is 0")
        if not self.replay.enabled and self.replay != ReplayConfig():
            raise ValueError("algorithm.replay.* has no effect unless algorithm.replay.enabled=true")
        if self.critic.enabled is False and self.critic != CriticConfig(enabled=False):
            raise ValueError("algorithm.critic.* has no effect while algorithm.critic.enabled=false")
        return self


class OptimConfig(_Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float | None = Field(1.0, gt=0)


class RLConfig(_Section):
    steps: int = Field(24, ge=1)
    optim: OptimConfig = OptimConfig(lr=3e-5)
    micro_batch_size: int | None = Field(None, ge=1, description="Rows per forward (default: group size).")
    save_every: int = Field(5, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(1, ge=1)
    save_trajectories: bool = True
    max_staleness: int = Field(0, ge=0, description=(
        "0: synchronous (each rollout uses the newest weights). k >= 1: asynchronous: step s samples with the "
        "weights after update s-k while the trainer runs the updates in between (tirl.trainer.async_rl), "
        "with importance weights against the sampling log-probs."))
    is_cap: float | None = Field(2.0, gt=0, description=(
        "Asynchronous mode: truncation C of each token's importance weight min(pi_old / pi_sample, C) "
        "(null: untruncated)."))
    max_sampled_tokens: int | None = Field(None, ge=1, description=(
        "Stop after the step at which the tokens generated so far (the backend's gen/tokens, summed over "
        "steps) reach this: compute-matched comparisons of rollout strategies. rl.steps stays the most steps "
        "(and sets the learning-rate schedule)."))

    @model_validator(mode="after")
    def _is_cap_needs_async(self) -> RLConfig:
        if self.max_staleness == 0 and self.is_cap != 2.0:
            raise ValueError("rl.is_cap has no effect unless rl.max_staleness >= 1")
        if self.max_staleness and self.max_sampled_tokens is not None:
            raise ValueError("rl.max_sampled_tokens needs synchronous RL (rl.max_staleness=0)")
        return self


ToolStatusName = Literal["invalid_call", "unknown_tool", "validation_error", "execution_error", "timeout",
                         "output_truncated", "budget_exceeded"]

MAE_ERROR_STRINGS = ("is not defined", "positional argument", "unexpected keyword", "ConnectionError",
                     "not supported", "Invalid API call", "Response error", "400 Client Error",
                     "slice indices must be integers or None or have an __index__ method")
"""TL-Training's MAE error strings (reference 5.4), less its data-set-specific ones and the bare 'error'
(which, matched on letters and digits only, would flag any output containing the word)."""


class SFTFilterConfig(_Section):
    """Rejection sampling (sft.source=rollouts): which trajectories, and which of their turns, are SFT data.

    Filters run in this order, each counted: drop_errored, drop_truncated, correct_only, min_reward, dedupe,
    mask_error_turns (a trajectory with nothing left to train on is dropped), max_per_problem."""

    correct_only: bool = Field(True, description="Keep only trajectories whose answer was right (correct=true; "
                                                 "ToRA/ET-Agent rejection sampling).")
    min_reward: float | None = Field(None, description="Keep only trajectories with reward >= this.")
    max_per_problem: int | None = Field(None, ge=1, description=(
        "At most this many trajectories per problem (task_id): highest reward first, then file order "
        "(ToRA keeps <= 4 valid per question)."))
    dedupe: bool = Field(True, description="Keep one of trajectories with identical prompt and response tokens.")
    drop_truncated: bool = Field(True, description="Drop trajectories that did not finish by answering (stop "
                                                   "reason max_tokens, max_turns, context_overflow, tool_budget, "
                                                   "timeout).")
    drop_errored: bool = Field(True, description="Drop trajectories whose environment failed (stop reason error).")
    mask_error_turns: bool = Field(False, description=(
        "TL-Training MAE: mask out (loss_mask 0) every assistant turn whose tool output is an error: a result "
        "with a status in error_statuses, or text containing one of error_strings. Later turns stay trained."))
    error_statuses: list[ToolStatusName] = Field(
        ["invalid_call", "unknown_tool", "validation_error", "execution_error", "timeout", "budget_exceeded"],
        description="mask_error_turns: tool result statuses that make a turn an error turn.")
    error_strings: list[str] = Field(list(MAE_ERROR_STRINGS), description=(
        "mask_error_turns: an output containing one of these is an error, whatever its status; compared on "
        "lower-cased letters and digits only, as TL-Training does."))

    @model_validator(mode="after")
    def _mae_keys(self) -> SFTFilterConfig:
        for key in ("error_statuses", "error_strings"):
            if getattr(self, key) != SFTFilterConfig.model_fields[key].get_default(call_default_factory=True) \
                    and not self.mask_error_turns:
                raise ValueError(f"{key} has no effect unless mask_error_turns=true")
        return self


class SFTConfig(_Section):
    source: Literal["task", "rollouts"] = Field("task", description=(
        "task: traces the task builds from its reference tool calls (sft.examples of them); rollouts: "
        "rejection-sampling SFT on trajectories from earlier runs (sft.rollouts, filtered by sft.filter), "
        "trained on their own tokens and loss masks, so tool output is never trained on."))
    examples: int = Field(48, ge=1, description="source=task: traces generated by the task (narrow on purpose).")
    rollouts: list[str] = Field(default_factory=list, description=(
        "source=rollouts: trajectory JSONL files, or globs of them (a run's trajectories/rl/step_*.jsonl, "
        "eval/*.jsonl), relative to the working directory. The model must share their tokenizer."))
    filter: SFTFilterConfig = Field(SFTFilterConfig(), description="source=rollouts: which trajectories are kept.")
    key_token_weighting: bool = Field(False, description=(
        "TL-Training PKT: weight the NLL of key tokens (the first token of a tool call and the tokens of its "
        "name) by min(N_other/N_key, max_key_weight), at least 1, per sequence; the loss is divided by the "
        "sum of weights."))
    max_key_weight: float = Field(9.0, ge=1.0, description="key_token_weighting: the largest key-token weight.")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)
    optim: OptimConfig = Field(OptimConfig(lr=3e-5, warmup_steps=2), description=(
        "A gentle cold start: it teaches the call format but leaves the policy enough entropy for RL to "
        "explore (lr 1e-4 drives the SFT loss to ~1e-3 and GRPO groups become all-right or all-wrong)."))
    save_every: int = Field(8, ge=1)
    keep_checkpoints: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _one_path(cls, data: Any) -> Any:
        """`sft.rollouts=path` (one path or glob) means `[path]`."""
        if isinstance(data, dict) and isinstance(data.get("rollouts"), str):
            return {**data, "rollouts": [data["rollouts"]]}
        return data

    @model_validator(mode="after")
    def _source_keys(self) -> SFTConfig:
        if self.source == "rollouts" and not self.rollouts:
            raise ValueError("source=rollouts needs rollouts: paths or globs of trajectory JSONL files")
        if self.source == "task" and (self.rollouts or self.filter != SFTFilterConfig()):
            raise ValueError("rollouts and filter.* have no effect unless source=rollouts")
        default = SFTConfig.model_fields
        if self.source == "rollouts" and self.examples != default["examples"].default:
            raise ValueError("examples has no effect with source=rollouts (the filtered trajectories are the data; "
                             "filter.max_per_problem limits them)")
        if self.max_key_weight != default["max_key_weight"].default and not self.key_token_weighting:
            raise ValueError("max_key_weight has no effect unless key_token_weighting=true")
        return self


class EvalConfig(_Section):
    size: int | None = Field(None, ge=1, description="Held-out problems used (default: the whole split).")
    samples: int = Field(1, ge=1, description="k samples per problem (pass@k for every k up to it).")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy.")
    no_tools: bool = Field(True, description="Also evaluate without tools (what tools bring).")
    concurrency: int | None = Field(None, ge=1, description=(
        "Trajectories in flight at once: the openai backend's requests in flight, the hf generation batch "
        "(default: backend.openai.max_concurrency, rollout.max_batch_size)."))
    bootstrap_resamples: int = Field(1000, ge=0, description="Bootstrap resamples of the problems for the "
                                                             "confidence intervals (0: no intervals).")
    ci_level: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    calibration_bins: int = Field(10, ge=1, description="Equal-width confidence bins of the ECE (where the "
                                                        "reward asks for a confidence).")

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> EvalConfig:
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"samples={self.samples} with temperature=0 gives {self.samples} identical greedy "
                             "samples (pass@k = pass@1); set a temperature > 0 (e.g. 1.0) or samples=1")
        if self.bootstrap_resamples == 0 and self.ci_level != 0.95:
            raise ValueError("ci_level has no effect while bootstrap_resamples=0 (no intervals)")
        return self


class PipelineConfig(_Section):
    eval_before: bool = Field(True, description="Evaluate the starting model.")
    sft: bool = Field(True, description="SFT cold start.")
    eval_after_sft: bool = True
    rl: bool = Field(True, description="RL (GRPO by default).")
    eval_after: bool = True
