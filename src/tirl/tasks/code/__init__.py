"""The `code` task (HumanEval with a sandboxed interpreter) and its `humaneval_pass` reward.

Importing this package registers both; `TASKS` and `REWARDS` import it on their first lookup
(`tirl.tasks.base.BUILTIN_TASK_MODULES`). Format, splits and measured numbers: README.md beside it.
"""

from tirl.tasks.code import reward
from tirl.tasks.code.humaneval import CodeTask
from tirl.tasks.code.reward import answer_code, humaneval_pass

__all__ = ["CodeTask", "answer_code", "humaneval_pass", "reward"]
