"""Builders: turn a `Config` into the objects a stage needs (policy, backend, task, tools, envs, the KL
reference policy), and decide what the config implies (whether RL trains a critic).

Cheap checks run in `preflight` before any work starts, so a bad name or path in a recipe fails in
the first second with a message naming the key.
"""

from __future__ import annotations

import collections
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from tirl.algorithms import ADVANTAGES, KL_KINDS, POLICY_LOSSES
from tirl.algorithms.tree import TREE_ESTIMATORS
from tirl.backends.base import Generator, derive_seed
from tirl.backends.hf import HFBackend
from tirl.chat.format import ChatFormat, load_chat_format, template_supports_tools
from tirl.config import Config, ModelConfig, TaskConfig
from tirl.envs.base import Env
from tirl.envs.tool_env import ToolLimits
from tirl.errors import ConfigError, DataError
from tirl.models import loading
from tirl.registry import RegistryError
import tirl.rewards  # noqa: F401  (registers the built-in rewards)
from tirl.rewards.base import BoundReward, bind
from tirl.rollout.agent import TurnLimits
from tirl.tasks import TASKS
from tirl.tasks.base import Problem, Task
from tirl.tools import ToolSet, build_toolset, check_toolset
from tirl.trainer.reference import Reference


@dataclass
class Policy:
    """The model being trained, with what is needed to talk to it."""

    model: Any
    """Trainable transformers model (float32 master weights; peft-wrapped when LoRA is on)."""
    tokenizer: Any
    fmt: ChatFormat
    path: str
    """Where the weights were loaded from."""
    device: str
    compute_dtype: torch.dtype
    """Autocast dtype for training, weight dtype for generation."""
    attn_implementation: str


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={setting!r} but no CUDA device is available")
    return setting


def setup_threads(threads: int | None) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)


def preflight(cfg: Config) -> None:
    """Check every name in the config (model, task, tools, reward, algorithms) without heavy work."""
    if cfg.pipeline.sft or cfg.pipeline.rl or cfg.pipeline.eval_before:
        loading.resolve(cfg.model.name)
    task = build_task(cfg.task)
    check_tools(cfg, task)
    build_reward(cfg.task, task)
    for registry, name in ((ADVANTAGES, cfg.algorithm.advantage), (POLICY_LOSSES, cfg.algorithm.loss)):
        try:
            registry.get(name)
        except RegistryError as e:
            raise ConfigError(f"algorithm: {e}") from None
    if cfg.algorithm.kl_estimator.rstrip("+") not in KL_KINDS:
        raise ConfigError(f"algorithm.kl_estimator: {cfg.algorithm.kl_estimator!r} is not one of "
                          f"{', '.join(KL_KINDS)} (optionally with '+')")
    check_critic(cfg)
    if reference_kind(cfg) == "lora_base" and not cfg.model.lora.enabled:
        raise ConfigError("algorithm.reference=lora_base is the policy with its LoRA adapter switched off, but "
                          "model.lora.enabled=false; use algorithm.reference=copy (or auto)")
    from tirl.rollout.step import build_strategy
    strategy = build_strategy(cfg)
    if cfg.algorithm.advantage in TREE_ESTIMATORS and not getattr(strategy, "makes_trees", False):
        raise ConfigError(f"algorithm.advantage={cfg.algorithm.advantage} needs rollout trees, but "
                          f"rollout.strategy={cfg.rollout.strategy} samples flat groups; use rollout.strategy=tree "
                          "or entropy_branch")
    check_backend(cfg)
    from tirl.cluster import check_config as check_cluster
    check_cluster(cfg)
    from tirl.trainer.async_rl import check_config as check_async
    check_async(cfg)
    if cfg.pipeline.sft and cfg.sft.source == "rollouts":
        from tirl.trainer.sft_data import resolve_paths
        try:
            resolve_paths(cfg.sft.rollouts)
        except DataError as e:
            raise ConfigError(str(e)) from None
    elif cfg.pipeline.sft:
        try:
            task.sft_problems(1)
        except NotImplementedError as e:
            raise ConfigError(f"pipeline.sft is on but {e}; set pipeline.sft=false") from None


