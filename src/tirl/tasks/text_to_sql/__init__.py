"""Text-to-SQL: generated SQLite databases, questions with gold queries in five levels, and the
`sql_result_match` reward (execution accuracy). Importing it registers the task `text_to_sql` and the
reward; `TASKS` and `REWARDS` import it on first lookup (`tirl.tasks.base.BUILTIN_TASK_MODULES`).
Schemas, question families, reward and measured numbers: README.md beside it."""

from tirl.tasks.text_to_sql.reward import sql_result_match
from tirl.tasks.text_to_sql.task import TextToSQLTask

__all__ = ["TextToSQLTask", "sql_result_match"]
