"""Questions generated from the summaries, single-hop (one article answers) and multi-hop (two articles).

Kinds (`KINDS`), each with the articles that support it, in the order a solver needs them:

- single-hop: `definition` ("Who was an American astronaut ... first person to walk on the Moon?" ->
  the article's name), `birth_year` / `death_year` ("In what year was Albert Camus born?", from the
  short description's years), `creator` ("Who directed the film Jaws?", from '1975 film by Steven
  Spielberg');
- multi-hop, bridge: `creator_birth_year` / `creator_death_year` ("In what year was the director of
  the film Jaws born?": the work's article names its maker, whose article holds the year),
  `mention_birth_year` / `mention_death_year` ("In what year was the English writer mentioned in the
  Wikipedia article on Frankenstein born?": the first article names the person, the role singles them
  out among the people it names);
- multi-hop, comparison: `born_first` / `died_last` ("Who was born first, X or Y?": both articles).

Every fact lies in the head of a passage the search tool shows (`facts.VISIBLE_CHARS`). Questions whose
text contains their answer are dropped, and so are bridges whose first article already shows the answer.

`QuestionBank` holds the fixed candidates of every kind and splits them: an article is held out when a
hash of its title says so (`HELDOUT_SHARE` of them); a held-out candidate has every article that holds
its answer held out, a training candidate touches no held-out article at all. Comparisons are paired
on demand from the people of one side.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tirl.rewards.qa import normalize_answer
from tirl.tasks.search_qa import facts
from tirl.tasks.search_qa.corpus import Article

SINGLE_KINDS = {"definition": 0.5, "birth_year": 0.2, "death_year": 0.2, "creator": 0.1}
"""Single-hop kinds and their shares of the single-hop questions."""
MULTI_KINDS = {"creator_birth_year": 0.1, "creator_death_year": 0.1, "mention_birth_year": 0.15,
               "mention_death_year": 0.15, "born_first": 0.25, "died_last": 0.25}
"""Multi-hop kinds and their shares of the multi-hop questions."""
KINDS = {1: SINGLE_KINDS, 2: MULTI_KINDS}
"""Kinds by number of hops."""
COMPARISONS = ("born_first", "died_last")
HELDOUT_SHARE = 0.15
"""Share of the articles held out (by a hash of the title, independent of any seed)."""


@dataclass(frozen=True)
class Candidate:
    """A generated question with its answer and the articles that support it."""

    kind: str
    hops: int
    question: str
    answer: str
    aliases: tuple[str, ...]
    """Other accepted answers (other names of the answer)."""
    supporting: tuple[str, ...]
    """Titles of the articles needed, in the order a solver needs them."""
    answer_articles: tuple[str, ...]
    """Titles of the articles that hold the answer (they decide the held-out split)."""
    queries: tuple[str, ...]
    """Search queries that find the supporting articles, one per hop (reference tool calls)."""


def is_heldout_article(title: str) -> bool:
    """Whether the article belongs to the held-out side (a fixed hash of its title; `HELDOUT_SHARE` of them)."""
    digest = hashlib.sha256(f"search_qa/heldout/{title}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < HELDOUT_SHARE


def leaks_answer(question: str, answers: Sequence[str]) -> bool:
    """Whether the question's text already holds one of the answers (as whole normalised words)."""
    text = f" {normalize_answer(question)} "
    return any(f" {normalize_answer(a)} " in text for a in answers if normalize_answer(a))


