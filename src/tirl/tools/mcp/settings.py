"""Settings of the `mcp` provider (`tools.mcp.<key>`), checked before any server is started.

Exactly one of `command` (a stdio server; its executable must be found on PATH or relative to `cwd`)
and `url` (a streamable HTTP server) is set; `env`/`cwd` go with `command`, `headers` with `url`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pydantic

from tirl.tools.providers import ToolSettings


class MCPSettings(ToolSettings):
    """Settings of the `mcp` tool (`tools.mcp.<key>`): exactly one of `command` and `url`."""

    url: str | None = pydantic.Field(None, description="Streamable HTTP endpoint, e.g. http://127.0.0.1:8000/mcp.")
    headers: dict[str, str] | None = pydantic.Field(None, description="HTTP headers of every request (url only).")
    cwd: str | None = pydantic.Field(None, description="Working directory of the stdio server (command only).")
    env: dict[str, str] | None = pydantic.Field(
        None, description="Environment variables of the stdio server, over the SDK's safe defaults (HOME, PATH, ...).")
    command: list[str] | None = pydantic.Field(None, description="The stdio server's command line: executable, args.")
    startup_timeout_s: float = pydantic.Field(30.0, gt=0, description="Seconds to connect, initialize and list tools.")
    prefix: str = pydantic.Field("", pattern=r"^[A-Za-z0-9_-]{0,63}$",
                                 description="Prepended to every server tool name (letters, digits, '_', '-').")
    include: list[str] | None = pydantic.Field(None, description="Server tool names to use (default: all).")
    exclude: list[str] = pydantic.Field([], description="Server tool names to leave out.")

    @pydantic.field_validator("cwd")
    @classmethod
    def _cwd_exists(cls, cwd: str | None) -> str | None:
        if cwd is not None and not Path(cwd).is_dir():
            raise ValueError(f"directory {cwd!r} does not exist")
        return cwd

    @pydantic.field_validator("command")
    @classmethod
    def _command_runs(cls, command: list[str] | None, info: pydantic.ValidationInfo) -> list[str] | None:
        if command is None:
            return None
        if not command or not command[0]:
            raise ValueError("must name an executable, e.g. [python, server.py]")
        if _find_executable(command[0], info.data.get("cwd"), info.data.get("env")) is None:
            raise ValueError(f"executable {command[0]!r} not found (PATH, or relative to cwd)")
        return command

    @pydantic.field_validator("url")
    @classmethod
    def _url_is_http(cls, url: str | None) -> str | None:
        if url is not None and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url

    @pydantic.model_validator(mode="after")
    def _one_server(self) -> MCPSettings:
        if (self.command is None) == (self.url is None):
            raise ValueError("set exactly one of `command` (a stdio server) and `url` (a streamable HTTP server)")
        if self.url is not None and (self.env is not None or self.cwd is not None):
            raise ValueError("`env` and `cwd` apply to a `command` server, not to a `url`")
        if self.command is not None and self.headers is not None:
            raise ValueError("`headers` apply to a `url` server, not to a `command`")
        both = sorted(set(self.include or ()) & set(self.exclude))
        if both:
            raise ValueError(f"tools both included and excluded: {both}")
        return self


def _find_executable(program: str, cwd: str | None, env: dict[str, str] | None) -> str | None:
    """Where the stdio server's executable is, as `subprocess` resolves it (None: nowhere)."""
    if os.sep in program:
        path = Path(cwd or ".") / program
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which(program, path=(env or {}).get("PATH", os.environ.get("PATH")))
