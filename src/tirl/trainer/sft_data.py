"""SFT data from rollouts (rejection sampling), TL-Training's MAE and PKT.

Rejection-sampling SFT (ToRA's output-space shaping, the data flywheel of ET-Agent and Tool-Star):
trajectories written by earlier rollouts or evaluations (`trajectories/rl/step_*.jsonl`,
`eval/*.jsonl`) are filtered (`sft.filter`) and trained on with their own `prompt_ids`,
`response_ids` and `loss_mask`: token for token what RL trained on, so tool output (mask 0) is never
a target. The filters run in a fixed order and each one's removals are counted:

    (no_trained_tokens) -> drop_errored -> drop_truncated -> correct_only -> min_reward -> dedupe
    -> mask_error_turns -> max_per_problem

MAE (TL-Training, reference 5.4a): an assistant turn whose tool output is an error (a result status in
`error_statuses`, or output text containing one of `error_strings`, compared on lower-cased letters and
digits only) gets loss mask 0; it stays in the context of the later turns.

PKT (reference 5.4b): key tokens of a sequence, the first token of each tool call and the tokens of the
tool's name, get the weight w = clamp(N_other / N_key, 1, max_key_weight) (N counted over the sequence's
trained tokens), other trained tokens weight 1; the loss is sum(w * nll) / sum(w). Key tokens are found
by matching character offsets of the decoded turn against Hermes markup `<tool_call>{"name": "..."`.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tirl.chat.format import ChatFormat, SFTSequence
from tirl.chat.hermes import CLOSE, OPEN
from tirl.config import SFTConfig, SFTFilterConfig
from tirl.errors import DataError
from tirl.rollout.io import from_dict
from tirl.types import StopReason, Trajectory

TRUNCATED = frozenset({StopReason.MAX_TOKENS, StopReason.MAX_TURNS, StopReason.CONTEXT_OVERFLOW,
                       StopReason.TOOL_BUDGET, StopReason.TIMEOUT})
"""Stop reasons of trajectories that did not finish by answering (dropped by `drop_truncated`)."""
_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class SFTExample:
    """One training sequence: tokens, loss mask and per-token loss weights."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    """1 on trained (assistant) tokens, 0 on prompt-side tokens and tool output."""
    weights: tuple[float, ...]
    """Loss weight per response token: 0 where loss_mask is 0; 1, or the PKT weight of a key token."""
    origin: str
    """Where it comes from: `task:<problem id>` or `<file>:<line>`."""


def example_of(seq: SFTSequence, origin: str) -> SFTExample:
    """An example with weight 1 on every trained token (plain token-mean NLL)."""
    return SFTExample(seq.prompt_ids, seq.response_ids, seq.loss_mask, tuple(float(m) for m in seq.loss_mask),
                      origin)


@dataclass
class FilterReport:
    """What rejection sampling read, removed (per filter, in order) and kept."""

    files: list[str]
    read: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    kept: int = 0
    masked_turns: int = 0
    """Assistant turns masked out by mask_error_turns (in kept trajectories or not)."""

    def describe(self) -> str:
        gone = ", ".join(f"{name} {n}" for name, n in self.removed.items()) or "nothing"
        return (f"read {self.read} trajectories from {len(self.files)} file(s); removed: {gone}; "
                f"kept {self.kept}" + (f"; masked {self.masked_turns} error turns" if self.masked_turns else ""))


# ----------------------------------------------------------------------------- reading


def resolve_paths(patterns: Sequence[str]) -> list[Path]:
    """The files named by `sft.rollouts` (paths or globs, `**` allowed), in order, each once."""
    out: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            found = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"sft.rollouts: {pattern!r} matches no files")
        else:
            path = Path(expanded)
            if path.is_dir():
                raise DataError(f"sft.rollouts: {pattern!r} is a directory; name its files (e.g. {pattern}/*.jsonl)")
            if not path.is_file():
                raise DataError(f"sft.rollouts: no such file {pattern!r}")
            found = [path]
        out += [p for p in found if p not in out]
    return out


def read_trajectories(path: Path) -> Iterator[tuple[str, Trajectory]]:
    """(`file:line`, trajectory) for each line; a malformed line raises naming the file and line."""
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                traj = from_dict(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise DataError(f"{where}: not a tirl trajectory ({type(e).__name__}: {e})") from e
            check_shape(traj, where)
            yield where, traj


def check_shape(traj: Trajectory, where: str) -> None:
    """Token lists agree in length, the mask is 0/1, and every turn lies inside the response."""
    n = len(traj.response_ids)
    if not traj.prompt_ids or len(traj.loss_mask) != n:
        raise DataError(f"{where}: a trajectory needs prompt_ids and one loss_mask entry per response token "
                        f"(got {len(traj.prompt_ids)} prompt ids, {n} response ids, {len(traj.loss_mask)} mask)")
    if any(m not in (0, 1) for m in traj.loss_mask):
        raise DataError(f"{where}: loss_mask must hold only 0 and 1")
    if not all(isinstance(t, int) and t >= 0 for t in (*traj.prompt_ids, *traj.response_ids)):
        raise DataError(f"{where}: token ids must be non-negative integers")
    for k, turn in enumerate(traj.turns):
        if not 0 <= turn.gen_start <= turn.gen_end <= turn.obs_end <= n:
            raise DataError(f"{where}: turn {k} spans [{turn.gen_start}, {turn.gen_end}, {turn.obs_end}] "
                            f"outside the {n} response tokens")


def check_tokenizer(fmt: ChatFormat, traj: Trajectory, where: str) -> None:
    """The trajectory was tokenised by this model's tokenizer: ids in its vocabulary, and its prompt
    decodes to text containing the user's question."""
    vocab = len(fmt.tokenizer)
    top = max((*traj.prompt_ids, *traj.response_ids))
    if top >= vocab:
        raise DataError(f"{where}: token id {top} is outside this model's vocabulary ({vocab}); the trajectory "
                        "comes from a model with another tokenizer")
    question = next((m.content for m in traj.messages if m.role == "user"), "").strip()
    if question and question not in fmt.decode(traj.prompt_ids):
        raise DataError(f"{where}: the prompt tokens do not decode to the trajectory's question with this model's "
                        "tokenizer; the trajectory comes from a model with another tokenizer")


