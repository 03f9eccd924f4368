"""The `dataset` task: your own questions and gold answers, from a file or a Hugging Face dataset.

    task:
      name: dataset
      kwargs:
        path: data/questions.jsonl      # .jsonl .json .csv .parquet, a dataset directory, or a Hub id
        question_field: question        # the user message
        answer_field: answer            # the gold answer (a string, a number, or a list of accepted strings)
        id_field: id                    # optional: stable problem ids (default: data/<row>, heldout/<row>)
        heldout: 0.1                    # a fraction held out (drawn with split_seed), a file, or a split name
      tools: [calculator]               # any tools; none by default
      reward: arithmetic                # any reward; default qa_em (normalised exact match)

Sources: a local `.jsonl`/`.ndjson` (one object per line), `.json` (a list of objects), `.csv` (a
header row; every value is a string) or `.parquet` file; otherwise `path` goes to the `datasets`
library (`pip install datasets`): a directory written by `save_to_disk`, a directory of data files, or
a dataset id on the Hugging Face Hub, with `split` (default `train`).

Every row is checked when the task is built, so a bad row stops the run before any work: a missing
field, an empty question, an answer that is not a string, number or list of them, a duplicate id: each
is a `DataError` naming the file and the row (JSONL: its line). The other fields of a row go to
`Problem.info` (where rewards look for extras, e.g. `answers` for aliases). A list answer gives the
first string as `answer` and all of them as `info["answers"]` (read by `qa_em`/`qa_f1`).

Splits: `heldout` as a fraction holds out that share of the rows (at least one), drawn with
`split_seed`; as a path or split name, those rows are the held-out split. Training rows whose question
is also a held-out question are left out (announced), so the two never overlap. `train_problem` walks
the training rows in a fresh order each epoch, fixed by `seed`. There are no SFT traces (set
`pipeline.sft: false`, or SFT on rollouts with `sft.source: rollouts`).
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tirl.errors import DataError
from tirl.tasks.base import TASKS, Problem, Task

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
DEFAULT_HELDOUT = 0.1
DEFAULT_PROMPTS = {
    True: ("Answer the question. Use the tools when they help. Give the final answer as "
           "<answer>...</answer>, with only the answer inside the tags."),
    False: "Answer the question. Give the final answer as <answer>...</answer>, with only the answer inside the tags.",
}
"""The default system prompts, with and without tools: they state the answer format the rewards read."""

Row = tuple[str, Any]
"""A row and where it is ("line 3", "row 7"), for error messages."""


@TASKS.register("dataset")
class DatasetTask(Task):
    """Your own data: questions and answers from a JSONL/JSON/CSV/parquet file or a HF dataset; any tools and reward."""

    name = "dataset"
    default_tools: tuple[str, ...] = ()
    default_reward = "qa_em"

    def __init__(self, path: str, split: str | None = None, question_field: str = "question",
                 answer_field: str = "answer", id_field: str | None = None, system_prompt: str | None = None,
                 heldout: float | str = DEFAULT_HELDOUT, seed: int = 0, split_seed: int = 0):
        """Load and check every row now. Raises ValueError naming a bad keyword argument, and
        `DataError` naming the file and row of a bad row (see the module docstring)."""
        self.path = _check_str("path", path)
        self.split = None if split is None else _check_str("split", split)
        self.fields = {"question": _check_str("question_field", question_field),
                       "answer": _check_str("answer_field", answer_field),
                       "id": None if id_field is None else _check_str("id_field", id_field)}
        self.custom_prompt = None if system_prompt is None else _check_str("system_prompt", system_prompt)
        self.seed = _check_int("seed", seed)
        self.split_seed = _check_int("split_seed", split_seed)
        self._heldout, self._train = self._load(heldout)
        self._orders: dict[int, list[int]] = {}

    def _load(self, heldout: float | str) -> tuple[list[Problem], list[Problem]]:
        """(held-out, training) problems, each in source order."""
        label, rows = load_rows(self.path, self.split)
        problems = [row_problem(row, where, label, self.fields, f"data/{i}") for i, (where, row) in enumerate(rows)]
        if isinstance(heldout, str):
            held_label, held_rows = load_rows(*_heldout_source(heldout, self.path, self.split))
            held = [row_problem(row, where, held_label, self.fields, f"heldout/{i}")
                    for i, (where, row) in enumerate(held_rows)]
            train = problems
        else:
            held, train = split_fraction(problems, _check_fraction(heldout), self.split_seed, label)
        _check_unique_ids(held + train, label)
        questions = {p.question.strip() for p in held}
        kept = [p for p in train if p.question.strip() not in questions]
        if len(kept) < len(train):
            print(f"tirl dataset: {len(train) - len(kept)} training rows of {label} repeat a held-out question and are "
                  "left out of training", file=sys.stderr)
        return held, kept

    def system_prompt(self, with_tools: bool) -> str:
        """`system_prompt` when given (for both variants), else a default that states the answer format."""
        return self.custom_prompt if self.custom_prompt is not None else DEFAULT_PROMPTS[with_tools]

    def heldout(self) -> list[Problem]:
        """The held-out rows, in source order."""
        return list(self._heldout)

    def train_problems(self) -> list[Problem]:
        """The training rows, in source order."""
        return list(self._train)

    def train_problem(self, index: int) -> Problem:
        """Row `index` of the stream: epoch `index // rows` visits every training row once, in an order
        fixed by (`seed`, epoch)."""
        index = _check_int("index", index, low=0)
        if not self._train:
            raise ValueError(f"task 'dataset' has no training rows left in {self.path!r} after holding out "
                             f"{len(self._heldout)}")
        epoch, position = divmod(index, len(self._train))
        if epoch not in self._orders:
            order = list(range(len(self._train)))
            random.Random(f"dataset/train/{self.seed}/{epoch}").shuffle(order)
            self._orders[epoch] = order
        return self._train[self._orders[epoch][position]]


# --- reading sources ---------------------------------------------------------------------------------


def load_rows(path: str, split: str | None = None) -> tuple[str, list[Row]]:
    """(a label naming the source in errors, its rows with where each is). Raises `DataError` when the
    source cannot be read or holds no rows."""
    file = Path(path).expanduser()
    if file.suffix.lower() in FILE_SUFFIXES:
        if split is not None:
            raise DataError(f"split={split!r} is for datasets; {path!r} is a single file (leave split unset)")
        if not file.is_file():
            raise DataError(f"data file {path!r} does not exist (relative paths start at {Path.cwd()})")
        label, rows = str(file), list(_read_file(file))
    else:
        label, rows = f"{path} [{split or 'train'}]", list(_read_hf(path, split or "train"))
    if not rows:
        raise DataError(f"{label} holds no rows")
    return label, rows


def _read_file(file: Path) -> Iterator[Row]:
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(file)
    elif suffix == ".json":
        yield from _read_json(file)
    elif suffix == ".csv":
        yield from _read_csv(file)
    else:
        yield from _read_parquet(file)


def _read_jsonl(file: Path) -> Iterator[Row]:
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None


def _read_json(file: Path) -> Iterator[Row]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of objects, got {type(data).__name__} (or use .jsonl)")
    for number, row in enumerate(data, 1):
        yield f"row {number}", row


def _read_csv(file: Path) -> Iterator[Row]:
    with file.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for number, row in enumerate(reader, 1):
            where = f"row {number} (line {reader.line_num})"
            if None in row:
                raise DataError(f"{file}, {where}: more cells than the header has columns")
            yield where, {k: v for k, v in row.items() if v is not None}


def _read_parquet(file: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {file} needs pyarrow: pip install pyarrow") from e
    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as e:  # pyarrow's errors have many types; the file is what is wrong
        raise DataError(f"{file}: not a readable parquet file ({type(e).__name__}: {e})") from None
    for number, row in enumerate(rows, 1):
        yield f"row {number}", row


def _read_hf(path: str, split: str) -> Iterator[Row]:
    """Rows of a `save_to_disk` directory, a directory of data files, or a Hub dataset id."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path!r} is not a {'/'.join(FILE_SUFFIXES)} file, so it is read with the datasets "
                        "library, which is not installed: pip install datasets") from e
    local = Path(path).expanduser()
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            loaded = datasets.load_from_disk(str(local))
            data = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            data = datasets.load_dataset(path, split=split)
    except KeyError:
        raise DataError(f"dataset {path!r} has no split {split!r}") from None
    except Exception as e:  # network, missing dataset, bad files: name the source
        raise DataError(f"cannot load dataset {path!r} (split {split!r}): {type(e).__name__}: {e}") from None
    for number, row in enumerate(data, 1):
        yield f"row {number}", row