def critic_enabled(cfg: Config) -> bool:
    """Whether RL trains a value head: `algorithm.critic.enabled`, where `auto` means "when the advantage
    estimator is marked `needs_values`"."""
    enabled = cfg.algorithm.critic.enabled
    if enabled == "auto":
        return _needs_values(cfg)
    return bool(enabled)


def _needs_values(cfg: Config) -> bool:
    try:
        return bool(getattr(ADVANTAGES.get(cfg.algorithm.advantage), "needs_values", False))
    except RegistryError as e:
        raise ConfigError(f"algorithm: {e}") from None


def check_critic(cfg: Config) -> None:
    """The critic settings agree with the estimator and do something."""
    c = cfg.algorithm.critic
    if c.enabled is False and _needs_values(cfg):
        raise ConfigError(f"algorithm.advantage={cfg.algorithm.advantage} needs critic values, but "
                          "algorithm.critic.enabled=false")
    if not critic_enabled(cfg) and c != type(c)(enabled=c.enabled):
        raise ConfigError(f"algorithm.critic.* has no effect: algorithm.advantage={cfg.algorithm.advantage} "
                          "uses no values (set algorithm.critic.enabled=true to train a critic anyway)")
    if critic_enabled(cfg) and cfg.pipeline.rl and c.warmup_steps >= cfg.rl.steps:
        raise ConfigError(f"algorithm.critic.warmup_steps={c.warmup_steps} leaves no policy update in "
                          f"rl.steps={cfg.rl.steps}")


def reference_kind(cfg: Config) -> str:
    """`copy` or `lora_base`: `algorithm.reference` with `auto` resolved (lora_base when LoRA is on)."""
    kind = cfg.algorithm.reference
    if kind == "auto":
        return "lora_base" if cfg.model.lora.enabled else "copy"
    return kind


def build_reference(cfg: Config, policy: Policy) -> Reference | None:
    """The KL reference policy (None when `algorithm.kl_coef` is 0): a frozen copy of the weights the policy
    started from, or the policy itself with its adapter off (`lora_base`: no second model)."""
    if not cfg.algorithm.kl_coef:
        return None
    if reference_kind(cfg) == "lora_base":
        return Reference(policy.model, lora_base=True)
    return Reference(load_policy(cfg.model, policy.device, policy.path, trainable=False).model)


def check_backend(cfg: Config) -> None:
    """The backend's package is importable, and the backend can do what the pipeline asks of it."""
    b, p = cfg.backend, cfg.pipeline
    if b.name == "openai":
        if importlib.util.find_spec("openai") is None:
            raise ConfigError("backend.name=openai needs the openai package: pip install 'tirl[openai]'")
        if p.rl and b.openai.endpoint == "chat":
            raise ConfigError("backend.openai.endpoint=chat is text-level (token ids re-tokenised from the server's "
                              "text, log-probs often missing), so RL cannot train on it; it is for evaluation only "
                              "(pipeline.rl=false)")
        if (p.rl or (p.sft and p.eval_after_sft)) and b.openai.weight_sync == "none":
            raise ConfigError(f"backend.name=openai generates with the model served at {b.openai.base_url}, which "
                              "cannot receive the weights tirl trains unless backend.openai.weight_sync=vllm_files "
                              "(vllm serve servers in dev mode, see tirl.backends.fleet), so RL rollouts (and "
                              "evaluations after training) would use a stale model. Set it (with "
                              "backend.openai.weight_dir), or use the backend for `tirl eval` (or pipeline.rl=false, "
                              "pipeline.sft=false), and backend.name=hf or vllm for training")
    elif b.name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("backend.name=vllm needs vLLM on a CUDA machine: pip install 'tirl[vllm]'")


