"""Settings of the `search` tool (`tools.search.<key>`), checked cheaply before any index is built.

The corpus must be an existing JSONL or parquet file, the retriever's packages must be installed
(else an error naming the pip extra), `max_top_k` must cover `top_k`, `cache_dir` must be a directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import pydantic

from tirl.tools.providers import ToolSettings
from tirl.tools.search.corpus import CORPUS_SUFFIXES

INSTALL_HINT = "pip install 'tirl[search]'"
STOPWORD_LANGUAGES = ("en", "de", "nl", "fr", "es", "pt", "it", "ru", "sv", "no", "zh", "tr", "ko", "da")


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
