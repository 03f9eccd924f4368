"""Imports every built-in rollout strategy so that it registers itself in `STRATEGIES`."""

from tirl.rollout import groups  # noqa: F401 - flat
from tirl.rollout import fission  # noqa: F401 - fission
from tirl.rollout import tree  # noqa: F401 - tree
from tirl.rollout import branch  # noqa: F401 - entropy_branch
