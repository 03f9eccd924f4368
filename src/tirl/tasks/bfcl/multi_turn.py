"""BFCL's stateful multi-turn back-ends: running calls on them, and scoring a conversation the way
BFCL's multi-turn checker does.

The back-ends (GorillaFileSystem, MathAPI, MessageAPI, TwitterAPI, TicketAPI, TradingBot, TravelAPI,
VehicleControlAPI) are BFCL's own pure-Python classes, imported from `bfcl_eval`; each scenario loads
them with its `initial_config`. A call is a public method of one of the involved instances (a name two
classes share goes to the later class, as in BFCL); its result is what BFCL's executor makes of the
return value (a string as is, a dict as JSON, anything else `str()`), and an exception becomes the text
"Error during execution: ..." (data the model sees, never a crash). Each call runs in a daemon thread
with a time limit: the back-ends compute on model-chosen numbers (`power(10, 10**9)`), and a call
past its limit is answered with an error and abandoned (it may still finish in the background).

Scoring (`check_conversation`, after BFCL's `multi_turn_checker`): the model's calls, grouped by user
turn, and the gold call strings run on two fresh sets of instances, turn by turn. After every turn
whose gold list is not empty: (1) the model must have made a call in that turn, (2) every public
attribute of every instance must equal the gold instance's (state check), (3) every result the gold
calls of the turn returned must be among the results of all the model's calls so far, as a multiset
and in any order (response check). Turns with an empty gold list (miss_func / miss_param: the model
cannot do what is asked) are not checked, but the model's calls in them still run. A conversation
the rollout cut short (the model did not finish its last user turn) fails, like BFCL's force-terminated
entries.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import importlib
import inspect
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tirl.tasks.bfcl.data import INSTALL_HINT
from tirl.types import ToolCall, ToolStatus

_SOURCE = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"
BACKEND_MODULES = {
    "GorillaFileSystem": f"{_SOURCE}.gorilla_file_system", "MathAPI": f"{_SOURCE}.math_api",
    "MessageAPI": f"{_SOURCE}.message_api", "TwitterAPI": f"{_SOURCE}.posting_api",
    "TicketAPI": f"{_SOURCE}.ticket_api", "TradingBot": f"{_SOURCE}.trading_bot",
    "TravelAPI": f"{_SOURCE}.travel_booking", "VehicleControlAPI": f"{_SOURCE}.vehicle_control",
}
"""Back-end class -> the bfcl_eval module that defines it."""
STATELESS = ("MathAPI",)
"""Classes BFCL creates without loading a scenario."""
FORBIDDEN = ("kill", "exit", "quit", "remove", "unlink", "popen", "Popen", "run")
"""Names BFCL's executor refuses to call."""
MAX_STEPS_PER_TURN = 20
"""Calling steps allowed in one user turn before the conversation is cut (BFCL's MAXIMUM_STEP_LIMIT)."""
DEFAULT_CALL_TIMEOUT_S = 10.0
"""Seconds one back-end call may take when scoring."""


@dataclass(frozen=True)
class CallSpec:
    """A call as a gold string writes it: `name(positional..., keyword=...)` with literal values."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_call_string(text: str) -> CallSpec:
    """`"mv(source='a', destination='b')"` -> CallSpec; ValueError unless a plain call with literal arguments."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            raise ValueError("not a call of a plain function name")
        if any(k.arg is None for k in node.keywords):
            raise ValueError("**kwargs are not allowed")
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"gold call {text!r} is not a call with literal arguments ({e})") from None
    return CallSpec(node.func.id, args, kwargs)


def backend_class(class_name: str) -> type:
    """BFCL's back-end class `class_name` (imported on first use)."""
    try:
        module = importlib.import_module(BACKEND_MODULES[class_name])
    except ImportError as e:
        raise ImportError(f"BFCL's multi-turn back-ends need the bfcl-eval package ({INSTALL_HINT}): {e}") from e
    return getattr(module, class_name)


