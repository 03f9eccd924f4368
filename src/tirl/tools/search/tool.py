"""The `search` tool and its provider: a query in, the best passages out as the text the model reads.

`output_format: plain` numbers the passages with their titles; `search_r1` writes Search-R1's
`<information>Doc 1(Title: ...) ...</information>`. Every passage is cut to `max_passage_chars`.
An empty or too long query is a `ValueError` the model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tirl.tools.base import Tool, run_in_daemon_thread
from tirl.tools.providers import register_provider
from tirl.tools.search.index import BUNDLED_MODEL, Hit, SearchIndex
from tirl.tools.search.settings import SearchSettings


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
