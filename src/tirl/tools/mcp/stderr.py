"""A stdio MCP server's stderr: read in the connection's event loop, its latest lines kept for errors.

End of file on the pipe means the server exited (or closed its stderr); the owner is told then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

logger = logging.getLogger(__package__)  # one logger for the whole package

STDERR_TAIL_CHARS = 2000
"""Characters of a stdio server's latest stderr output kept for error messages."""
ERROR_STDERR_CHARS = 600
"""Characters of that tail quoted in an error."""


class StderrTail(asyncio.Protocol):
    """A stdio server's stderr: read through a pipe in the loop, logged at DEBUG, the latest output kept.

    End of file means the server exited (or closed its stderr): `on_eof` is called then.
    """

    def __init__(self, target: str, on_eof: Any):
        self.target, self.on_eof = target, on_eof
        self.read_fd, self.write_fd = os.pipe()
        self._buffer = bytearray()
        self._transport: asyncio.ReadTransport | None = None
        self._eof = asyncio.Event()

    async def start(self) -> None:
        pipe = os.fdopen(self.read_fd, "rb", buffering=0)
        self._transport, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: self, pipe)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        del self._buffer[:-STDERR_TAIL_CHARS]
        for line in data.decode(errors="replace").splitlines():
            logger.debug("MCP server %s: %s", self.target, line)

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof.set()
        self.on_eof()

    def tail(self) -> str:
        """The last lines written, joined with ' | ', at most `ERROR_STDERR_CHARS` characters."""
        lines = [line.strip() for line in self._buffer.decode(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines)[-ERROR_STDERR_CHARS:]

    def close_write_end(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    async def aclose(self) -> None:
        """Read what the exited server wrote last (up to 1 s), then close the pipe."""
        self.close_write_end()
        if self._transport is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._eof.wait()
            self._transport.close()
        elif self.read_fd >= 0:
            os.close(self.read_fd)
        self.read_fd = -1