def _heldout_source(heldout: str, path: str, split: str | None) -> tuple[str, str | None]:
    """(path, split) of a held-out source given as a file, a dataset directory, or another split of `path`."""
    if Path(heldout).suffix.lower() in FILE_SUFFIXES or Path(heldout).expanduser().is_dir():
        return heldout, None
    if Path(path).suffix.lower() in FILE_SUFFIXES:
        raise DataError(f"heldout={heldout!r} is neither a fraction nor a {'/'.join(FILE_SUFFIXES)} file, and "
                        f"{path!r} is a file, which has no splits")
    if heldout == (split or "train"):
        raise ValueError(f"heldout={heldout!r} is the training split itself; name another split or a fraction")
    return path, heldout


# --- rows to problems --------------------------------------------------------------------------------


def row_problem(row: Any, where: str, label: str, fields: Mapping[str, str | None], default_id: str) -> Problem:
    """The `Problem` of one row; `DataError` naming `label` and `where` when the row is malformed."""
    at = f"{label}, {where}"
    if not isinstance(row, Mapping):
        raise DataError(f"{at}: expected an object with fields, got {type(row).__name__}: {_short(row)}")
    question = _text(row, fields["question"], "question_field", at)
    answer, aliases = _answer(row, fields["answer"], at)
    problem_id = default_id if fields["id"] is None else _id(row, fields["id"], at)
    used = {f for f in fields.values() if f is not None}
    info = {k: v for k, v in row.items() if k not in used}
    if aliases:
        info["answers"] = aliases
    return Problem(id=problem_id, question=question, answer=answer, info=info)


