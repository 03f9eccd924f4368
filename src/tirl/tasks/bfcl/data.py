"""BFCL v4 data: reading the JSON-lines files, checking every row, and turning rows into `Problem`s.

The data ships inside the `bfcl-eval` package (`bfcl_eval/data/`): `BFCL_v4_<category>.json` holds one
problem per line (`id`, `question`: a list of user turns, each a list of messages, `function`: the
function docs the model is shown); `possible_answer/BFCL_v4_<category>.json` holds, line by line, the
accepted argument values (`ground_truth`). Multi-turn rows carry no `function`: their docs come from
`multi_turn_func_doc/<back-end>.json` for each of the row's `involved_classes`.

Every row is checked when it is read; a malformed one is a `DataError` naming the file and line.
BFCL's type names ("dict", "float", "tuple", "any") are converted to JSON schema for the model
(`to_json_schema`); the original docs are kept in `Problem.info["functions"]` because the checker's
type rules are written in BFCL's names.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tirl.errors import DataError
from tirl.tasks.base import Problem
from tirl.types import ToolCall

AST_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                  "live_parallel", "live_parallel_multiple")
"""Single-turn categories scored by BFCL's AST checker against `possible_answer`."""
IRRELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance")
"""Single-turn categories whose right answer is no call at all."""
RELEVANCE_CATEGORIES = ("live_relevance",)
"""Single-turn categories where any well-formed call is right."""
MULTI_TURN_CATEGORIES = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param",
                         "multi_turn_long_context")
"""Multi-turn categories: calls run on BFCL's stateful back-ends, scored on their final state."""
CATEGORIES = AST_CATEGORIES + IRRELEVANCE_CATEGORIES + RELEVANCE_CATEGORIES + MULTI_TURN_CATEGORIES
"""Every category this task can load."""
ALIASES = {"simple": "simple_python"}
"""Short names accepted in `categories`."""
UNSUPPORTED = {
    "simple_java": "its values are Java source strings scored by BFCL's Java type converter",
    "simple_javascript": "its values are JavaScript source strings scored by BFCL's JavaScript type converter",
    "memory": "it needs BFCL's memory back-ends and their prerequisite conversations",
    "web_search": "it needs live web search",
    "format_sensitivity": "it tests BFCL's prompt formats, not tool calls",
}
"""BFCL categories that exist but are not offered, with the reason."""

BACKEND_DOCS = {
    "GorillaFileSystem": "gorilla_file_system.json", "MathAPI": "math_api.json", "MessageAPI": "message_api.json",
    "TwitterAPI": "posting_api.json", "TicketAPI": "ticket_api.json", "TradingBot": "trading_bot.json",
    "TravelAPI": "travel_booking.json", "VehicleControlAPI": "vehicle_control.json",
}
"""Multi-turn back-end class -> file of its function docs under `multi_turn_func_doc/`."""

TYPE_NAMES = {"string": "string", "integer": "integer", "float": "number", "boolean": "boolean",
              "array": "array", "tuple": "array", "dict": "object", "any": None}
"""BFCL type name -> JSON schema type (None: any value, no `type` keyword)."""

INSTALL_HINT = "pip install --no-deps bfcl-eval==2026.3.23"


def resolve_category(name: object) -> str:
    """The category `name` stands for (aliases resolved); ValueError naming the valid ones otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"categories: entries must be strings, got {name!r}")
    name = ALIASES.get(name, name)
    if name in UNSUPPORTED:
        raise ValueError(f"categories: BFCL category {name!r} is not supported ({UNSUPPORTED[name]})")
    if name not in CATEGORIES:
        raise ValueError(f"categories: unknown category {name!r}; valid: {', '.join(CATEGORIES)} "
                         f"(alias: simple = simple_python)")
    return name


def kind_of(category: str) -> str:
    """How a category is scored: `ast`, `irrelevance`, `relevance` or `multi_turn`."""
    if category in MULTI_TURN_CATEGORIES:
        return "multi_turn"
    if category in IRRELEVANCE_CATEGORIES:
        return "irrelevance"
    if category in RELEVANCE_CATEGORIES:
        return "relevance"
    return "ast"


def default_data_dir() -> Path:
    """`bfcl_eval/data` of the installed package (found without importing it)."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the function_calling task needs BFCL's data from the bfcl-eval package: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


