"""BFCL rewards: `bfcl_ast` (single-turn), `bfcl_multi_turn` (back-end state), `bfcl` (either, by category).

Each returns a `RewardResult` whose total is BFCL's strict accuracy (1 or 0; `bfcl_multi_turn` with
`partial=true`: the share of checked user turns passed before the first failure), `correct` the same
verdict, and components reported as metrics (they do not sum to the total).

Single-turn (`bfcl_ast`): the calls are the parsed calls of the trajectory's turns (one turn). A call
block that could not be read makes the output undecodable, which BFCL scores wrong. `ast` categories:
`tirl.tasks.bfcl.checker`; irrelevance: right iff the model attempted no call at all (stricter than
BFCL, which also accepts an undecodable call there); live_relevance: right iff it made at least one
readable call and no unreadable one. Components: `format` (no unreadable block), `count` (as many calls
as expected; irrelevance 0, relevance at least 1), `names` (the expected multiset of function names),
`correct`.

Multi-turn (`bfcl_multi_turn`): the calls of every assistant message the env answered with tool results
are read again from the conversation (Hermes parser), grouped by user turn (a `user` message after the
first assistant message starts the next one), and re-run on fresh back-ends next to the gold calls
(`tirl.tasks.bfcl.multi_turn.check_conversation`), as BFCL's checker re-runs the decoded calls. The
conversation counts as finished when the trajectory ended by answering. Components: `correct`,
`turns_passed` (share of checked turns passed), `finished`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tirl.chat.hermes import parse_tool_calls
from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.rewards.format import unparsed_attempts
from tirl.tasks.base import Problem
from tirl.tasks.bfcl.checker import Verdict, check
from tirl.tasks.bfcl.multi_turn import DEFAULT_CALL_TIMEOUT_S, check_conversation
from tirl.types import StopReason, ToolCall, Trajectory

SINGLE_TURN_KINDS = ("ast", "irrelevance", "relevance")


def _kind(problem: Problem) -> str:
    kind = problem.info.get("kind")
    if kind not in (*SINGLE_TURN_KINDS, "multi_turn"):
        raise ValueError(f"problem {problem.id!r} is not a BFCL problem of the function_calling task "
                         f"(info['kind'] is {kind!r})")
    return kind


def single_turn_verdict(problem: Problem, calls: list[ToolCall], unreadable: int) -> Verdict:
    """BFCL's verdict on a single-turn answer: `calls` read from it, `unreadable` blocks that could not be."""
    kind = _kind(problem)
    if kind == "irrelevance":
        attempted = len(calls) + unreadable
        return Verdict(True) if not attempted else Verdict(False, "irrelevance_error:decoder_success",
                                                           f"{attempted} call attempt(s) where none was wanted")
    if unreadable:
        return Verdict(False, "ast_decoder:decoder_failed", f"{unreadable} tool-call block(s) could not be read")
    if kind == "relevance":
        return Verdict(True) if calls else Verdict(False, "relevance_error:decoder_failed", "no call")
    info = problem.info
    return check(info["functions"], [(c.name, c.arguments) for c in calls], info["possible_answer"],
                 info["category"])


def _expected_names(problem: Problem) -> Counter:
    return Counter(next(iter(e)) for e in problem.info.get("possible_answer", []))


@REWARDS.register("bfcl_ast")
def bfcl_ast_reward(trajectory: Trajectory, problem: Problem, group: GroupContext) -> RewardResult:
    """BFCL single-turn accuracy (1/0), its AST checker: names, required params, types, accepted values; order-free."""
    if _kind(problem) not in SINGLE_TURN_KINDS:
        raise ValueError(f"bfcl_ast scores single-turn BFCL problems; {problem.id!r} is multi-turn "
                         "(use the reward bfcl or bfcl_multi_turn)")
    calls = [c for t in trajectory.turns for c in t.tool_calls]
    unreadable = unparsed_attempts(trajectory)
    verdict = single_turn_verdict(problem, calls, unreadable)
    kind = problem.info["kind"]
    if kind == "ast":
        count_ok = len(calls) == len(problem.info["possible_answer"])
        names_ok = Counter(c.name for c in calls) == _expected_names(problem)
    else:
        count_ok = (len(calls) + unreadable == 0) if kind == "irrelevance" else len(calls) >= 1
        names_ok = count_ok
    components = {"correct": float(verdict.valid), "format": float(unreadable == 0), "count": float(count_ok),
                  "names": float(names_ok)}
    return RewardResult(total=float(verdict.valid), components=components, correct=verdict.valid)


def conversation_turns(trajectory: Trajectory) -> list[list[ToolCall]]:
    """The calls the env ran, grouped by user turn (one list per user turn the conversation reached)."""
    messages = trajectory.messages
    turns: list[list[ToolCall]] = [[]]
    seen_assistant = False
    for i, m in enumerate(messages):
        if m.role == "assistant":
            seen_assistant = True
            answered = i + 1 < len(messages) and messages[i + 1].role == "tool"
            if answered:
                turns[-1] += [p.call for p in parse_tool_calls(m.content, f"call_{i}") if p.call is not None]
        elif m.role == "user" and seen_assistant:
            turns.append([])
    return turns


@REWARDS.register("bfcl_multi_turn")
def bfcl_multi_turn_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *, partial: bool = False,
                           call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> RewardResult:
    """BFCL multi-turn accuracy (1/0): the calls, re-run on fresh back-ends, reach the gold state and results."""
    if _kind(problem) != "multi_turn":
        raise ValueError(f"bfcl_multi_turn scores multi-turn BFCL problems; {problem.id!r} is single-turn "
                         "(use the reward bfcl or bfcl_ast)")
    finished = trajectory.stop_reason == StopReason.ANSWERED
    verdict = check_conversation(problem.info, conversation_turns(trajectory), finished, call_timeout_s)
    share = verdict.turns_passed / verdict.turns_checked if verdict.turns_checked else float(verdict.valid)
    components = {"correct": float(verdict.valid), "turns_passed": share, "finished": float(finished)}
    return RewardResult(total=share if partial else float(verdict.valid), components=components,
                        correct=verdict.valid)


@REWARDS.register("bfcl")
def bfcl_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *, partial: bool = False,
                call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> Any:
    """BFCL accuracy for any category: bfcl_ast for single-turn problems, bfcl_multi_turn for multi-turn ones."""
    if _kind(problem) == "multi_turn":
        return bfcl_multi_turn_reward(trajectory, problem, group, partial=partial, call_timeout_s=call_timeout_s)
    return bfcl_ast_reward(trajectory, problem, group)
