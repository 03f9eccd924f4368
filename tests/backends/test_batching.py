"""The barrier batcher: waits for every live trajectory, orders by key, propagates failures."""

from __future__ import annotations

import asyncio

import pytest

from tirl.backends.base import Completion, GenerationRequest
from tirl.backends.batching import BarrierBatcher


def _req(key):
    return GenerationRequest((1,), 1, key=key)


def test_waits_for_live_participants_and_orders_by_key():
    seen: list[list[tuple]] = []

    def run(reqs):
        seen.append([r.key for r in reqs])
        return [Completion((r.key[0],), (0.0,), "eos") for r in reqs]

    batcher = BarrierBatcher(run, max_batch_size=8)

    async def trajectory(k, delay):
        async with batcher.participant():
            await asyncio.sleep(delay)  # e.g. a tool call: the batch waits for it
            out = await batcher.submit(_req((k,)))
            return out.token_ids[0]

    async def main():
        return await asyncio.gather(trajectory(2, 0.0), trajectory(0, 0.05), trajectory(1, 0.0))

    assert asyncio.run(main()) == [2, 0, 1]
    assert seen == [[(0,), (1,), (2,)]]


def test_trajectories_started_together_share_the_first_batch():
    """Trajectories that submit in their first step (no await before) must not run one by one: the
    first one to submit would otherwise find itself the only live participant."""
    seen: list[int] = []

    def run(reqs):
        seen.append(len(reqs))
        return [Completion((1,), (0.0,), "eos") for _ in reqs]

    batcher = BarrierBatcher(run, max_batch_size=64)

    async def trajectory(k):
        async with batcher.participant():
            await batcher.submit(_req((k, 0)))
            await batcher.submit(_req((k, 1)))

    async def main():
        await asyncio.gather(*(trajectory(k) for k in range(32)))

    asyncio.run(main())
    assert seen == [32, 32]


def test_chunks_to_max_batch_size():
    sizes = []

    def run(reqs):
        sizes.append(len(reqs))
        return [Completion((), (), "eos") for _ in reqs]

    batcher = BarrierBatcher(run, max_batch_size=2)

    async def main():
        await asyncio.gather(*(batcher.submit(_req((i,))) for i in range(5)))

    asyncio.run(main())
    assert sum(sizes) == 5 and max(sizes) <= 2


def test_engine_failure_reaches_every_waiter():
    def run(reqs):
        raise RuntimeError("engine broke")

    batcher = BarrierBatcher(run, max_batch_size=4)

    async def main():
        return await asyncio.gather(batcher.submit(_req((0,))), batcher.submit(_req((1,))), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)


def test_rejects_bad_batch_size():
    with pytest.raises(ValueError):
        BarrierBatcher(lambda r: [], 0)
