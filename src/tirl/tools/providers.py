"""Configurable tools: a provider turns typed settings into tools, and `build_toolset` builds a run's set.

A recipe names tools in `task.tools` and configures them under `tools.<name>`:

    task: {tools: [python, search]}
    tools:
      python: {isolation: bwrap, mode: persistent, timeout_s: 10}
      search: {corpus: data/wiki.jsonl, top_k: 3, max_concurrency: 4}

Every entry accepts the execution-control keys of `ToolSettings` (timeout, concurrency, retries);
a provider's own settings model adds its keys. Unknown keys, bad values and settings for tools that
are not used are errors that name `tools.<name>.<key>`.

A provider is registered in `TOOLS` like a plain tool, so `tirl tools` lists both; it may build
several tools (an MCP server gives one tool per server tool), all under the provider's policy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic

from tirl.tools.base import TOOLS, Tool, get_tools
from tirl.tools.toolset import ExecutionPolicy, ToolSet


class ToolSettings(pydantic.BaseModel):
    """Execution control, accepted by every tool under `tools.<name>`."""

    model_config = pydantic.ConfigDict(extra="forbid")

    timeout_s: float | None = pydantic.Field(None, gt=0, description="Seconds per call (default: the tool's own, "
                                             "else rollout.tool_timeout_s).")
    max_concurrency: int | None = pydantic.Field(None, ge=1, description="Calls running at once, all trajectories.")
    retries: int = pydantic.Field(0, ge=0, le=10, description="Retries of transient failures (never of timeouts).")
    retry_backoff_s: float = pydantic.Field(0.5, ge=0, description="First retry delay; doubles each retry.")

    def policy(self) -> ExecutionPolicy:
        return ExecutionPolicy(self.timeout_s, self.max_concurrency, self.retries, self.retry_backoff_s)


S = TypeVar("S", bound=ToolSettings)


@dataclass(frozen=True)
class ToolProvider:
    """Builds tools from settings. Registered in `TOOLS` under its name."""

    name: str
    settings_model: type[ToolSettings]
    build: Callable[[Any], Tool | Sequence[Tool]]
    """settings -> the tools (one or several)."""
    description: str


def register_provider(name: str, settings_model: type[S]) -> Callable[[Callable[[S], Any]], Callable[[S], Any]]:
    """Decorator: register `build(settings) -> Tool | list[Tool]` as the configurable tool `name`.

    The first line of the function's docstring is what `tirl tools` shows.
    """
    if not (isinstance(settings_model, type) and issubclass(settings_model, ToolSettings)):
        raise TypeError(f"settings model of tool provider {name!r} must subclass ToolSettings")

    def wrap(build: Callable[[S], Any]) -> Callable[[S], Any]:
        doc = (inspect.getdoc(build) or name).strip().splitlines()[0]
        TOOLS.add(name, ToolProvider(name, settings_model, build, doc), doc)
        return build

    return wrap


def validate_settings(model: type[ToolSettings], raw: Mapping[str, Any], where: str) -> ToolSettings:
    """`model` validated from `raw`; `ValueError` naming `where.<key>` for each problem."""
    try:
        return model.model_validate(dict(raw))
    except pydantic.ValidationError as e:
        parts = []
        for err in e.errors()[:3]:
            key = ".".join(str(p) for p in err["loc"])
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"{where}.{key}: {message}" if key else f"{where}: {message}")
        raise ValueError("; ".join(parts)) from None


def check_toolset(names: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Check names and settings as `build_toolset` would, without building anything (cheap)."""
    _resolve(names, settings)


def _resolve(names: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None
             ) -> list[tuple[str, ToolProvider | None, ToolSettings]]:
    settings = dict(settings or {})
    unused = sorted(set(settings) - set(names))
    if unused:
        raise ValueError(f"tools.{unused[0]}: settings for a tool that is not used (task.tools: {list(names)})")
    out = []
    for name in names:
        entry = TOOLS.get(name)
        raw = settings.get(name) or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"tools.{name}: expected a mapping of settings, got {type(raw).__name__}")
        provider = entry if isinstance(entry, ToolProvider) else None
        model = provider.settings_model if provider else ToolSettings
        out.append((name, provider, validate_settings(model, raw, f"tools.{name}")))
    return out


def build_toolset(names: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None = None) -> ToolSet:
    """The tools named (registry names or `module:attr` paths), configured from `settings[name]`.

    Raises `ValueError` for settings of a tool not in `names`, unknown or bad keys, and duplicate
    tool names; `RegistryError` for unknown names; `TypeError` for objects that are not tools.
    """
    tools: list[Tool] = []
    policies: dict[str, ExecutionPolicy] = {}
    for name, provider, cfg in _resolve(names, settings):
        if provider is not None:
            built = provider.build(cfg)
            built = [built] if isinstance(built, Tool) else list(built)
        else:
            built = get_tools([name])
        tools.extend(built)
        policies.update({t.name: cfg.policy() for t in built})
    return ToolSet(tools, policies)
