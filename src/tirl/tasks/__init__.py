"""Tasks (problem families with gold answers), registered in `TASKS`; importing this package registers the built-ins."""

# Task-suite modules (math_python, search_qa, text_to_sql, code, dataset, bfcl, ...) are NOT imported here:
# they import tirl.rewards, whose base module imports tirl.tasks.base, so an import here is a cycle. List
# them in `BUILTIN_TASK_MODULES` (tirl/tasks/base.py) instead: TASKS and REWARDS import them on first lookup.
from tirl.tasks import arithmetic
from tirl.tasks.arithmetic import ArithmeticTask
from tirl.tasks.base import TASKS, Problem, Task

__all__ = ["TASKS", "ArithmeticTask", "Problem", "Task", "arithmetic"]
