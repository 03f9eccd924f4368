"""Collects generation requests of concurrently running trajectories into batches.

Barrier policy: a batch runs when every live trajectory (one that holds `participant()`) is waiting
for a generation; trajectories busy in tools are waited for. With tools that finish quickly this
is the fastest policy on CPU, and it is deterministic: the same requests always form the same batch,
in `GenerationRequest.key` order, so a seeded run reproduces exactly. The engine runs in one
long-lived worker thread, so the event loop keeps serving tools while it computes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from tirl.backends.base import Completion, GenerationRequest

RunBatch = Callable[[Sequence[GenerationRequest]], list[Completion]]


class BarrierBatcher:
    """Runs `run_batch` on batches of at most `max_batch_size` requests (see module docstring)."""

    def __init__(self, run_batch: RunBatch, max_batch_size: int):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self._pending: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._live = 0
        self._running = False
        self._check_scheduled = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tirl-generate")
        self.batches_run = 0
        """Number of engine batches run so far (for metrics and tests)."""

    @asynccontextmanager
    async def participant(self) -> AsyncIterator[None]:
        """Held by a trajectory for its whole life."""
        self._live += 1
        try:
            yield
        finally:
            self._live -= 1
            self._maybe_flush()

    async def submit(self, request: GenerationRequest) -> Completion:
        """Queue a request and wait for its completion."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((request, fut))
        self._maybe_flush()
        return await fut

    def _maybe_flush(self) -> None:
        # Decide on the next turn of the event loop, not now: trajectories started together (one
        # `gather`) all register before the first of them is looked at, so the first batch is
        # never just the first trajectory.
        if not self._check_scheduled:
            self._check_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_if_ready)

    def _flush_if_ready(self) -> None:
        self._check_scheduled = False
        if self._running or not self._pending or len(self._pending) < self._live:
            return
        batch = sorted(self._pending, key=lambda p: p[0].key)
        self._pending = []
        self._running = True
        asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[GenerationRequest, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            for i in range(0, len(batch), self.max_batch_size):
                chunk = batch[i:i + self.max_batch_size]
                outs = await loop.run_in_executor(self._executor, self._run_batch, [r for r, _ in chunk])
                self.batches_run += 1
                for (_, fut), out in zip(chunk, outs):
                    if not fut.done():
                        fut.set_result(out)
        except BaseException as e:  # noqa: BLE001 - every waiter must learn about the failure
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
        finally:
            self._running = False
            self._maybe_flush()

    def close(self) -> None:
        """Stop the worker thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)