# ------------------------------------------------------------------------------------------- reading
@lru_cache(maxsize=64)
def read_jsonl(path: Path) -> tuple[dict[str, Any], ...]:
    """The JSON objects of a JSON-lines file (blank lines skipped); DataError naming file and line."""
    if not path.is_file():
        raise DataError(f"BFCL data file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return tuple({"_line": n, **r} for n, r in rows)


class BadAnswer(ValueError):
    """A possible-answer row is malformed (reported against the possible-answer file)."""


def _fail(path: Path, row: Mapping[str, Any], message: str) -> DataError:
    return DataError(f"{path}, line {row.get('_line', '?')}: {message}")


def _check_messages(turn: object, where: str) -> list[dict[str, str]]:
    if not isinstance(turn, list):
        raise ValueError(f"{where} must be a list of messages, got {type(turn).__name__}")
    for m in turn:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: a message must be {{'role': system|user|assistant, 'content': str}}, "
                             f"got {m!r}"[:300])
    return [{"role": m["role"], "content": m["content"]} for m in turn]


def _check_function(doc: object) -> dict[str, Any]:
    if not (isinstance(doc, dict) and isinstance(doc.get("name"), str) and doc["name"]
            and isinstance(doc.get("parameters"), dict)):
        raise ValueError(f"a function doc must have a non-empty 'name' and a 'parameters' object, got {doc!r}"[:300])
    params = doc["parameters"]
    if not isinstance(params.get("properties", {}), dict) or not isinstance(params.get("required", []), list):
        raise ValueError(f"function {doc['name']!r}: 'properties' must be an object and 'required' a list")
    to_json_schema(params)  # raises on an unknown type name
    return {"name": doc["name"], "description": str(doc.get("description", "")), "parameters": params}


# ------------------------------------------------------------------------------------------- schemas
def to_json_schema(schema: Mapping[str, Any], where: str = "parameters") -> dict[str, Any]:
    """A BFCL parameter schema as JSON schema: BFCL type names mapped (`TYPE_NAMES`), `optional` dropped,
    `properties` and `items` converted recursively; ValueError naming an unknown type."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type":
            if not isinstance(value, str) or value not in TYPE_NAMES:
                raise ValueError(f"{where}: unknown type {value!r}; BFCL types: {', '.join(TYPE_NAMES)}")
            if TYPE_NAMES[value] is not None:
                out["type"] = TYPE_NAMES[value]
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: to_json_schema(sub, f"{where}.{name}") for name, sub in value.items()}
        elif key == "items" and isinstance(value, dict):
            out[key] = to_json_schema(value, f"{where}[]")
        elif key != "optional":
            out[key] = value
    return out


def tool_dict(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A BFCL function doc as an OpenAI function-tool dict (what chat templates show the model)."""
    return {"type": "function", "function": {"name": doc["name"], "description": doc.get("description", ""),
                                             "parameters": to_json_schema(doc["parameters"])}}


# ------------------------------------------------------------------------------------------- gold calls
def first_accepted(accepted: Sequence[Any], required: bool = False) -> tuple[bool, Any]:
    """(present, value): the first accepted value of a possible-answer list, where "" means "left out"
    (skipped when the parameter is `required`). A nested dict (or list of dicts) of possible-answer lists
    becomes a concrete value the same way."""
    options = [a for a in accepted if a != ""] if required else list(accepted)
    if not options or options[0] == "":
        return False, None
    return True, _concrete(options[0])


def _concrete(value: Any) -> Any:
    if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
        return {k: v for k, (present, v) in ((k, first_accepted(a)) for k, a in value.items()) if present}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_concrete(v) for v in value]
    return value