class QuestionBank:
    """Every fixed candidate of every kind, built from the articles, and the people for comparisons."""

    def __init__(self, articles: Sequence[Article]):
        names = facts.unique_names(articles)
        self.articles = {a.title: a for a in articles}
        self.definitions = {a.title: d for a in articles if (d := facts.definition_of(a)) is not None}
        self.people = {a.title: p for a in articles if a.title in names and a.topic == "People"
                       and (p := facts.person_of(a, names[a.title])) is not None}
        self.works = {a.title: w for a in articles if a.title in names and (w := facts.work_of(a, names[a.title]))}
        by_name = {p.name: p for p in self.people.values()}
        find_mentions = facts.MentionFinder(names, self.people)
        self.candidates: dict[str, list[Candidate]] = {kind: [] for kind in (*SINGLE_KINDS, *MULTI_KINDS)}
        self._sides: dict[tuple[str, bool], list] = {}
        for article in articles:
            for candidate in self._candidates_of(article, names, by_name, find_mentions):
                if not leaks_answer(candidate.question, (candidate.answer, *candidate.aliases)) \
                        and not self._first_hop_answers(candidate):
                    self.candidates[candidate.kind].append(candidate)

    def _candidates_of(self, article: Article, names: dict[str, str], by_name: dict[str, facts.Person],
                       find_mentions: facts.MentionFinder) -> list[Candidate]:
        title = article.title
        out = []
        if title in self.definitions:
            out.append(definition_question(article, self.definitions[title], article.topic == "People"))
        if title in self.people:
            out += year_questions(self.people[title])
        if title in self.works:
            work = self.works[title]
            out.append(creator_question(work, self._aliases_of(by_name[work.creator].title)
                                        if work.creator in by_name else ()))
            if work.creator in by_name:
                out += creator_bridges(work, by_name[work.creator])
        out += mention_bridges(names.get(title, title), title, find_mentions(article),
                               find_mentions.by_surname(article))
        return out

    def _first_hop_answers(self, candidate: Candidate) -> bool:
        """Whether a bridge question's first article already shows its answer (then one hop would do)."""
        if candidate.hops == 1 or candidate.kind in COMPARISONS:
            return False
        first = facts.visible(self.articles[candidate.supporting[0]])
        return re.search(rf"(?<!\w){re.escape(candidate.answer)}(?!\w)", first) is not None

    def _aliases_of(self, title: str) -> tuple[str, ...]:
        """Accepted names of the article `title` other than its name: the title and the definition's names."""
        name = facts.strip_parenthetical(title)
        definition = self.definitions.get(title)
        found = [title, *(definition.names if definition else ())]
        return tuple(n for n in dict.fromkeys(found) if n != name)

    def side(self, kind: str, heldout: bool) -> list[Candidate]:
        """The fixed candidates of `kind` on one side of the split (comparisons have none: see `comparison`);
        a new list each call."""
        key = (kind, heldout)
        if key not in self._sides:
            self._sides[key] = [c for c in self.candidates[kind] if on_side(c, heldout)]
        return list(self._sides[key])

    def comparison_people(self, kind: str, heldout: bool) -> list[facts.Person]:
        """The people a comparison of `kind` may pair on one side (a death year needed for `died_last`)."""
        key = (f"people/{kind}", heldout)
        if key not in self._sides:
            self._sides[key] = [p for p in self.people.values() if is_heldout_article(p.title) == heldout
                                and (kind == "born_first" or p.death is not None)]
        return list(self._sides[key])

    def comparison(self, kind: str, people: Sequence[facts.Person], rng: random.Random) -> Candidate:
        """A comparison of two different people drawn with `rng` whose compared years differ."""
        while True:
            first, second = rng.sample(list(people), 2)
            if year_of(first, kind) != year_of(second, kind):
                return comparison_question(kind, first, second, self._aliases_of)


def on_side(candidate: Candidate, heldout: bool) -> bool:
    """Held out: every answer article is held out. Training: no supporting article is held out."""
    if heldout:
        return all(is_heldout_article(t) for t in candidate.answer_articles)
    return not any(is_heldout_article(t) for t in candidate.supporting)