def _field(row: Mapping[str, Any], field: str, kwarg: str, at: str) -> Any:
    if field not in row:
        raise DataError(f"{at}: no field {field!r} (set {kwarg}); the row has {sorted(map(str, row)) or 'no fields'}")
    return row[field]


def _text(row: Mapping[str, Any], field: str, kwarg: str, at: str) -> str:
    value = _field(row, field, kwarg, at)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{at}: field {field!r} must be a non-empty string, got {_short(value)}")
    return value


def _answer(row: Mapping[str, Any], field: str, at: str) -> tuple[str, list[str]]:
    """(the gold answer, all accepted answers when the field is a list, else [])."""
    value = _field(row, field, "answer_field", at)
    if isinstance(value, (list, tuple)):
        answers = [_scalar_answer(v, field, at) for v in value]
        if not answers:
            raise DataError(f"{at}: field {field!r} is an empty list")
        return answers[0], answers
    return _scalar_answer(value, field, at), []


def _scalar_answer(value: Any, field: str, at: str) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    raise DataError(f"{at}: field {field!r} must be a non-empty string, a number or a list of them, "
                    f"got {_short(value)}")


def _id(row: Mapping[str, Any], field: str, at: str) -> str:
    value = _field(row, field, "id_field", at)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise DataError(f"{at}: field {field!r} must be a non-empty string or an int, got {_short(value)}")
    return str(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def split_fraction(problems: list[Problem], fraction: float, split_seed: int, label: str
                   ) -> tuple[list[Problem], list[Problem]]:
    """(held-out, training): `round(fraction * n)` rows (at least 1, at most n - 1) drawn with `split_seed`,
    both in source order."""
    if len(problems) < 2:
        raise DataError(f"{label} has {len(problems)} row; holding out a fraction needs at least 2")
    count = min(max(1, round(fraction * len(problems))), len(problems) - 1)
    chosen = set(random.Random(f"dataset/heldout/{split_seed}").sample(range(len(problems)), count))
    return ([p for i, p in enumerate(problems) if i in chosen], [p for i, p in enumerate(problems) if i not in chosen])


def _check_unique_ids(problems: list[Problem], label: str) -> None:
    seen: dict[str, Problem] = {}
    for p in problems:
        if p.id in seen:
            raise DataError(f"{label}: id {p.id!r} occurs twice (questions {_short(seen[p.id].question)} and "
                            f"{_short(p.question)}); ids must be unique across the training and held-out rows")
        seen[p.id] = p


# --- keyword checks ----------------------------------------------------------------------------------


def _check_str(kwarg: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{kwarg} must be a non-empty string, got {value!r}")
    return value


def _check_int(kwarg: str, value: Any, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise ValueError(f"{kwarg} must be an int{'' if low is None else f' >= {low}'}, got {value!r}")
    return value


def _check_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"heldout must be a fraction between 0 and 1 (exclusive), a file or a split name; got {value!r}")
    return float(value)
