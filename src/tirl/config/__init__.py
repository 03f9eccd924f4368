"""Typed configuration: every default of tirl lives here.

A recipe (YAML) and `key.sub=value` command-line overrides only change these defaults. Unknown keys
and bad values are errors that name the key (`ConfigError`), raised before any work starts.
`tirl train` with no recipe runs `Config()`: the embedded default (eval -> SFT -> eval -> GRPO -> eval
on the arithmetic task with SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from tirl.config.base import _Section
from tirl.config.infra import (BackendConfig, ClusterConfig, DistributedConfig, OpenAIBackendConfig,
                               VLLMBackendConfig)
from tirl.config.sections import (MAE_ERROR_STRINGS, AlgorithmConfig, CriticConfig, DynamicSamplingConfig,
                                  EntropyBranchConfig, EvalConfig, FissionConfig, InfoGainConfig, LoraConfig,
                                  ModelConfig, OptimConfig, PipelineConfig, ReplayConfig, RLConfig, RolloutConfig,
                                  RunConfig, SFTConfig, SFTFilterConfig, TaskConfig, ToolStatusName, TreeConfig)
from tirl.errors import ConfigError

__all__ = ["AlgorithmConfig", "BackendConfig", "ClusterConfig", "Config", "CriticConfig", "DistributedConfig",
           "DynamicSamplingConfig", "EntropyBranchConfig", "EvalConfig", "FissionConfig", "InfoGainConfig",
           "LoraConfig", "MAE_ERROR_STRINGS", "ModelConfig", "OpenAIBackendConfig", "OptimConfig", "PipelineConfig",
           "ReplayConfig", "RLConfig", "RolloutConfig", "RunConfig", "SFTConfig", "SFTFilterConfig", "TaskConfig",
           "ToolStatusName", "TreeConfig", "VLLMBackendConfig", "load_config"]


class Config(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    backend: BackendConfig = BackendConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    rl: RLConfig = RLConfig()
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    pipeline: PipelineConfig = PipelineConfig()
    cluster: ClusterConfig = ClusterConfig()
    distributed: DistributedConfig = DistributedConfig()
    tools: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "Settings per tool in task.tools: tools.<name>.<key> (see `tirl tools`); checked by the tool's "
        "own settings model before any work starts."))

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.rollout.max_new_tokens_per_turn > self.rollout.max_new_tokens:
            raise ValueError("rollout.max_new_tokens_per_turn cannot exceed rollout.max_new_tokens")
        # a key changed from its default that would do nothing is refused, not silently ignored
        # (compared with the defaults, so that a saved config.yaml is itself a valid recipe)
        lora, lora_default = self.model.lora, LoraConfig()
        changed = [k for k in LoraConfig.model_fields if k != "enabled" and getattr(lora, k) != getattr(lora_default, k)]
        if changed and not lora.enabled:
            raise ValueError(f"model.lora.{changed[0]} has no effect unless model.lora.enabled=true")
        if self.algorithm.kl_estimator != AlgorithmConfig().kl_estimator and self.algorithm.kl_coef == 0:
            raise ValueError("algorithm.kl_estimator has no effect while algorithm.kl_coef is 0")
        for name in ("tree", "fission", "entropy_branch"):
            if getattr(self.rollout, name) != getattr(RolloutConfig(), name) and self.rollout.strategy != name:
                raise ValueError(f"rollout.{name}.* has no effect unless rollout.strategy={name}")
        ds = self.rollout.dynamic_sampling
        if not ds.enabled and ds != DynamicSamplingConfig():
            raise ValueError("rollout.dynamic_sampling.* has no effect unless rollout.dynamic_sampling.enabled=true")
        if self.backend.name != "openai" and self.backend.openai != OpenAIBackendConfig():
            raise ValueError("backend.openai.* has no effect unless backend.name=openai")
        if self.backend.name != "vllm" and self.backend.vllm != VLLMBackendConfig():
            raise ValueError("backend.vllm.* has no effect unless backend.name=vllm")
        if not self.cluster.enabled:  # the Ray launcher of distributed training connects with cluster.address
            used = ("address", "object_store_mb") if self.distributed.launcher == "ray" else ()
            changed = [k for k in ClusterConfig.model_fields
                       if k not in used and getattr(self.cluster, k) != getattr(ClusterConfig(), k)]
            if changed:
                raise ValueError(f"cluster.{changed[0]} has no effect unless cluster.enabled=true")
        return self

    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- recipe YAML <- `key.sub=value` overrides; every error names the key.

    Recipes and overrides are merged into the dumped defaults, key by key: setting `rl.optim.lr`
    keeps every other value of `rl.optim` (including defaults that differ from `OptimConfig`'s own).
    """
    data: dict[str, Any] = Config().model_dump(mode="json")
    if recipe is not None:
        _merge(data, _read_yaml(Path(recipe)))
    for item in overrides:
        _set_path(data, *_parse_override(item))
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, data)) from None


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Deep-merge mappings in place (`new` wins; lists and values are replaced, not merged)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections (run, model, task, ...)")
    return data


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. rl.steps=10)")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is a value, not a section")
        node = nxt
    node[path[-1]] = value


def _explain(error: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for err in error.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key{_suggest(err['loc'])}")
        else:
            got = f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else ""
            lines.append(f"{loc or 'config'}: {err['msg']}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _suggest(loc: tuple) -> str:
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return ""
        model = field.annotation
    names = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(names)})"