# ----------------------------------------------------------------------------- filtering


def is_errored(traj: Trajectory) -> bool:
    """The environment failed (not the model)."""
    return traj.stop_reason == StopReason.ERROR


def is_truncated(traj: Trajectory) -> bool:
    """The trajectory ended without an answer (a budget or limit cut it)."""
    return traj.stop_reason in TRUNCATED


def _letters(text: str) -> str:
    """Lower-cased letters and digits only: TL-Training's normalisation before matching error strings."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def error_turns(traj: Trajectory, statuses: Sequence[str], strings: Sequence[str]) -> list[int]:
    """Indices of the turns with an erroneous tool output: a status in `statuses`, or a content that
    contains one of `strings` (compared on lower-cased letters and digits)."""
    needles = [s for s in map(_letters, strings) if s]
    out = []
    for k, turn in enumerate(traj.turns):
        if any(r.status.value in statuses or any(s in _letters(r.content) for s in needles)
               for r in turn.tool_results):
            out.append(k)
    return out


def mask_turns(loss_mask: Sequence[int], traj: Trajectory, turns: Sequence[int]) -> tuple[int, ...]:
    """`loss_mask` with 0 on the sampled tokens [gen_start, gen_end) of the given turns."""
    mask = list(loss_mask)
    for k in turns:
        t = traj.turns[k]
        mask[t.gen_start:t.gen_end] = [0] * (t.gen_end - t.gen_start)
    return tuple(mask)


@dataclass(frozen=True)
class Candidate:
    """A trajectory on its way through the filters, with the loss mask it will be trained with."""

    where: str
    traj: Trajectory
    loss_mask: tuple[int, ...]


def _drop(items: list[Candidate], report: FilterReport, name: str, keep: Callable[[Candidate], bool]):
    kept = [c for c in items if keep(c)]
    report.removed[name] = len(items) - len(kept)
    return kept


def filter_candidates(items: list[Candidate], f: SFTFilterConfig, report: FilterReport) -> list[Candidate]:
    """Apply the enabled filters in the module docstring's order, counting each one's removals
    (trajectories with no sampled token at all are dropped first, counted only when there are some)."""
    trainable = [c for c in items if any(c.loss_mask)]
    if len(trainable) < len(items):
        report.removed["no_trained_tokens"] = len(items) - len(trainable)
    items = trainable
    if f.drop_errored:
        items = _drop(items, report, "drop_errored", lambda c: not is_errored(c.traj))
    if f.drop_truncated:
        items = _drop(items, report, "drop_truncated", lambda c: not is_truncated(c.traj))
    if f.correct_only:
        items = _drop(items, report, "correct_only", lambda c: c.traj.correct is True)
    if f.min_reward is not None:
        items = _drop(items, report, "min_reward", lambda c: c.traj.reward >= f.min_reward)
    if f.dedupe:
        items = _drop(items, report, "dedupe", _first_of_each())
    if f.mask_error_turns:
        items = [_mask_errors(c, f, report) for c in items]
        items = _drop(items, report, "mask_error_turns", lambda c: any(c.loss_mask))
    if f.max_per_problem is not None:
        items = _drop(items, report, "max_per_problem", _best_per_problem(items, f.max_per_problem))
    report.kept = len(items)
    return items


def _first_of_each() -> Callable[[Candidate], bool]:
    """Keep-predicate for the first candidate of each distinct (prompt_ids, response_ids)."""
    seen: set[tuple] = set()

    def keep(c: Candidate) -> bool:
        key = (c.traj.prompt_ids, c.traj.response_ids)
        if key in seen:
            return False
        seen.add(key)
        return True

    return keep


def _mask_errors(c: Candidate, f: SFTFilterConfig, report: FilterReport) -> Candidate:
    turns = error_turns(c.traj, f.error_statuses, f.error_strings)
    report.masked_turns += len(turns)
    return replace(c, loss_mask=mask_turns(c.loss_mask, c.traj, turns)) if turns else c


def _best_per_problem(items: list[Candidate], k: int) -> Callable[[Candidate], bool]:
    """Keep-predicate for the k highest-reward candidates of each problem (ties: file order)."""
    by_problem: dict[str, list[int]] = {}
    for i, c in enumerate(items):
        by_problem.setdefault(c.traj.meta.task_id, []).append(i)
    chosen = {items[i].where for idx in by_problem.values()
              for i in sorted(idx, key=lambda i: -items[i].traj.reward)[:k]}
    return lambda c: c.where in chosen


def rollout_examples(cfg: SFTConfig, fmt: ChatFormat) -> tuple[list[SFTExample], FilterReport]:
    """Read, check and filter `cfg.rollouts`; raises `DataError` when nothing is left, with the counts."""
    paths = resolve_paths(cfg.rollouts)
    report = FilterReport(files=[str(p) for p in paths])
    items = []
    for path in paths:
        for where, traj in read_trajectories(path):
            check_tokenizer(fmt, traj, where)
            items.append(Candidate(where, traj, traj.loss_mask))
    report.read = len(items)
    if not items:
        raise DataError(f"sft.rollouts: the {len(paths)} file(s) hold no trajectories: {', '.join(report.files)}")
    kept = filter_candidates(items, cfg.filter, report)
    if not kept:
        raise DataError(f"sft.source=rollouts: no trajectories left to train on ({report.describe()}); "
                        "loosen sft.filter (e.g. sft.filter.correct_only=false)")
    examples = [SFTExample(c.traj.prompt_ids, c.traj.response_ids, c.loss_mask,
                           tuple(float(m) for m in c.loss_mask), c.where) for c in kept]
    return examples, report


# ----------------------------------------------------------------------------- PKT


def key_token_weights(key_mask: Sequence[int], loss_mask: Sequence[int], max_weight: float) -> tuple[float, ...]:
    """TL-Training PKT weights of one sequence: w = clamp(N_other/N_key, 1, max_weight) on key tokens,
    1 on other trained tokens, 0 where loss_mask is 0 (N counted over trained tokens only).

    Example: 2 key and 10 other tokens, max 9: w = 5, so CE 1 everywhere gives (2*5 + 10)/(2*5 + 10) = 1.
    """
    n_key = sum(1 for k, m in zip(key_mask, loss_mask) if k and m)
    n_other = sum(1 for k, m in zip(key_mask, loss_mask) if m and not k)
    w = min(max(n_other / n_key, 1.0), max_weight) if n_key else 1.0
    return tuple(0.0 if not m else (w if k else 1.0) for k, m in zip(key_mask, loss_mask))


def key_token_mask(fmt: ChatFormat, response_ids: Sequence[int], loss_mask: Sequence[int]) -> tuple[int, ...]:
    """1 on key tokens: in each run of trained tokens (a turn), the first token of every Hermes
    `<tool_call>` block and the tokens that spell its `"name"` value."""
    key = [0] * len(response_ids)
    for start, end in _runs(loss_mask):
        for k in key_positions(fmt, response_ids[start:end]):
            key[start + k] = 1
    return tuple(key)


def _runs(mask: Sequence[int]) -> Iterator[tuple[int, int]]:
    """[start, end) of each maximal run of 1s."""
    start = None
    for i, m in enumerate((*mask, 0)):
        if m and start is None:
            start = i
        elif not m and start is not None:
            yield start, i
            start = None


def key_positions(fmt: ChatFormat, ids: Sequence[int]) -> list[int]:
    """Positions in `ids` of the first token of each tool call and of the tokens of its name."""
    text = _decode(fmt, ids)
    at = _char_to_token(fmt, ids)
    out: set[int] = set()
    for m in re.finditer(re.escape(OPEN), text):
        close = text.find(CLOSE, m.end())
        out.add(at(m.start()))
        name = _NAME.search(text, m.end(), close if close >= 0 else len(text))
        if name and name.end(1) > name.start(1):
            out.update(range(at(name.start(1)), at(name.end(1) - 1) + 1))
    return sorted(out)


def _decode(fmt: ChatFormat, ids: Sequence[int]) -> str:
    return fmt.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _char_to_token(fmt: ChatFormat, ids: Sequence[int]) -> Callable[[int], int]:
    """char index in decode(ids) -> index of the token that produces it (binary search on the decoded
    lengths of prefixes: token k covers [len(decode(ids[:k])), len(decode(ids[:k+1]))))."""
    lengths: dict[int, int] = {}

    def length(k: int) -> int:
        if k not in lengths:
            lengths[k] = len(_decode(fmt, ids[:k]))
        return lengths[k]

    def at(char: int) -> int:
        lo, hi = 0, len(ids) - 1
        while lo < hi:  # smallest k with length(k + 1) > char
            mid = (lo + hi) // 2
            if length(mid + 1) > char:
                hi = mid
            else:
                lo = mid + 1
        return lo

    return at


def with_key_weights(examples: list[SFTExample], fmt: ChatFormat, max_weight: float) -> list[SFTExample]:
    """Examples with PKT weights; raises when no example trains on a tool call (the weighting would do nothing)."""
    out, with_calls = [], 0
    for e in examples:
        key = key_token_mask(fmt, e.response_ids, e.loss_mask)
        with_calls += any(key)
        out.append(replace(e, weights=key_token_weights(key, e.loss_mask, max_weight)))
    if not with_calls:
        raise DataError(f"sft.key_token_weighting is on, but none of the {len(examples)} training sequences trains "
                        f"on a tool call ({OPEN}{{\"name\": ...}}{CLOSE}); set sft.key_token_weighting=false")
    return out
