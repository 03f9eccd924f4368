"""BFCL's AST checker for single-turn calls (Python categories), rewritten from its rules.

A model output is a list of calls `(name, arguments)`; a possible answer is a list of
`{function name: {parameter: [accepted values]}}`. The verdict follows `bfcl_eval`'s `ast_checker`:

- Dispatch by category name: "parallel" in it -> every expected call must be matched by a distinct
  model call, in any order (a true matching; BFCL's greedy pass, in which each expected call takes the
  first unused model call that passes, also rejects a few ambiguous outputs in some orders); else
  "multiple" in it -> exactly one call, checked against the one expected call;
  else (simple) exactly one call.
- One call against one expected call: the function name must be equal; every `required` parameter of
  the function doc must be given; every given parameter must be declared in the doc AND appear in the
  possible answer; its type must fit the doc's type (an int is accepted for a float; a value of the
  possible answer's own type is accepted as a "variable", e.g. a name for an integer); its value must
  be among the accepted ones: strings compared after removing spaces and `,./-_*^`, lower-cased, with
  ' read as "; lists element-wise the same way; dicts key by key (each key must be accepted and each
  key without "" among its accepted values must be present); lists of dicts dict by dict; anything
  else by Python equality (so 5 == 5.0). A parameter of the possible answer that the model left out
  must have "" among its accepted values.

Nested type checks go one level deep (arrays/tuples of a declared item type), as in BFCL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PYTHON_TYPES: dict[str, type] = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list,
                                 "tuple": list, "dict": dict, "any": str}
"""BFCL type name -> the Python type a value must have (after JSON decoding)."""
NESTED_TYPES = ("array", "tuple")
"""Types whose items are type-checked too."""

Calls = Sequence[tuple[str, Mapping[str, Any]]]
"""A model output: (function name, arguments) per call, in order."""


@dataclass(frozen=True)
class Verdict:
    """BFCL's decision on one output."""

    valid: bool
    error_type: str = ""
    """BFCL's error type (e.g. 'value_error:string'); '' when valid."""
    error: str = ""
    """What was wrong, for people."""


OK = Verdict(True)


def check(functions: Sequence[Mapping[str, Any]], calls: Calls, possible_answer: Sequence[Mapping[str, Any]],
          category: str) -> Verdict:
    """The AST verdict on `calls` for a problem of `category` (see the module docstring)."""
    if "parallel" in category:
        return _check_parallel(functions, calls, possible_answer)
    kind = "multiple_function_checker" if "multiple" in category else "simple_function_checker"
    if len(calls) != len(possible_answer) or len(calls) != 1:
        return Verdict(False, f"{kind}:wrong_count", f"expected 1 call, got {len(calls)}")
    return check_call(_doc(functions, possible_answer[0]), calls[0], possible_answer[0])


def _doc(functions: Sequence[Mapping[str, Any]], expected: Mapping[str, Any]) -> Mapping[str, Any]:
    name = next(iter(expected))
    return next(f for f in functions if f["name"] == name)


