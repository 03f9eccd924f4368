"""Facts read from the summaries, the raw material of the questions: who a person is and when they lived,
who made a work, how an article's first sentence defines its subject, whom an article mentions.

Every fact is read from text the search tool shows the model (the first `VISIBLE_CHARS` characters of an
article's passage), so a question built on it can be answered from the passages. Pure functions of the
articles; no randomness.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tirl.rewards.qa import normalize_answer
from tirl.tasks.search_qa.corpus import Article

VISIBLE_CHARS = 300
"""Facts must lie in this head of a passage (the task sets the search tool to show this many characters)."""
MIN_DEFINITION_WORDS, MAX_DEFINITION_WORDS = 8, 40
"""Bounds on the words of a definition (shorter ones, 'a country in Western Europe', are ambiguous)."""
VAGUE_STARTS = ("one of", "any of", "either of", "a term", "the name", "a name")
"""Definitions that start so fit more than one article ('one of the four census regions ...')."""

_LIFESPAN = re.compile(r"^(?P<role>[^()]+?),? \((?P<birth>\d{3,4})[–-](?P<death>\d{3,4})\)$")
_BORN = re.compile(r"^(?P<role>[^()]+?),? \(born (?P<birth>\d{4})\)$")
_WORK = re.compile(r"^(?:(?P<year>\d{4}) )?(?P<kind>[^()]+?)(?: directed| written| composed| painted)? by "
                   r"(?P<creator>[A-Z][^,()]+)$")
_COPULA = re.compile(r"^(?P<subject>.+?) (?P<verb>is|was|are|were) (?P<predicate>.+)$")
_CONTEXT = re.compile(r"^(?P<context>In [^,]{3,40}), (?:(?:a|an|the) )?", re.IGNORECASE)
_KNOWN_AS = re.compile(r"(?:commonly|better|also|simply|widely) known as (?P<name>[A-Z][^,;()]+?)"
                       r"(?:,| or | is | was |$)")
_ABBREVIATION = re.compile(r"(?:\b[A-Z]|\b(?:St|Mr|Mrs|Ms|Dr|Jr|Sr|Prof|Gen|Col|Lt|Mt|No|vs|c|ca|approx|U\.S|"
                           r"i\.e|e\.g|etc|Inc|Ltd|Co))\.$")
_WORD = re.compile(r"(?<![\w'’-])[\w'’-]+")
_PARENTHETICAL = re.compile(r"\s*\([^()]*\)")

ROLES = (
    # (words of a work's kind, noun for the work, verb, noun for its maker)
    (("film", "movie"), "film", "directed", "director"),
    (("opera", "ballet", "symphony", "mass", "concerto", "oratorio", "requiem"), None, "composed", "composer"),
    (("painting", "fresco", "mural", "triptych", "portrait"), "painting", "painted", "painter"),
    (("sculpture", "statue"), "sculpture", "sculpted", "sculptor"),
    (("novel", "novella", "book", "poem", "play", "tragedy", "comedy", "story", "essay", "treatise", "dialogue",
      "epic", "collection", "work"), None, "wrote", "author"),
)
"""How a work's kind maps to how its maker is named (None: the kind's own word names the work)."""


@dataclass(frozen=True)
class Person:
    """A person whose short description gives their years, e.g. 'French philosopher and writer (1913–1960)'."""

    title: str
    """Their article's title."""
    name: str
    """How questions name them: the title without a parenthetical."""
    role: str
    """The description without the years ('French philosopher and writer')."""
    birth: int
    """Year of birth."""
    death: int | None
    """None for the living ('(born 1958)')."""


@dataclass(frozen=True)
class Work:
    """A work whose description names its maker, e.g. '1968 film by Stanley Kubrick'."""

    title: str
    """Its article's title."""
    name: str
    """The title without a parenthetical."""
    noun: str
    """What it is, for questions ('film', 'novel', 'opera')."""
    verb: str
    """What its maker did ('directed', 'wrote')."""
    maker_noun: str
    """What its maker is called ('director', 'author')."""
    creator: str
    """The maker's name as the description writes it."""
    year: int | None
    """The year the description starts with, if any."""


@dataclass(frozen=True)
class Definition:
    """The first sentence of an article, split at its copula: '<subject> was <predicate>.'"""

    title: str
    """The article's title."""
    context: str
    """A leading 'In mathematics' kept for the question ('' when none)."""
    verb: str
    """is, was, are or were."""
    predicate: str
    """What the subject is, without the final period (cut at a semicolon)."""
    names: tuple[str, ...]
    """Other names of the subject that the sentence gives (its full name, 'commonly known as ...')."""


def strip_parenthetical(title: str) -> str:
    """'Mercury (planet)' -> 'Mercury'."""
    return _PARENTHETICAL.sub("", title).strip()


def visible(article: Article) -> str:
    """The head of the article's passage that facts must lie in."""
    return article.text()[:VISIBLE_CHARS]


def first_sentence(text: str) -> str:
    """The text up to the first sentence end ('. ', '! ', '? ' before a capital or a quote), skipping
    abbreviations and initials ('Arthur C. Clarke', 'St. Petersburg'); the whole text if none."""
    for m in re.finditer(r"[.!?](?=\s+[A-Z0-9\"'(])", text):
        if m.group() == "." and _ABBREVIATION.search(text[max(0, m.start() - 6):m.end()]):
            continue
        return text[:m.end()]
    return text


