"""BFCL v4 function calling: the `function_calling` task and the rewards `bfcl`, `bfcl_ast`, `bfcl_multi_turn`.

Importing this package registers them; `TASKS` and `REWARDS` import it on their first lookup (it is one
of `tirl.tasks.base.BUILTIN_TASK_MODULES`).
"""

from tirl.tasks.bfcl import rewards  # noqa: F401  (registers bfcl, bfcl_ast, bfcl_multi_turn)
from tirl.tasks.bfcl.task import DEFAULT_CATEGORIES, FunctionCallingTask

__all__ = ["DEFAULT_CATEGORIES", "FunctionCallingTask"]
