"""`SearchR1Env`: a `ToolEnv` for Search-R1's tags, `<search>query</search>` in, `<information>` out."""

from __future__ import annotations

from tirl.chat.search_r1 import CLOSE, parse_search_calls
from tirl.envs.tool_env import ToolEnv, ToolLimits
from tirl.tasks.base import Problem
from tirl.tools.toolset import ToolSet


class SearchR1Env(ToolEnv):
    """Reads every `<search>` block as a call of the `search` tool and stops generation at `</search>`.

    It shows the model no tool schemas: the system prompt explains the tags (a Hermes tool block would
    ask for `<tool_call>` JSON instead). The search tool's `output_format: search_r1` wraps results in
    `<information>...</information>`; the chat format inserts them as a tool turn.
    """

    def __init__(self, problem: Problem, system_prompt: str, tools: ToolSet, limits: ToolLimits = ToolLimits()):
        super().__init__(problem, system_prompt, tools, limits, parser=parse_search_calls, stop_strings=(CLOSE,))

    @property
    def tool_schemas(self) -> list[dict]:
        return []
