"""Per-token text for the trajectory viewer, decoded offline with the run's own tokenizer.

Each token id is decoded alone (once per distinct id, into a shared table). Byte-level tokenizers
split some characters over several tokens; a run of such fragments is decoded together and its text
is placed on the run's last token (the others show as empty), so the shaded tokens still read as the
exact text the model saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

_FRAGMENT = "\ufffd"
"""What a decoder yields for an incomplete UTF-8 sequence."""
_MAX_FRAGMENT_RUN = 8
"""Tokens decoded together at most to complete a character."""


class Decoder(Protocol):
    def decode_each(self, ids: Sequence[int]) -> list[str]:
        """The text of each id decoded alone, special tokens kept."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` decoded together, special tokens kept."""


class _FastDecoder:
    """A `tokenizers` tokenizer.json (fast to load: no transformers import)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        return self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class _HFDecoder:
    """Any transformers tokenizer (for model directories without tokenizer.json)."""

    def __init__(self, path: Path):
        from tirl.models.loading import load_tokenizer

        self._tok = load_tokenizer(str(path))

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        return self._tok.batch_decode([[i] for i in ids], skip_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def tokenizer_dirs(run_dir: Path, info: dict[str, Any], config: dict[str, Any]) -> list[Path]:
    """Where the run's tokenizer may be, most specific first: its saved models, then the model it started from."""
    out = [run_dir / "models" / "final", run_dir / "models" / "sft"]
    for candidate in (info.get("model_path"), (config.get("model") or {}).get("name")):
        if isinstance(candidate, str) and candidate:
            out.append(Path(candidate))
    return out


def load_decoder(dirs: Sequence[Path]) -> tuple[Decoder | None, str]:
    """The first tokenizer found in `dirs`, and where it came from (or None and why there is none)."""
    errors = []
    for d in dirs:
        try:
            if (d / "tokenizer.json").is_file():
                return _FastDecoder(d / "tokenizer.json"), str(d)
            if (d / "tokenizer_config.json").is_file():
                return _HFDecoder(d), str(d)
        except Exception as e:  # a broken tokenizer file: try the next place, say so if none works
            errors.append(f"{d}: {type(e).__name__}: {e}")
    where = ", ".join(str(d) for d in dirs)
    return None, "; ".join(errors) if errors else f"no tokenizer in {where}"


@dataclass
class TokenTable:
    """Text of each distinct token id seen so far (what the page's `vocab` holds)."""

    decoder: Decoder
    vocab: dict[int, str] = field(default_factory=dict)

    def add(self, ids: Sequence[int]) -> dict[int, str]:
        """Record the ids' texts; returns the positions whose text differs from their id's entry
        (fragments of a multi-token character: '' on all but the run's last token, which gets the whole text)."""
        new = sorted(set(ids) - self.vocab.keys())
        if new:
            self.vocab.update(zip(new, self.decoder.decode_each(new)))
        return self._fragment_fixes(ids)

    def _fragment_fixes(self, ids: Sequence[int]) -> dict[int, str]:
        fixes: dict[int, str] = {}
        i = 0
        while i < len(ids):
            if _FRAGMENT not in self.vocab[ids[i]]:
                i += 1
                continue
            for j in range(i + 1, min(i + _MAX_FRAGMENT_RUN, len(ids))):
                text = self.decoder.decode(ids[i:j + 1])
                if _FRAGMENT not in text:
                    fixes.update({k: "" for k in range(i, j)})
                    fixes[j] = text
                    i = j
                    break
            i += 1
        return fixes