def build_task(cfg: TaskConfig) -> Task:
    try:
        cls = TASKS.get(cfg.name)
    except RegistryError as e:
        raise ConfigError(f"task.name: {e}") from None
    try:
        task = cls(**cfg.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"task.kwargs for {cfg.name!r}: {e}") from None
    if not isinstance(task, Task):
        raise ConfigError(f"task.name={cfg.name!r} made a {type(task).__name__}, not a tirl Task (a Task subclass, "
                          "or a function returning an instance of one)")
    return task


def tool_names(cfg: TaskConfig, task: Task) -> list[str]:
    return cfg.tools if cfg.tools is not None else list(task.default_tools)


def tool_settings(cfg: Config, task: Task) -> dict[str, dict[str, Any]]:
    """`tools.<name>` settings: the task's defaults (`Task.tool_settings`) for the tools the run uses,
    overridden key by key by the recipe."""
    used = set(tool_names(cfg.task, task))
    merged = {name: dict(values) for name, values in task.tool_settings().items() if name in used}
    for name, values in cfg.tools.items():
        merged[name] = {**merged.get(name, {}), **values}
    return merged


def check_tools(cfg: Config, task: Task) -> None:
    """Names and `tools.<name>` settings checked without building anything."""
    try:
        check_toolset(tool_names(cfg.task, task), tool_settings(cfg, task))
    except (RegistryError, TypeError, ValueError) as e:
        raise ConfigError(f"task.tools: {e}" if not str(e).startswith("tools.") else str(e)) from None


def build_tools(cfg: Config, task: Task) -> ToolSet:
    """The run's tools, configured from `tools.<name>`; call `shutdown()` on it at the end."""
    try:
        return build_toolset(tool_names(cfg.task, task), tool_settings(cfg, task))
    except (RegistryError, TypeError, ValueError) as e:
        raise ConfigError(f"task.tools: {e}" if not str(e).startswith("tools.") else str(e)) from None


def build_reward(cfg: TaskConfig, task: Task) -> BoundReward:
    """The configured reward with its parameters bound and checked (a bad name or parameter is a
    `ConfigError` before any work starts)."""
    try:
        return bind({"name": cfg.reward or "task", "kwargs": cfg.reward_kwargs}, task.default_reward)
    except (RegistryError, ValueError) as e:
        raise ConfigError(f"task.reward: {e}") from None


def load_policy(cfg: ModelConfig, device: str, path: str | None = None, trainable: bool = True,
                weights: bool = True) -> Policy:
    """Load the model from `path` (default: `cfg.name`) in float32, with LoRA if configured.
    `weights=False` (evaluation through a server): tokenizer, chat format and configs only; `model` then
    holds just `config` and `generation_config`."""
    path = path or loading.materialize(loading.resolve(cfg.name))
    tokenizer = loading.load_tokenizer(path)
    fmt = load_chat_format(tokenizer, cfg.chat_template)
    attn = cfg.attn_implementation if cfg.attn_implementation != "auto" else (
        "tirl_gqa" if device == "cpu" else "sdpa")
    if not weights:
        return Policy(loading.model_info(path), tokenizer, fmt, path, device, loading.resolve_dtype(cfg.dtype, device),
                      attn)
    model = loading.load_causal_lm(path, torch.float32, attn, device)
    if trainable and cfg.lora.enabled:
        model = loading.apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return Policy(model, tokenizer, fmt, path, device, loading.resolve_dtype(cfg.dtype, device), attn)


def max_context(cfg: ModelConfig, model) -> int:
    limit = getattr(loading.base_model(model).config, "max_position_embeddings", None) or 4096
    return min(limit, cfg.max_context) if cfg.max_context else limit


