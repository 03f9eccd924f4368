"""Helpers for the eval tests: a reward whose verdict varies from sample to sample (so pass@k has
something to count even with a random model), and the arguments of a fast `tirl eval`."""

from __future__ import annotations

from tirl.rewards.base import RewardResult

PARITY = "tests.eval.helpers:parity"

SHORT = ["rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16", "rollout.max_turns=2",
         "eval.no_tools=false", "eval.bootstrap_resamples=200"]
"""Overrides that keep a tiny-model evaluation to a fraction of a second per problem."""


def parity(trajectory, problem, group) -> RewardResult:
    """'Correct' when the sampled token ids sum to an even number: a verdict that varies between samples
    and problems, fixed by the tokens alone."""
    correct = sum(trajectory.response_ids) % 2 == 0
    return RewardResult(float(correct), {"parity": float(correct)}, correct)
