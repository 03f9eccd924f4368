"""Asynchronous (continuous) batching for the hf engine: each trajectory's turn joins the running batch.

The barrier policy (`batching.py`) runs a batch only when every live trajectory is waiting for a
generation, and hands back every result when the whole batch is done: a trajectory whose turn ended
early waits for the batch's longest turn, and its tool runs only after that (batch-synchronous).

Here a worker thread keeps one decode batch going. Between two decode steps it admits the requests
that arrived (prefilled together, then appended to the running KV cache, left-padded to a common
length), and a row whose turn ends is answered at once, so its tool runs while the other rows keep
decoding and its next turn joins the batch as soon as the tool is back. The cache keeps spare rows
and positions (`_SlotLayer`), so joining and leaving copy only the rows concerned. Sampling stays per row
(each row's own seeded generator), so a sample does not depend on which rows shared its batch,
up to floating-point differences of the batch shapes.

A turn's KV cache outlives the turn (the engine's `KVStore`, see `hf_engine`): the trajectory's next
turn prefills only its last sampled token and the observation on top of it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tirl.backends.base import Completion, GenerationRequest
from tirl.models.loading import with_cache
from tirl.backends.hf_engine import HFEngine, _GrowingLayer, _pad_left, _Row, new_cache


class _SlotLayer(DynamicLayer):
    """A cache layer with spare rows and positions, so that rows join, leave and lose their leading
    padding without copying the whole batch: rows [0, n) of the buffers hold the batch, positions
    [start, end) its cache (each row right-aligned, left-padded with zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self._k = self._v = None
        self.n = self.start = self.end = 0

    def update(self, key_states, value_states, *args, **kwargs):
        add = key_states.shape[-2]
        if self.end + add > self._k.shape[2]:
            self._realloc(self._k.shape[0], left_room=0)
        self._k[:self.n, :, self.end:self.end + add] = key_states
        self._v[:self.n, :, self.end:self.end + add] = value_states
        self.end += add
        self._refresh()
        return self.keys, self.values

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows whose cache is `keys`/`values` (b, H, L, D), right-aligned with the others."""
        b, length = keys.shape[0], keys.shape[2]
        if self._k is None:
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self._k = keys.new_zeros(max(8, 2 * b), keys.shape[1], 2 * length + 64, keys.shape[3])
            self._v = torch.zeros_like(self._k)
            self.start = self.end = length + 32
        cur = self.end - self.start
        if self.n + b > self._k.shape[0] or length > self.end:
            self._realloc(max(self._k.shape[0], 2 * (self.n + b)), left_room=max(0, length - cur) + 32)
        if length > cur:  # the batch's existing rows get more left padding
            new_start = self.end - length
            self._k[:self.n, :, new_start:self.start] = 0
            self._v[:self.n, :, new_start:self.start] = 0
            self.start = new_start
        rows = slice(self.n, self.n + b)
        self._k[rows, :, self.start:self.end - length] = 0
        self._v[rows, :, self.start:self.end - length] = 0
        self._k[rows, :, self.end - length:self.end] = keys
        self._v[rows, :, self.end - length:self.end] = values
        self.n += b
        self._refresh()

    def remove_rows(self, keep: list[int]) -> list[int]:
        """Keep rows `keep` (sorted), moving the last ones into the gaps; returns the new row order
        (new row i is old row order[i])."""
        n_keep = len(keep)
        kept = set(keep)
        holes = [i for i in range(n_keep) if i not in kept]
        sources = [j for j in keep if j >= n_keep]
        if holes:
            span = slice(self.start, self.end)
            self._k[holes, :, span] = self._k[sources, :, span]
            self._v[holes, :, span] = self._v[sources, :, span]
        order = list(range(n_keep))
        for h, src in zip(holes, sources):
            order[h] = src
        self.n = n_keep
        self._refresh()
        return order

    def trim_left(self, columns: int) -> None:
        self.start += columns
        self._refresh()

    def _realloc(self, rows: int, left_room: int) -> None:
        length = self.end - self.start
        k = self._k.new_zeros(rows, self._k.shape[1], left_room + 2 * length + 64, self._k.shape[3])
        v = torch.zeros_like(k)
        k[:self.n, :, left_room:left_room + length] = self._k[:self.n, :, self.start:self.end]
        v[:self.n, :, left_room:left_room + length] = self._v[:self.n, :, self.start:self.end]
        self._k, self._v, self.start, self.end = k, v, left_room, left_room + length

    def _refresh(self) -> None:
        self.keys = self._k[:self.n, :, self.start:self.end]
        self.values = self._v[:self.n, :, self.start:self.end]


def _slot_cache(model) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    cache.layers = [_SlotLayer() for _ in cache.layers]
    return cache


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
        self.engine.kept.clear()
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
        """Prefill the admitted requests (fresh ones together, those with a kept cache together) and
        append them to the running batch."""
        eng = self.engine
        fresh, resumed = [], []
        for request, loop, fut in admitted:
            row = eng._new_row(request)
            if row.budget <= 0:
                row.finish = "length"
                _deliver(loop, fut, row.completion())
                continue
            kept = eng.kept.take(request)
            (resumed if kept else fresh).append((row, (loop, fut), kept))
        parts = []
        t0 = time.perf_counter()
        if fresh:
            cache = new_cache(eng.model)
            logits, attn, next_pos = eng._prefill([r.request.prompt_ids for r, _, _ in fresh], cache)
            parts.append(_Batch([r for r, _, _ in fresh], [w for _, w, _ in fresh], cache, attn, next_pos, logits))
        if resumed:
            cache, attn, next_pos, logits = eng.resume([(r, k) for r, _, k in resumed])
            parts.append(_Batch([r for r, _, _ in resumed], [w for _, w, _ in resumed], cache, attn, next_pos, logits))
        eng.stats.prefill_s += time.perf_counter() - t0
        eng.stats.batches += len(parts)
        for part in parts:
            if batch is None:
                batch = _Batch([], [], _slot_cache(eng.model), part.attn.new_zeros(0, part.attn.shape[1]),
                               part.next_pos.new_zeros(0), part.logits.new_zeros(0, part.logits.shape[1]))
            batch = _merge(batch, part)
        return batch

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token per row, answer the rows that finished, run one decode forward."""
        eng = self.engine
        t0 = time.perf_counter()
        try:
            tokens = eng._sample(batch.rows, batch.logits)
            for k, (row, tok) in enumerate(zip(batch.rows, tokens)):
                if row.finish is None and eng._append(row, tok):
                    eng.keep(row, batch.attn[k], batch.cache, k)
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
                            use_cache=True, **with_cache(eng.model, batch.cache))
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
    """`b`'s rows (a fresh prefill cache) appended to `a`'s slot cache, both right-aligned."""
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.add_rows(lb.keys, lb.values)
    n = max(a.attn.shape[1], b.attn.shape[1])
    attn = torch.cat([_pad_left(a.attn, n), _pad_left(b.attn, n)], dim=0)
    return _Batch(a.rows + b.rows, a.waiters + b.waiters, a.cache, attn,
                  torch.cat([a.next_pos, b.next_pos]), torch.cat([a.logits, b.logits]))


def _compact(batch: _Batch, tokens: list[int]) -> list[int]:
    """Drop finished rows (the last rows move into their slots), and the leading cache positions no
    remaining row attends to; returns `tokens` in the new row order."""
    keep = [k for k, r in enumerate(batch.rows) if r.finish is None]
    order = [layer.remove_rows(keep) for layer in batch.cache.layers][0]
    idx = torch.tensor(order, device=batch.attn.device)
    batch.attn, batch.next_pos, batch.logits = batch.attn[idx], batch.next_pos[idx], batch.logits[idx]
    batch.rows = [batch.rows[k] for k in order]
    batch.waiters = [batch.waiters[k] for k in order]
    used = (batch.attn.sum(dim=0) > 0).nonzero()
    first = int(used[0]) if len(used) else 0
    if first:
        for layer in batch.cache.layers:
            layer.trim_left(first)
        batch.attn = batch.attn[:, first:]
    return [tokens[k] for k in order]


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