def definition_question(article: Article, definition: facts.Definition, is_person: bool) -> Candidate:
    """'<Who|What> <copula> <predicate>?' (led by its context, 'In mathematics, what is ...?') -> the name."""
    predicate = definition.predicate
    wh = "who" if is_person else "what"
    question = f"{definition.context}, {wh} {definition.verb} {predicate}?" if definition.context else \
        f"{wh.capitalize()} {definition.verb} {predicate}?"
    name = facts.strip_parenthetical(article.title)
    aliases = tuple(n for n in dict.fromkeys([article.title, *definition.names]) if n != name)
    return Candidate("definition", 1, question, name, aliases, (article.title,), (article.title,), (question,))


def year_questions(person: facts.Person) -> list[Candidate]:
    """'In what year was X born?' and, for the dead, 'In what year did X die?'."""
    support = (person.title,)
    out = [Candidate("birth_year", 1, f"In what year was {person.name} born?", str(person.birth), (), support,
                     support, (person.name,))]
    if person.death is not None:
        out.append(Candidate("death_year", 1, f"In what year did {person.name} die?", str(person.death), (), support,
                             support, (person.name,)))
    return out


def creator_question(work: facts.Work, creator_aliases: Sequence[str]) -> Candidate:
    """'Who <directed|wrote|...> the <film|novel|...> W?' -> the maker as the work's description names them."""
    aliases = tuple(a for a in creator_aliases if a != work.creator)
    return Candidate("creator", 1, f"Who {work.verb} the {work.noun} {work.name}?", work.creator, aliases,
                     (work.title,), (work.title,), (work.name,))


def creator_bridges(work: facts.Work, maker: facts.Person) -> list[Candidate]:
    """'In what year was the <director|author|...> of the <film|...> W born?' (and 'die?'): work, then maker."""
    support, about = (work.title, maker.title), f"the {work.maker_noun} of the {work.noun} {work.name}"
    out = [Candidate("creator_birth_year", 2, f"In what year was {about} born?", str(maker.birth), (), support,
                     (maker.title,), (work.name, maker.name))]
    if maker.death is not None:
        out.append(Candidate("creator_death_year", 2, f"In what year did {about} die?", str(maker.death), (),
                             support, (maker.title,), (work.name, maker.name)))
    return out


def mention_bridges(name: str, title: str, mentioned: Sequence[facts.Person],
                    surnamed: Sequence[facts.Person] = ()) -> list[Candidate]:
    """'In what year was the <role> mentioned in the Wikipedia article on A born?' (and 'die?') for each person
    A names in full whose role singles them out: no other person A names (in full or by surname) has a role
    holding every word of theirs ('French painter' is not unique beside a 'French realist painter'). Skipped
    when the person's name is part of A's name."""
    others = {p.title: p for p in (*mentioned, *surnamed)}
    out = []
    for person in mentioned:
        words = set(person.role.lower().split())
        if person.name in name or any(words <= set(o.role.lower().split()) for t, o in others.items()
                                      if t != person.title):
            continue
        about, support = f"the {person.role} mentioned in the Wikipedia article on {name}", (title, person.title)
        out.append(Candidate("mention_birth_year", 2, f"In what year was {about} born?", str(person.birth), (),
                             support, (person.title,), (name, person.name)))
        if person.death is not None:
            out.append(Candidate("mention_death_year", 2, f"In what year did {about} die?", str(person.death), (),
                                 support, (person.title,), (name, person.name)))
    return out


def year_of(person: facts.Person, kind: str) -> int | None:
    """The year a comparison of `kind` compares."""
    return person.birth if kind == "born_first" else person.death


def comparison_question(kind: str, first: facts.Person, second: facts.Person, aliases_of) -> Candidate:
    """'Who was born first, X or Y?' / 'Who died later, X or Y?' -> the name of the earlier-born / later-dead."""
    a, b = year_of(first, kind), year_of(second, kind)
    assert a is not None and b is not None and a != b
    winner = (first if a < b else second) if kind == "born_first" else (first if a > b else second)
    verb = "was born first" if kind == "born_first" else "died later"
    support = (first.title, second.title)
    return Candidate(kind, 2, f"Who {verb}, {first.name} or {second.name}?", winner.name, aliases_of(winner.title),
                     support, support, (first.name, second.name))