def _check_parallel(functions, calls: Calls, possible_answer) -> Verdict:
    """Every expected call matched by a distinct model call, in any order (a maximum bipartite matching;
    BFCL's own pass is greedy, which rejects a few ambiguous outputs in some orders only)."""
    if len(calls) != len(possible_answer):
        return Verdict(False, "parallel_function_checker_no_order:wrong_count",
                       f"expected {len(possible_answer)} calls, got {len(calls)}")
    fits = [[j for j, call in enumerate(calls) if check_call(_doc(functions, expected), call, expected).valid]
            for expected in possible_answer]
    owner: dict[int, int] = {}

    def assign(i: int, seen: set[int]) -> bool:
        for j in fits[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or assign(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    for i, expected in enumerate(possible_answer):
        if not assign(i, set()):
            return Verdict(False, "parallel_function_checker_no_order:cannot_find_match",
                           f"no call left to match expected call {i} ({next(iter(expected))})")
    return OK


def check_call(doc: Mapping[str, Any], call: tuple[str, Mapping[str, Any]], expected: Mapping[str, Any]) -> Verdict:
    """One model call against one possible-answer entry `{name: {param: [accepted]}}` and its function doc."""
    name, args = call
    accepted_by_param = next(iter(expected.values()))
    if name != doc["name"]:
        return Verdict(False, "simple_function_checker:wrong_func_name", f"expected {doc['name']!r}, got {name!r}")
    declared = doc["parameters"].get("properties", {})
    for param in doc["parameters"].get("required", []):
        if param not in args:
            return Verdict(False, "simple_function_checker:missing_required", f"missing required {param!r}")
    for param, value in args.items():
        if param not in declared or param not in accepted_by_param:
            return Verdict(False, "simple_function_checker:unexpected_param", f"unexpected parameter {param!r}")
        verdict = check_value(param, value, declared[param], accepted_by_param[param])
        if not verdict.valid:
            return verdict
    for param, accepted in accepted_by_param.items():
        if param not in args and "" not in accepted:
            return Verdict(False, "simple_function_checker:missing_optional",
                           f"parameter {param!r} left out but not optional")
    return OK


def check_value(param: str, value: Any, schema: Mapping[str, Any], accepted: Sequence[Any]) -> Verdict:
    """One argument against its declared schema (BFCL type names) and its accepted values."""
    type_name = schema.get("type", "any")
    expected_type = PYTHON_TYPES.get(type_name, str)
    nested = PYTHON_TYPES.get(schema.get("items", {}).get("type", "any"), str) if type_name in NESTED_TYPES else None
    if type_name == "float" and type(value) is int:
        value = float(value)
    typed = _check_type(param, value, accepted, type_name, expected_type, nested)
    if not typed.valid:
        return typed.verdict
    if not typed.is_variable:
        if expected_type is dict:
            return _check_dict(param, value, accepted)
        if expected_type is list and nested is dict:
            return _check_list_of_dicts(param, value, accepted)
        if expected_type is str:
            return _check_string(param, value, accepted)
        if expected_type is list:
            return _check_list(param, value, accepted)
    if value not in accepted:
        return Verdict(False, "value_error:others", f"{param!r}: {value!r} is not one of {list(accepted)!r}")
    return OK


@dataclass(frozen=True)
class _Typed:
    valid: bool
    is_variable: bool = False
    verdict: Verdict = OK


def _accepted_type(accepted: Sequence[Any]) -> type | None:
    """The type of the first accepted value that is not "" (None when all are "")."""
    return next((type(a) for a in accepted if a != ""), None)


def _check_type(param: str, value: Any, accepted: Sequence[Any], type_name: str, expected_type: type,
                nested: type | None) -> _Typed:
    """BFCL's `type_checker`: the declared type (items one level deep), or the accepted values' own type
    (a "variable"); a failed item check is final."""
    answer_type = _accepted_type(accepted)
    is_variable = answer_type is not None and answer_type is not expected_type
    if type(value) is expected_type:
        if nested is None:
            return _Typed(True, is_variable)
        for candidate in accepted:
            if type(candidate) is not list or all(
                    _check_type(param, item, candidate, nested.__name__, nested, None).valid for item in value):
                return _Typed(True, is_variable)
        return _Typed(False, verdict=Verdict(False, "type_error:nested",
                                             f"{param!r}: items of {value!r} are not all {nested.__name__}"))
    if answer_type is not None and type(value) is answer_type:
        return _Typed(True, True)
    return _Typed(False, verdict=Verdict(False, "type_error:simple",
                                         f"{param!r}: expected {type_name}, got {type(value).__name__} {value!r}"))


def standardize(text: str) -> str:
    """BFCL's string normalisation: drop spaces and `,./-_*^`, lower-case, ' -> "."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _check_string(param: str, value: str, accepted: Sequence[Any]) -> Verdict:
    if standardize(value) not in [standardize(a) for a in accepted if type(a) is str]:
        return Verdict(False, "value_error:string", f"{param!r}: {value!r} is not one of {list(accepted)!r}")
    return OK


def _standardize_items(items: Any) -> Any:
    """Strings of a list (or the characters of a string, as BFCL does) standardised; other values as they are."""
    if not isinstance(items, (list, str)):
        return items
    return [standardize(x) if type(x) is str else x for x in items]


def _check_list(param: str, value: list, accepted: Sequence[Any]) -> Verdict:
    if _standardize_items(value) not in [_standardize_items(a) for a in accepted]:
        return Verdict(False, "value_error:list/tuple", f"{param!r}: {value!r} is not one of {list(accepted)!r}")
    return OK


def _check_dict(param: str, value: Mapping[str, Any], accepted: Sequence[Any]) -> Verdict:
    verdict = Verdict(False, "dict_checker:unclear", f"{param!r}: no accepted dict")
    for candidate in accepted:
        if candidate == "" or not isinstance(candidate, Mapping):
            continue
        verdict = _dict_against(param, value, candidate)
        if verdict.valid:
            return OK
    return verdict


def _options(accepted: Any) -> list[Any]:
    return accepted if isinstance(accepted, list) else [accepted]


def _dict_against(param: str, value: Mapping[str, Any], candidate: Mapping[str, Any]) -> Verdict:
    for key, item in value.items():
        if key not in candidate:
            return Verdict(False, "value_error:dict_key", f"{param!r}: unexpected key {key!r}")
        allowed = [standardize(a) if type(a) is str else a for a in _options(candidate[key])]
        if (standardize(item) if type(item) is str else item) not in allowed:
            return Verdict(False, "value_error:dict_value", f"{param}[{key!r}]: {item!r} is not one of {allowed!r}")
    for key, allowed in candidate.items():
        if key not in value and "" not in _options(allowed):
            return Verdict(False, "value_error:dict_key", f"{param!r}: missing key {key!r}")
    return OK


def _check_list_of_dicts(param: str, value: list, accepted: Sequence[Any]) -> Verdict:
    verdict = Verdict(False, "list_dict_checker:unclear", f"{param!r}: no accepted list of dicts")
    for candidate in accepted:
        if not isinstance(candidate, (list, str)) or len(value) != len(candidate):
            verdict = Verdict(False, "value_error:list_dict_count", f"{param!r}: wrong number of dicts")
            continue
        verdict = OK
        for item, expected in zip(value, candidate):
            verdict = _check_dict(param, item, [expected]) if isinstance(item, Mapping) else \
                Verdict(False, "value_error:dict_value", f"{param!r}: {item!r} is not a dict")
            if not verdict.valid:
                break
        if verdict.valid:
            return OK
    return verdict
