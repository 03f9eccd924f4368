"""Asynchronous (continuous) batching for the hf engine: each trajectory's turn joins the running batch.

The barrier policy (`batching.py`) runs a batch only when every live trajectory is waiting for a
generation, and hands back every result when the whole batch is done: a trajectory whose turn ended
early waits for the batch's longest turn, and its tool runs only after that (batch-synchronous).

Here a worker thread keeps one decode batch going. Between two decode steps it admits the requests
that arrived (prefilled together, then appended to the running KV cache, left-padded to a common
length), and a row whose turn ends is answered at once, so its tool runs while the other rows keep
decoding and its next turn joins the batch as soon as the tool is back. Sampling stays per row
(each row's own seeded generator), so a sample does not depend on which rows shared its batch,
up to floating-point differences of the batch shapes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch

from tirl.backends.base import Completion, GenerationRequest
from tirl.backends.hf_engine import HFEngine, _GrowingLayer, _Row, new_cache


@dataclass
class _Batch:
    """The running decode batch: rows aligned with the batch dimension of every tensor."""

    rows: list[_Row]
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future] | None]
    cache: object
    attn: torch.Tensor
    """(B, L) 1 where a row has a real token in cache position l."""
    next_pos: torch.Tensor
    logits: torch.Tensor
    """(B, V) logits for each row's next token."""

    @property
    def live(self) -> int:
        return sum(r.finish is None for r in self.rows)


class ContinuousBatcher:
    """Runs `engine` continuously in a worker thread (see module docstring)."""

    def __init__(self, engine: HFEngine, max_batch_size: int, compact_fraction: float = 0.25):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        for layer in new_cache(engine.model).layers:
            if not isinstance(layer, _GrowingLayer):
                raise ValueError(f"async scheduling needs full-attention cache layers; this model has "
                                 f"{type(layer).__name__}: use backend.scheduling=sync")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.compact_fraction = compact_fraction
        self._queue: list[tuple[GenerationRequest, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="tirl-generate", daemon=True)
        self._thread.start()

    @asynccontextmanager
    async def participant(self) -> AsyncIterator[None]:
        yield  # nothing waits for anybody

    async def submit(self, request: GenerationRequest) -> Completion:
        """Queue a request; it joins the running batch at the next decode step."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation backend is closed")
            self._queue.append((request, loop, fut))
            self._cond.notify()
        return await fut

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        batch: _Batch | None = None
        while True:
            with self._cond:
                while not self._queue and batch is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self._fail(batch, RuntimeError("the generation backend was closed"))
                    return
                room = self.max_batch_size - (batch.live if batch else 0)
                admitted, self._queue = self._queue[:room], self._queue[room:]
            try:
                with torch.no_grad():
                    if admitted:
                        batch = self._admit(batch, admitted)
                    if batch is not None:
                        batch = self._step(batch)
            except BaseException as e:  # noqa: BLE001 - every waiter must learn about the failure
                self._fail(batch, e, admitted)
                batch = None

    def _admit(self, batch: _Batch | None, admitted) -> _Batch | None:
        eng = self.engine
        rows, waiters = [], []
        for request, loop, fut in admitted:
            row = eng._new_row(request)
            if row.budget <= 0:
                row.finish = "length"
                _deliver(loop, fut, row.completion())
                continue
            rows.append(row)
            waiters.append((loop, fut))
        if not rows:
            return batch
        cache = new_cache(eng.model)
        t0 = time.perf_counter()
        logits, attn, next_pos = eng._prefill([r.request.prompt_ids for r in rows], cache)
        eng.stats.prefill_s += time.perf_counter() - t0
        eng.stats.batches += 1
        new = _Batch(rows, waiters, cache, attn, next_pos, logits)
        return new if batch is None else _merge(batch, new)

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token per row, answer the rows that finished, run one decode forward."""
        eng = self.engine
        t0 = time.perf_counter()
        try:
            tokens = eng._sample(batch.rows, batch.logits)
            for k, (row, tok) in enumerate(zip(batch.rows, tokens)):
                if row.finish is None and eng._append(row, tok):
                    loop, fut = batch.waiters[k]
                    _deliver(loop, fut, row.completion())
                    batch.waiters[k] = None
            live = batch.live
            if live == 0:
                return None
            if len(batch.rows) - live >= self.compact_fraction * len(batch.rows):
                tokens = _compact(batch, tokens)
            eng.stats.decode_steps += 1
            step_ids = torch.tensor(tokens, device=eng.device).unsqueeze(1)
            batch.attn = torch.cat([batch.attn, batch.attn.new_ones(batch.attn.shape[0], 1)], dim=1)
            out = eng.model(input_ids=step_ids, attention_mask=batch.attn, position_ids=batch.next_pos.unsqueeze(1),
                            past_key_values=batch.cache, use_cache=True)
            batch.next_pos = batch.next_pos + 1
            batch.logits = out.logits[:, -1].float()
            return batch
        finally:
            eng.stats.decode_s += time.perf_counter() - t0

    def _fail(self, batch: _Batch | None, error: BaseException, admitted=()) -> None:
        waiters = [w for w in (batch.waiters if batch else []) if w is not None]
        waiters += [(loop, fut) for _, loop, fut in admitted]
        with self._cond:
            if self._closed:
                waiters += [(loop, fut) for _, loop, fut in self._queue]
                self._queue = []
        for loop, fut in waiters:
            _deliver(loop, fut, error=error)


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """`b`'s rows appended to `a`'s, both right-aligned in the cache and attention mask."""
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.append_rows(lb)
    n = max(a.attn.shape[1], b.attn.shape[1])
    attn = torch.cat([_pad_left(a.attn, n), _pad_left(b.attn, n)], dim=0)
    return _Batch(a.rows + b.rows, a.waiters + b.waiters, a.cache, attn,
                  torch.cat([a.next_pos, b.next_pos]), torch.cat([a.logits, b.logits]))


def _compact(batch: _Batch, tokens: list[int]) -> list[int]:
    """Drop finished rows, and the leading cache positions no remaining row attends to."""
    keep = [k for k, r in enumerate(batch.rows) if r.finish is None]
    idx = torch.tensor(keep, device=batch.attn.device)
    batch.cache.batch_select_indices(idx)
    batch.attn, batch.next_pos, batch.logits = batch.attn[idx], batch.next_pos[idx], batch.logits[idx]
    batch.rows = [batch.rows[k] for k in keep]
    batch.waiters = [batch.waiters[k] for k in keep]
    used = (batch.attn.sum(dim=0) > 0).nonzero()
    first = int(used[0]) if len(used) else 0
    if first:
        for layer in batch.cache.layers:
            layer.trim_left(first)
        batch.attn = batch.attn[:, first:]
    return [tokens[k] for k in keep]


def _pad_left(attn: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([attn.new_zeros(attn.shape[0], n - attn.shape[1]), attn], dim=1)


def _deliver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result: Completion | None = None,
             error: BaseException | None = None) -> None:
    def settle() -> None:
        if fut.done():
            return  # cancelled (e.g. by the stall watchdog)
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the event loop is gone; nobody is waiting any more
