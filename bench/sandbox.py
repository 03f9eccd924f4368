"""Executions per second of the python tool against a fresh `subprocess.run([python, -c, code])` per call.

    python bench/sandbox.py [--seconds 10] [--workers 2]

Both run side by side in this one process, `--workers` concurrent callers each, for a trivial
snippet and for one that uses numpy. tirl runs at its default (bubblewrap isolation, persistent
interpreters with math/numpy/sympy preloaded): each worker holds one session, as a trajectory does.
Also printed: tirl's stateless mode (a fresh forked interpreter per call) and a new session per call
(what the first call of every trajectory costs). The baseline has no isolation at all.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

from tirl.tools import build_toolset
from tirl.types import ToolCall

SNIPPETS = {
    "trivial": "print(1 + 1)",
    "numpy": "import numpy as np\nprint(np.arange(10).sum())",
}


async def baseline(code: str, seconds: float, workers: int) -> float:
    """Fresh interpreter per call (what most RL repositories do), `workers` at a time."""
    async def worker() -> int:
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=subprocess.PIPE)
            await proc.communicate()
            n += 1
        return n
    counts = await asyncio.gather(*(worker() for _ in range(workers)))
    return sum(counts) / seconds


async def tirl_rate(tools, code: str, seconds: float, workers: int, per_call_session: bool) -> float:
    call = ToolCall("b", "python", {"code": code})

    async def worker() -> int:
        n, end = 0, time.monotonic() + seconds
        view = tools.session()
        while time.monotonic() < end:
            result = await view.execute(call)
            assert result.ok, result.content
            n += 1
            if per_call_session:
                await view.aclose()
                view = tools.session()
        await view.aclose()
        return n
    counts = await asyncio.gather(*(worker() for _ in range(workers)))
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    persistent = build_toolset(["python"])
    stateless = build_toolset(["python"], {"python": {"mode": "stateless"}})
    print(f"{args.workers} concurrent workers, {args.seconds:g} s per measurement; executions per second\n")
    print(f"{'snippet':<9} {'fresh subprocess':>17} {'tirl default':>13} {'ratio':>7} {'tirl stateless':>15} "
          f"{'new session/call':>17}")
    for name, code in SNIPPETS.items():
        base = asyncio.run(baseline(code, args.seconds, args.workers))
        ours = asyncio.run(tirl_rate(persistent, code, args.seconds, args.workers, per_call_session=False))
        fresh = asyncio.run(tirl_rate(stateless, code, args.seconds, args.workers, per_call_session=False))
        new = asyncio.run(tirl_rate(persistent, code, args.seconds, args.workers, per_call_session=True))
        print(f"{name:<9} {base:>17.1f} {ours:>13.1f} {ours / base:>6.1f}x {fresh:>15.1f} {new:>17.1f}")
    asyncio.run(persistent.shutdown())
    asyncio.run(stateless.shutdown())


if __name__ == "__main__":
    main()
