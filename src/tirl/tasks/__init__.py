"""Tasks (problem families with gold answers), registered in `TASKS`; importing this package registers the built-ins."""

from tirl.tasks import arithmetic
from tirl.tasks.arithmetic import ArithmeticTask
from tirl.tasks.base import TASKS, Problem, Task

__all__ = ["TASKS", "ArithmeticTask", "Problem", "Task", "arithmetic"]