def unique_names(articles: Sequence[Article]) -> dict[str, str]:
    """{title: name}, the name being the title without a parenthetical, for the titles whose name no other
    article shares (case-insensitively): a name questions can use without ambiguity."""
    names = {a.title: strip_parenthetical(a.title) for a in articles}
    counts = Counter(n.lower() for n in names.values())
    return {t: n for t, n in names.items() if n and counts[n.lower()] == 1}


def person_of(article: Article, name: str) -> Person | None:
    """The person an article is about when its description ends with their years; else None.

    Only plain years (no 'c.', no 'BC'); a death year after the birth year, and a plausible life span.
    """
    m = _LIFESPAN.match(article.description) or _BORN.match(article.description)
    if m is None:
        return None
    birth = int(m.group("birth"))
    death = int(m.group("death")) if "death" in m.groupdict() else None
    if death is not None and not 10 <= death - birth <= 110:
        return None
    return Person(article.title, name, m.group("role").strip(), birth, death)


def work_of(article: Article, name: str) -> Work | None:
    """The work an article is about when its description reads '[year] <kind> [directed] by <maker>'
    and the kind is one of `ROLES`; else None."""
    m = _WORK.match(article.description)
    if m is None:
        return None
    kind_words = m.group("kind").lower().split()
    year = int(m.group("year")) if m.group("year") else None
    for words, noun, verb, maker_noun in ROLES:
        hit = next((w for w in reversed(kind_words) if w in words), None)
        if hit is not None:
            return Work(article.title, name, noun or hit, verb, maker_noun, m.group("creator").strip(), year)
    return None


def definition_of(article: Article) -> Definition | None:
    """The article's first sentence as '<subject> <copula> <predicate>' when its subject names the article
    (holds the title, or every word of it) and the predicate has MIN..MAX_DEFINITION_WORDS words."""
    sentence = first_sentence(article.extract)
    m = _COPULA.match(sentence.rstrip(".!? "))
    if m is None or not sentence.endswith("."):
        return None
    subject, predicate = m.group("subject"), m.group("predicate").split("; ")[0].rstrip(",")
    if not MIN_DEFINITION_WORDS <= len(predicate.split()) <= MAX_DEFINITION_WORDS or "(" in predicate \
            or predicate.lower().startswith(VAGUE_STARTS):
        return None
    title_words = normalize_answer(strip_parenthetical(article.title)).split()
    subject_words = normalize_answer(subject).split()
    if not title_words or not set(title_words) <= set(subject_words):
        return None
    context_match = _CONTEXT.match(subject)
    context = context_match.group("context") if context_match else ""
    names = _names_in_subject(subject[context_match.end():] if context_match else subject, sentence)
    return Definition(article.title, context, m.group("verb"), predicate, names)


def _names_in_subject(subject: str, sentence: str) -> tuple[str, ...]:
    """The subject's leading name (up to a comma) and any 'known as X' names, each split at ' or ', at most
    8 words each ('The Drake Passage or Sea of Hoces' -> 'The Drake Passage', 'Sea of Hoces')."""
    found = [subject.split(",")[0], *(m.group("name") for m in _KNOWN_AS.finditer(sentence))]
    names = [n.strip() for full in found for n in full.split(" or ")]
    return tuple(dict.fromkeys(n for n in names if n and len(n.split()) <= 8 and n[0].isupper()))


class MentionFinder:
    """Finds the people an article's visible head names: at each word, the longest article name (two words
    or more) that starts there, when it is a person's ('Muhammad Ali of Egypt' is not 'Muhammad Ali'); and,
    more loosely, the people whose surname occurs in it."""

    def __init__(self, names: dict[str, str], people: dict[str, Person]):
        """`names`: {title: name} of every article; `people`: {title: Person}."""
        self._people = people
        self._by_first_word: dict[str, list[tuple[str, str]]] = {}
        for title, name in names.items():
            if len(name.split()) >= 2:  # a single word ('Homer', 'Plato') is too often something else
                self._by_first_word.setdefault(name.split()[0], []).append((name, title))
        for candidates in self._by_first_word.values():
            candidates.sort(key=lambda item: -len(item[0]))
        self._by_surname: dict[str, list[Person]] = {}
        for person in people.values():
            surname = person.name.split()[-1]
            if len(surname) >= 4 and surname[0].isupper():
                self._by_surname.setdefault(surname, []).append(person)

    def __call__(self, article: Article) -> list[Person]:
        """The people named in full in `visible(article)`, other than the article's own subject, in order of
        first mention, each once."""
        text = visible(article)
        found: dict[str, Person] = {}
        for m in _WORD.finditer(text):
            longest = next((title for name, title in self._by_first_word.get(m.group(), ())
                            if text.startswith(name, m.start()) and not text[m.start() + len(name):][:1].isalnum()),
                           None)
            if longest in self._people and longest != article.title:
                found.setdefault(longest, self._people[longest])
        return list(found.values())

    def by_surname(self, article: Article) -> list[Person]:
        """The people (other than the article's subject) whose surname occurs as a word in `visible(article)`."""
        words = {m.group() for m in _WORD.finditer(visible(article))}
        return [p for w in words for p in self._by_surname.get(w, ()) if p.title != article.title]
