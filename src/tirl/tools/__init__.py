"""Tools the model can call: the `Tool` contract, `@tool`, `ToolSet` execution and the `TOOLS` registry.

Importing this package registers the built-in light tools (currently `calculator`). Tools that need
optional packages live in their own modules and are imported only when used.
"""

from tirl.tools.base import (
    TOOLS,
    FunctionTool,
    Tool,
    ToolArgumentError,
    ToolSet,
    error_result,
    get_tools,
    register_tool,
    tool,
)
from tirl.tools.calculator import calculator, evaluate

__all__ = [
    "TOOLS",
    "FunctionTool",
    "Tool",
    "ToolArgumentError",
    "ToolSet",
    "calculator",
    "error_result",
    "evaluate",
    "get_tools",
    "register_tool",
    "tool",
]