def make_backend(policy: Policy, cfg: Config) -> Generator:
    """The generator named by `backend.name`: hf (a copy of the policy in the compute dtype, in-process),
    openai (an OpenAI-compatible server or fleet; the policy gives the tokenizer, and with
    `backend.openai.weight_sync` its weights, pushed to every server), or vllm (in-process engine)."""
    name = cfg.backend.name
    if name == "openai":
        from tirl.backends.openai import OpenAIBackend

        backend = OpenAIBackend.from_config(cfg.backend.openai, policy.tokenizer, stop_ids(policy),
                                            policy.fmt.eos_token_id, policy.compute_dtype)
        if cfg.backend.openai.weight_sync == "none":
            return backend
        return with_policy_weights(backend, policy)  # the fleet generates with the weights trained/evaluated here
    if name == "vllm":
        from tirl.backends.vllm import VLLMBackend

        return VLLMBackend.from_policy(policy, cfg)
    gen_model = loading.load_causal_lm(policy.path, policy.compute_dtype, policy.attn_implementation,
                                       policy.device)
    backend = HFBackend(gen_model, policy.tokenizer, stop_ids(policy), max_context(cfg.model, policy.model),
                        cfg.rollout.max_batch_size, cfg.backend.scheduling)
    return with_policy_weights(backend, policy)


def with_policy_weights(backend: Generator, policy: Policy) -> Generator:
    """`backend` after loading the policy's weights (LoRA merged); closed if that fails. Servers shared by
    data-parallel ranks (`shared_by_ranks`) are loaded by rank 0 alone (the RL loop then waits for it)."""
    from tirl.trainer import distributed

    if getattr(backend, "shared_by_ranks", False) and not distributed.world().is_main:
        return backend
    try:
        backend.update_weights(loading.merged_state_dict(policy.model))
    except BaseException:
        backend.close()
        raise
    return backend


def stop_ids(policy: Policy) -> list[int]:
    ids = {policy.fmt.eos_token_id}
    gen_eos = getattr(getattr(loading.base_model(policy.model), "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def turn_limits(cfg: Config, model) -> TurnLimits:
    r = cfg.rollout
    return TurnLimits(max_turns=r.max_turns, max_new_tokens_per_turn=r.max_new_tokens_per_turn,
                      max_new_tokens=r.max_new_tokens, max_context=max_context(cfg.model, model),
                      timeout_s=r.timeout_s, observation_truncation=r.observation_truncation)


class EnvFactory:
    """Makes one env per trajectory (`Task.make_env`; a `ToolEnv` by default); `with_tools=False` is the
    no-tool baseline, and so is a run without tools (`task.tools=[]` on a task whose problems bring none)."""

    def __init__(self, task: Task, tools: ToolSet, cfg: Config, fmt: ChatFormat, with_tools: bool = True):
        self.task = task
        self.with_tools = with_tools and bool(len(tools) or task.problem_tools)
        self.tools = tools if with_tools else ToolSet([])
        r = cfg.rollout
        self.limits = ToolLimits(max_tool_calls=r.max_tool_calls, timeout_s=r.tool_timeout_s,
                                 max_output_chars=r.max_tool_output_chars)
        self.fault_rate = r.tool_fault_rate
        self._made: collections.Counter[str] = collections.Counter()
        shows_tools = len(self.tools) or (with_tools and task.problem_tools)
        if shows_tools and not template_supports_tools(fmt.tokenizer, fmt.template):
            what = f"tools {self.tools.names} are configured" if len(self.tools) else f"task {task.name!r} gives tools"
            raise ConfigError(f"{what} but chat template {fmt.name!r} never shows them to the model; use "
                              "model.chat_template=auto or chatml-tools")

    def __call__(self, problem: Problem) -> Env:
        """A new env with its own session view of the tools (closed with the env). With
        `rollout.tool_fault_rate` the n-th env of a problem draws its faults from a generator seeded by
        (problem id, n): the same faults for every run that samples the problem in the same order."""
        n, self._made[problem.id] = self._made[problem.id], self._made[problem.id] + 1
        session = self.tools.session(self.fault_rate, derive_seed("tool_faults", problem.id, n))
        return self.task.make_env(problem, session, self.limits, self.with_tools)