def load_backends(classes: Sequence[str], initial_config: Mapping[str, Any], long_context: bool) -> dict[str, Any]:
    """Fresh instances of `classes`, each loaded with (a deep copy of) its part of `initial_config`."""
    instances = {}
    for name in classes:
        instance = backend_class(name)()
        if name not in STATELESS:
            instance._load_scenario(copy.deepcopy(dict(initial_config.get(name, {}))), long_context=long_context)
        instances[name] = instance
    return instances


def method_table(instances: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """Public method name -> bound method over all instances (a later class wins a shared name)."""
    table: dict[str, Callable[..., Any]] = {}
    for instance in instances.values():
        for name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
            if not name.startswith("_"):
                table[name] = method
    return table


def gold_sequence(classes: Sequence[str], ground_truth: Sequence[Sequence[str]]) -> tuple[ToolCall, ...]:
    """The gold calls of every turn, in order, as `ToolCall`s with positional arguments named (by the
    method's signature); ValueError for an unparseable string or an unknown method."""
    signatures = {}
    for name in classes:
        for method, fn in inspect.getmembers(backend_class(name), predicate=inspect.isfunction):
            if not method.startswith("_"):
                signatures[method] = inspect.signature(fn)
    calls = []
    for t, turn in enumerate(ground_truth):
        for k, text in enumerate(turn):
            spec = parse_call_string(text)
            if spec.name not in signatures:
                raise ValueError(f"gold call {text!r}: no method {spec.name!r} in {list(classes)}")
            try:
                bound = signatures[spec.name].bind(None, *spec.args, **spec.kwargs)
            except TypeError as e:
                raise ValueError(f"gold call {text!r} does not fit {spec.name}{signatures[spec.name]}: {e}") from None
            arguments = {k2: v for k2, v in bound.arguments.items() if k2 != "self"}
            calls.append(ToolCall(id=f"gold_{t}_{k}", name=spec.name, arguments=arguments))
    return tuple(calls)


# ------------------------------------------------------------------------------------------- running calls
@dataclass(frozen=True)
class Outcome:
    """What one back-end call gave: the text BFCL's executor would produce, and how it ended."""

    text: str
    status: ToolStatus


def result_text(value: Any) -> str:
    """A back-end's return value as BFCL's executor writes it."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _start(fn: Callable[[], Any], done: Callable[[tuple[str, Any]], None]) -> None:
    def target() -> None:
        try:
            out: tuple[str, Any] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - the back-end's failure is the call's result
            out = ("error", e)
        done(out)

    threading.Thread(target=target, daemon=True, name="bfcl-call").start()


def _outcome(out: tuple[str, Any] | None, timeout_s: float) -> Outcome:
    if out is None:
        return Outcome(f"Error during execution: the call did not finish within {timeout_s:g} s", ToolStatus.TIMEOUT)
    kind, value = out
    if kind == "error":
        return Outcome(f"Error during execution: {value}", ToolStatus.EXECUTION_ERROR)
    return Outcome(result_text(value), ToolStatus.OK)


def _bind(table: Mapping[str, Callable[..., Any]], name: str, args: Sequence[Any],
          kwargs: Mapping[str, Any]) -> Callable[[], Any] | Outcome:
    if name in FORBIDDEN or name not in table:
        return Outcome(f"Error during execution: name {name!r} is not defined", ToolStatus.UNKNOWN_TOOL)
    method = table[name]
    return lambda: method(*args, **kwargs)


def execute(table: Mapping[str, Callable[..., Any]], name: str, args: Sequence[Any] = (),
            kwargs: Mapping[str, Any] | None = None, timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> Outcome:
    """Run one call (blocking, at most `timeout_s`)."""
    fn = _bind(table, name, args, kwargs or {})
    if isinstance(fn, Outcome):
        return fn
    box: list[tuple[str, Any]] = []
    finished = threading.Event()
    _start(fn, lambda out: (box.append(out), finished.set()))
    return _outcome(box[0] if finished.wait(timeout_s) else None, timeout_s)


async def execute_async(table: Mapping[str, Callable[..., Any]], name: str, kwargs: Mapping[str, Any],
                        timeout_s: float) -> Outcome:
    """`execute` without blocking the event loop (other episodes go on while a call runs)."""
    fn = _bind(table, name, (), kwargs)
    if isinstance(fn, Outcome):
        return fn
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def done(out: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(out))
        except RuntimeError:  # the loop closed while an abandoned call was still running
            pass

    _start(fn, done)
    try:
        out = await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except TimeoutError:
        out = None
    return _outcome(out, timeout_s)


# ------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class MultiTurnCheck:
    """The verdict on one conversation."""

    valid: bool
    """True iff every checked turn passed and the conversation was finished."""
    turns_checked: int
    """User turns with a non-empty gold list (the ones checked)."""
    turns_passed: int
    """Checked turns passed before the first failure."""
    error_type: str = ""
    """BFCL's error type of the first failure ('' when valid)."""
    error: str = ""
    """What went wrong, for people."""


def state_differences(model: Mapping[str, Any], gold: Mapping[str, Any]) -> list[str]:
    """`Class.attribute` for every public attribute of a gold instance that the model's instance does not equal."""
    out = []
    for name, gold_instance in gold.items():
        for attr, value in vars(gold_instance).items():
            if not attr.startswith("_") and getattr(model[name], attr, None) != value:
                out.append(f"{name}.{attr}")
    return out


def missing_results(gold_results: Sequence[str], model_results: Sequence[str]) -> list[str]:
    """Gold results not found among the model's (each model result used at most once, order free)."""
    pool, missing = list(model_results), []
    for item in gold_results:
        if item in pool:
            pool.remove(item)
        else:
            missing.append(item)
    return missing


def check_conversation(info: Mapping[str, Any], model_turns: Sequence[Sequence[ToolCall]], finished: bool,
                       timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> MultiTurnCheck:
    """Score the model's calls (one list per user turn it reached) against `info["ground_truth"]`.

    `finished`: the model ended its last user turn itself (the rollout did not cut it)."""
    gold_turns = info["ground_truth"]
    checked = sum(1 for t in gold_turns if t)
    classes, config, long_context = info["involved_classes"], info["initial_config"], info["long_context"]
    model, gold = load_backends(classes, config, long_context), load_backends(classes, config, long_context)
    model_table, gold_table = method_table(model), method_table(gold)
    all_model_results: list[str] = []
    passed = 0

    def fail(kind: str, message: str) -> MultiTurnCheck:
        return MultiTurnCheck(False, checked, passed, f"multi_turn:{kind}", message)

    for t, gold_calls in enumerate(gold_turns[:len(model_turns)]):
        all_model_results += [execute(model_table, c.name, (), c.arguments, timeout_s).text for c in model_turns[t]]
        specs = [parse_call_string(s) for s in gold_calls]
        gold_results = [execute(gold_table, s.name, s.args, s.kwargs, timeout_s).text for s in specs]
        if not gold_calls:
            continue
        if not model_turns[t]:
            return fail("empty_turn_model_response", f"turn {t}: no call, but the gold sequence makes {len(specs)}")
        differences = state_differences(model, gold)
        if differences:
            return fail("instance_state_mismatch", f"turn {t}: state differs in {', '.join(differences)}")
        missing = missing_results(gold_results, all_model_results)
        if missing:
            return fail("execution_response_mismatch", f"turn {t}: gold results not returned to the model: "
                                                       f"{missing}"[:500])
        passed += 1
    if not finished or len(model_turns) != len(gold_turns):
        return fail("force_terminated", f"the conversation ended in user turn {len(model_turns) - 1} of "
                                        f"{len(gold_turns)} without the model finishing it")
    return MultiTurnCheck(True, checked, passed)
