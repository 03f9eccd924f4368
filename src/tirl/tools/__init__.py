"""Tools the model can call: the `Tool` contract, `@tool`, `ToolSet` execution and the `TOOLS` registry.

Importing this package registers the built-in tools: `calculator` and the providers whose heavy
dependencies load only when a tool is built (`python`; `search`, `sql`, `mcp`, `remote` when their
modules are present). Configurable tools are built by `build_toolset` from `tools.<name>` settings.
"""

from tirl.tools.base import (
    TOOLS,
    FunctionTool,
    Tool,
    ToolArgumentError,
    TransientToolError,
    error_result,
    get_tools,
    register_tool,
    tool,
)
from tirl.tools.calculator import calculator, evaluate
from tirl.tools import python as _python  # noqa: F401  (registers the configurable tools)
from tirl.tools import search as _search  # noqa: F401
from tirl.tools import sql as _sql  # noqa: F401
from tirl.tools import mcp as _mcp  # noqa: F401
from tirl.tools import remote as _remote  # noqa: F401
from tirl.tools.providers import ToolProvider, ToolSettings, build_toolset, check_toolset, register_provider
from tirl.tools.toolset import ExecutionPolicy, ToolSet

__all__ = [
    "TOOLS",
    "ExecutionPolicy",
    "FunctionTool",
    "Tool",
    "ToolArgumentError",
    "ToolProvider",
    "ToolSet",
    "ToolSettings",
    "TransientToolError",
    "build_toolset",
    "calculator",
    "check_toolset",
    "error_result",
    "evaluate",
    "get_tools",
    "register_provider",
    "register_tool",
    "tool",
]
