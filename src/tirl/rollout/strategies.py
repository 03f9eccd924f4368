"""Imports every built-in rollout strategy so that it registers itself in `STRATEGIES`."""

from tirl.rollout import groups  # noqa: F401 - flat
