"""Runtime checks of DESIGN.md invariants 1 and 2 on every trajectory (cheap; on by default)."""

from __future__ import annotations

from tirl.chat.format import ChatFormat
from tirl.errors import InvariantError
from tirl.types import Trajectory


def check_trajectory(traj: Trajectory, fmt: ChatFormat) -> None:
    """Raise `InvariantError` unless the trajectory's tokens, mask, log-probs and turns agree.

    Checked: equal lengths; turns tile the response in order; the mask is 1 exactly on each turn's
    sampled span and 0 elsewhere; log-probs are 0 off the mask and <= 0 on it; and decoding a turn's
    sampled tokens gives back the text the env parsed (token-in/token-out).
    """
    n = len(traj.response_ids)
    if not (len(traj.loss_mask) == len(traj.logprobs) == n):
        raise InvariantError(f"{traj.meta.task_id}: response, mask and logprobs lengths differ "
                             f"({n}, {len(traj.loss_mask)}, {len(traj.logprobs)})")
    expected = [0] * n
    pos = 0
    for k, turn in enumerate(traj.turns):
        if not (turn.gen_start == pos <= turn.gen_end <= turn.obs_end <= n):
            raise InvariantError(f"{traj.meta.task_id}: turn {k} spans [{turn.gen_start}, {turn.gen_end}, "
                                 f"{turn.obs_end}) do not continue from position {pos}")
        expected[turn.gen_start:turn.gen_end] = [1] * (turn.gen_end - turn.gen_start)
        _check_text(traj, fmt, k)
        pos = turn.obs_end
    if pos != n:
        raise InvariantError(f"{traj.meta.task_id}: {n - pos} response tokens belong to no turn")
    if list(traj.loss_mask) != expected:
        raise InvariantError(f"{traj.meta.task_id}: loss mask is not 1 exactly on the sampled tokens")
    for i, (m, lp) in enumerate(zip(traj.loss_mask, traj.logprobs)):
        if (m == 0 and lp != 0.0) or (m == 1 and lp > 1e-4):
            raise InvariantError(f"{traj.meta.task_id}: log-prob {lp} at position {i} (mask {m})")


def _check_text(traj: Trajectory, fmt: ChatFormat, k: int) -> None:
    turn = traj.turns[k]
    ids = traj.response_ids[turn.gen_start:turn.gen_end]
    if turn.finish_reason == "eos":
        ids = ids[:-1]
    if fmt.decode(ids) != turn.text:
        raise InvariantError(f"{traj.meta.task_id}: turn {k} text differs from its decoded tokens")
