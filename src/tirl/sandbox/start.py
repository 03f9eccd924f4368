"""`start_pool`: check the requested isolation, start one real sandbox as a probe, warn loudly if weak."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import sys

from tirl.sandbox import cgroups, seccomp
from tirl.sandbox.isolation import LaunchSpec, Limits, SandboxUnavailableError, check_requirements
from tirl.sandbox.pool import SandboxPool

WEAK_LEVELS = {
    "landlock": "no namespaces: processes that detach survive unless a cgroup or dedicated uid catches them",
    "rlimits": "NOT a security boundary: model code can read host files, reach the network and signal processes",
    "none": "NO isolation at all: model code runs with the trainer's permissions",
}


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """How model-written code is run."""

    isolation: str = "bwrap"
    """bwrap (default), landlock, rlimits or none; never changed behind the user's back."""
    limits: Limits = Limits()
    preload: tuple[str, ...] = ("math", "numpy", "sympy")
    """Modules imported once per sandbox, so that cells using them start in milliseconds."""
    max_sandboxes: int | None = None
    """Cap on sandboxes alive at once (each holds one session at a time); None: one per open session."""
    seccomp: bool = True
    """Add the seccomp filter (bwrap only) when `pyseccomp` is installed."""
    start_timeout_s: float = 60.0


def start_pool(config: SandboxConfig) -> SandboxPool:
    """A pool whose first sandbox is started and checked now.

    Raises `SandboxUnavailableError` (naming the cause and the fix) when the requested isolation
    cannot be set up; prints a loud warning for the weaker levels.
    """
    check_requirements(config.isolation)
    bpf = seccomp.compile_filter() if config.seccomp and config.isolation == "bwrap" else None
    if config.seccomp and config.isolation == "bwrap" and bpf is None:
        print("tirl sandbox: pyseccomp is not installed; running bubblewrap without its seccomp filter "
              "(pip install 'tirl[sandbox]')", file=sys.stderr)
    spec = LaunchSpec(config.isolation, config.limits, tuple(config.preload), bpf,
                      cgroups.find_cgroups() if config.isolation != "none" else None)
    pool = SandboxPool(spec, config.max_sandboxes, config.start_timeout_s)
    _run_now(_probe(pool, config))
    if config.isolation in WEAK_LEVELS:
        banner = f"WARNING: python tool isolation={config.isolation}: {WEAK_LEVELS[config.isolation]}"
        print(f"\n{'!' * len(banner)}\n{banner}\n{'!' * len(banner)}\n", file=sys.stderr)
    return pool


def _run_now(coro) -> None:
    """Run a coroutine to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        executor.submit(asyncio.run, coro).result()


async def _probe(pool: SandboxPool, config: SandboxConfig) -> None:
    sb = await pool.acquire(None)
    failed = getattr(sb, "failed_preloads", {})
    if failed:
        pool.close()
        name, error = next(iter(failed.items()))
        raise SandboxUnavailableError(f"preloading {name!r} in the sandbox failed ({error}); install it or remove "
                                      f"it from tools.python.preload")
    result = await sb.execute("1 + 1", fresh=True, timeout_s=30)
    if result.status != "ok" or result.value != "2":
        pool.close()
        raise SandboxUnavailableError(f"the isolation={config.isolation} sandbox started but could not run "
                                      f"`1 + 1`: {result.error or result}")
    await pool.release(sb, needs_reset=False)
