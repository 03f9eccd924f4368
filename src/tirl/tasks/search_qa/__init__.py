"""The `search_qa` task: single- and multi-hop questions answered by searching English Wikipedia summaries.

Importing this package registers the task; `TASKS` imports it on its first lookup
(`tirl.tasks.base.BUILTIN_TASK_MODULES`). Question generation, rewards and measured numbers: README.md
beside it.
"""

from tirl.tasks.search_qa.corpus import Article, corpus_file, load_articles, read_corpus, source_path
from tirl.tasks.search_qa.env import SearchR1Env
from tirl.tasks.search_qa.questions import KINDS, Candidate, QuestionBank
from tirl.tasks.search_qa.task import FORMATS, SearchQATask

__all__ = ["Article", "Candidate", "FORMATS", "KINDS", "QuestionBank", "SearchQATask", "SearchR1Env", "corpus_file",
           "load_articles", "read_corpus", "source_path"]