def gold_calls(ground_truth: Sequence[Mapping[str, Mapping[str, Sequence[Any]]]],
               functions: Sequence[Mapping[str, Any]]) -> tuple[ToolCall, ...]:
    """One call per ground-truth entry, each argument its FIRST accepted value. "" (BFCL's "may be
    left out") as the first value leaves an optional parameter out; a required one takes its first other
    value. A parameter the function's doc does not declare is left out when it may be."""
    docs = {f["name"]: f["parameters"] for f in functions}
    calls = []
    for k, entry in enumerate(ground_truth):
        (name, params), = entry.items()
        declared = docs.get(name, {}).get("properties", {})
        required = set(docs.get(name, {}).get("required", []))
        args = {}
        for param, accepted in params.items():
            present, value = first_accepted(accepted, required=param in required)
            if present and not (param not in declared and "" in accepted):
                args[param] = value
        calls.append(ToolCall(id=f"call_{k}", name=name, arguments=args))
    return tuple(calls)


def _check_ground_truth(gt: object, functions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    names = {f["name"] for f in functions}
    if not isinstance(gt, list) or not gt:
        raise BadAnswer("'ground_truth' must be a non-empty list of {function name: {parameter: [accepted]}}")
    for entry in gt:
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise BadAnswer(f"a ground-truth entry must map one function name to its parameters, got {entry!r}"[:300])
        (name, params), = entry.items()
        if name not in names:
            raise BadAnswer(f"ground truth calls {name!r}, which is not among the row's functions")
        if not isinstance(params, dict) or not all(isinstance(v, list) for v in params.values()):
            raise BadAnswer(f"ground truth of {name!r}: each parameter must map to a list of accepted values")
    return gt


# ------------------------------------------------------------------------------------------- problems
def load_category(data_dir: Path, category: str) -> list[Problem]:
    """Every problem of `category`, in file order; DataError naming file and line for a malformed row."""
    path = data_dir / f"BFCL_v4_{category}.json"
    rows = read_jsonl(path)
    kind = kind_of(category)
    if kind in ("irrelevance", "relevance"):
        answers: Sequence[Mapping[str, Any] | None] = [None] * len(rows)
        answer_path = None
    else:
        answer_path = data_dir / "possible_answer" / f"BFCL_v4_{category}.json"
        answers = read_jsonl(answer_path)
        if len(answers) != len(rows):
            raise DataError(f"{answer_path}: {len(answers)} rows for the {len(rows)} problems of {path}")
    problems, seen = [], set()
    for row, answer in zip(rows, answers):
        if answer is not None and answer.get("id") != row.get("id"):
            raise _fail(answer_path, answer, f"id {answer.get('id')!r} does not match problem {row.get('id')!r} "
                                             f"(line {row['_line']} of {path.name})")
        try:
            problem = (_multi_turn_problem(data_dir, category, row, answer) if kind == "multi_turn"
                       else _single_turn_problem(category, kind, row, answer))
        except BadAnswer as e:
            raise _fail(answer_path, answer, str(e)) from None
        except ValueError as e:
            raise _fail(path, row, str(e)) from None
        if problem.id in seen:
            raise _fail(path, row, f"duplicate id {row['id']!r}")
        seen.add(problem.id)
        problems.append(problem)
    return problems


def _row_id(row: Mapping[str, Any]) -> str:
    if not isinstance(row.get("id"), str) or not row["id"]:
        raise ValueError("'id' must be a non-empty string")
    return row["id"]


def _turns(row: Mapping[str, Any]) -> list[list[dict[str, str]]]:
    turns = row.get("question")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'question' must be a non-empty list of turns")
    return [_check_messages(t, f"question turn {i}") for i, t in enumerate(turns)]


def _single_turn_problem(category: str, kind: str, row: Mapping[str, Any],
                         answer: Mapping[str, Any] | None) -> Problem:
    row_id, turns = _row_id(row), _turns(row)
    if len(turns) != 1 or not any(m["role"] == "user" for m in turns[0]):
        raise ValueError("a single-turn question must be one turn holding a user message")
    if not isinstance(row.get("function"), list) or not (row["function"] or kind == "irrelevance"):
        raise ValueError("'function' must be a non-empty list of function docs (may be empty for irrelevance)")
    functions = [_check_function(f) for f in row["function"]]
    info: dict[str, Any] = {"category": category, "level": category, "kind": kind, "messages": turns[0],
                            "functions": functions, "tools": [tool_dict(f) for f in functions]}
    calls: tuple[ToolCall, ...] = ()
    if answer is not None:
        gt = _check_ground_truth(answer.get("ground_truth"), functions)
        info["possible_answer"] = gt
        calls = gold_calls(gt, functions)
    question = next(m["content"] for m in reversed(turns[0]) if m["role"] == "user")
    return Problem(id=f"bfcl/{row_id}", question=question, answer="", reference_calls=calls, info=info)


def _multi_turn_problem(data_dir: Path, category: str, row: Mapping[str, Any],
                        answer: Mapping[str, Any] | None) -> Problem:
    row_id, turns = _row_id(row), _turns(row)
    classes = row.get("involved_classes")
    if not isinstance(classes, list) or not classes or any(c not in BACKEND_DOCS for c in classes):
        raise ValueError(f"'involved_classes' must be a non-empty list drawn from {sorted(BACKEND_DOCS)}, "
                         f"got {classes!r}")
    config = row.get("initial_config", {})
    if not isinstance(config, dict):
        raise ValueError("'initial_config' must be an object")
    missed = row.get("missed_function", {})
    if not isinstance(missed, dict) or not all(isinstance(v, list) for v in missed.values()):
        raise ValueError("'missed_function' must map a turn index to a list of function names")
    gt = (answer or {}).get("ground_truth")
    if not isinstance(gt, list) or len(gt) != len(turns) or \
            not all(isinstance(t, list) and all(isinstance(c, str) for c in t) for t in gt):
        raise BadAnswer(f"'ground_truth' must be one list of call strings per question turn ({len(turns)})")
    from tirl.tasks.bfcl.multi_turn import gold_sequence

    try:
        reference = gold_sequence(classes, gt)
    except ValueError as e:
        raise BadAnswer(str(e)) from None
    functions = [f for c in classes for f in backend_functions(data_dir, c)]
    hidden = {name for names in missed.values() for name in names}
    unknown = hidden - {f["name"] for f in functions}
    if unknown:
        raise ValueError(f"'missed_function' names functions the back-ends do not have: {sorted(unknown)}")
    for t, names in missed.items():
        if not (t.isdigit() and int(t) < len(turns)) or turns[int(t)]:
            raise ValueError(f"'missed_function' turn {t!r} must index an empty question turn")
    if not turns[0] or any(not turn and str(t) not in missed for t, turn in enumerate(turns)):
        raise ValueError("every question turn needs a message, except those that reveal 'missed_function's")
    shown = [f for f in functions if f["name"] not in hidden]
    info = {"category": category, "level": category, "kind": "multi_turn", "messages": turns[0], "turns": turns,
            "functions": shown, "tools": [tool_dict(f) for f in shown], "initial_config": config,
            "involved_classes": list(classes), "ground_truth": gt, "long_context": "long_context" in category,
            "missed_function": {t: [tool_dict(f) for f in functions if f["name"] in names]
                                for t, names in missed.items()}}
    first_user = next((m["content"] for m in turns[0] if m["role"] == "user"), "")
    return Problem(id=f"bfcl/{row_id}", question=first_user, answer="", reference_calls=reference, info=info)


@lru_cache(maxsize=32)
def _backend_docs(data_dir: Path, class_name: str) -> tuple[dict[str, Any], ...]:
    path = data_dir / "multi_turn_func_doc" / BACKEND_DOCS[class_name]
    docs = []
    for row in read_jsonl(path):
        try:
            docs.append(_check_function({k: v for k, v in row.items() if k not in ("_line", "response")}))
        except ValueError as e:
            raise _fail(path, row, str(e)) from None
    return tuple(docs)


def backend_functions(data_dir: Path, class_name: str) -> list[dict[str, Any]]:
    """The function docs of one multi-turn back-end (its `response` schemas dropped)."""
    return [dict(d) for d in _backend_docs(data_dir, class_name)]
