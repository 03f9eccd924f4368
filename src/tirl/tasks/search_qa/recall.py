"""How retrievable the questions are: recall@k of their articles for a retriever.

For each problem and each k, three shares (over all problems, per hop count, per kind):

- `gold@k`: every article holding the answer (`info["answer_articles"]`) is among the top k passages
  for the question's own text;
- `supporting@k`: every supporting article (`info["supporting"]`) is among the top k for the question;
- `path@k`: each reference query (the problem's reference search calls, one per hop) finds its
  supporting article among its top k (a solver that searches the right names finds every article).

    python -m tirl.tasks.search_qa.recall --split heldout --retriever bm25 [--filter-rates]

`--filter-rates` adds, per kind, the share of generated candidates the task keeps (those whose reference
path works under BM25: the questions that are answerable with the tool).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from tirl.tasks.base import Problem
from tirl.tasks.search_qa.questions import COMPARISONS

KS = (1, 3, 5, 10)


def ranks(titles_by_query: dict[str, list[str]], query: str, wanted: Sequence[str]) -> list[int | None]:
    """1-based rank of each wanted title among the passages found for `query` (None: not found)."""
    found = titles_by_query[query]
    return [found.index(t) + 1 if t in found else None for t in wanted]


def problem_hits(problem: Problem, search, depth: int) -> dict[str, int | None]:
    """The worst rank (None: missed) of each measure for one problem; `search(query, k)` -> titles, best first."""
    queries = [problem.question, *(c.arguments["query"] for c in problem.reference_calls)]
    found = {q: search(q, depth) for q in dict.fromkeys(queries)}
    worst = _worst
    gold = worst(ranks(found, problem.question, problem.info["answer_articles"]))
    supporting = worst(ranks(found, problem.question, problem.info["supporting"]))
    path = worst([ranks(found, c.arguments["query"], [t])[0]
                  for c, t in zip(problem.reference_calls, problem.info["supporting"])])
    return {"gold": gold, "supporting": supporting, "path": path}


def _worst(values: Sequence[int | None]) -> int | None:
    return None if any(v is None for v in values) else max(values, default=None)


def recall_table(problems: Sequence[Problem], search, ks: Sequence[int] = KS) -> dict[str, dict[str, Any]]:
    """{group: {'problems': n, '<measure>@<k>': share}} over `problems`, for the groups 'all', 'hops=<n>'
    and 'kind=<kind>'; `search(query, k)` -> titles, best first."""
    groups: dict[str, list[dict[str, int | None]]] = {"all": []}
    for p in problems:
        hits = problem_hits(p, search, max(ks))
        for name in ("all", f"hops={p.info['hops']}", f"kind={p.info['kind']}"):
            groups.setdefault(name, []).append(hits)
    table = {}
    for name in sorted(groups, key=lambda g: (g != "all", not g.startswith("hops"), g)):
        rows = groups[name]
        table[name] = {"problems": len(rows)}
        for measure in ("gold", "supporting", "path"):
            for k in ks:
                table[name][f"{measure}@{k}"] = round(sum(r[measure] is not None and r[measure] <= k
                                                          for r in rows) / len(rows), 3)
    return table


def filter_pass_rates(task, per_kind: int = 300) -> dict[str, float]:
    """Share of each kind's training candidates (a fixed sample of at most `per_kind`) that the task keeps
    because their reference queries find their articles in BM25's top `FILTER_TOP_K`."""
    import random

    bank = task.bank()
    rates = {}
    for kind in bank.candidates:
        if kind in COMPARISONS:
            people = bank.comparison_people(kind, heldout=False)
            rng = random.Random(0)
            sample = [bank.comparison(kind, people, rng) for _ in range(per_kind)]
        else:
            pool = bank.side(kind, heldout=False)
            sample = random.Random(0).sample(pool, min(per_kind, len(pool)))
        rates[kind] = round(sum(task.is_retrievable(c) for c in sample) / len(sample), 3)
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    """Print the recall table of a split as JSON (`--split heldout|train`, `--size`, `--retriever`)."""
    parser = argparse.ArgumentParser(prog="python -m tirl.tasks.search_qa.recall", description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout")
    parser.add_argument("--size", type=int, default=None, help="problems (default: the held-out split; 200 train)")
    parser.add_argument("--retriever", choices=("bm25", "dense", "hybrid"), default="bm25")
    parser.add_argument("--heldout-size", type=int, default=200)
    parser.add_argument("--filter-rates", action="store_true", help="also the share of candidates kept, per kind")
    args = parser.parse_args(argv)
    from tirl.tasks.search_qa.task import SearchQATask
    from tirl.tools.search import SearchIndex, SearchSettings

    task = SearchQATask(heldout_size=args.heldout_size, retriever=args.retriever)
    if args.split == "heldout":
        problems = task.heldout()[:args.size] if args.size else task.heldout()
    else:
        problems = [task.train_problem(i) for i in range(args.size or 200)]
    index = SearchIndex(SearchSettings(corpus=str(task.corpus_path()), retriever=args.retriever))
    table = recall_table(problems, lambda q, k: [h.passage.title for h in index.search(q, k)])
    out = {"split": args.split, "retriever": args.retriever, "recall": table}
    if args.filter_rates:
        out["kept_share"] = filter_pass_rates(task)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
