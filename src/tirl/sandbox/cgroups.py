"""Per-sandbox cgroups (memory and pids) where a hierarchy is writable; rlimits cover the rest.

Supported: cgroup v1 `memory` and `pids` hierarchies that this process may create children in (as
root on most hosts), and a cgroup v2 directory delegated to us through `TIRL_CGROUP` (a directory
whose `cgroup.subtree_control` already enables `memory` and `pids`, e.g. made with
`systemd-run --user --scope -p Delegate=yes`). Without either, `find_cgroups` returns None and the
sandbox relies on rlimits alone (RLIMIT_AS for memory, RLIMIT_NPROC under a dedicated uid).

Each sandbox gets its own group, `<parent>/tirl-<trainer pid>/sb<k>`; its first process joins it
before exec'ing the isolation wrapper (`join_prefix`), so nothing in the sandbox runs outside it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup")


class CgroupParent:
    """The per-trainer directory (one per controller hierarchy) under which sandbox groups are made."""

    def __init__(self, dirs: dict[str, Path], version: int):
        self.dirs = dirs
        """{controller: this trainer's directory in that controller's hierarchy}."""
        self.version = version
        atexit.register(self.remove)

    def create(self, name: str, memory_bytes: int, max_pids: int) -> list[Path]:
        """Make the groups of one sandbox with its limits; returns the directories to join."""
        made = []
        for controller, parent in self.dirs.items():
            path = parent / name
            path.mkdir(exist_ok=True)
            if controller == "memory":
                _write(path / ("memory.limit_in_bytes" if self.version == 1 else "memory.max"), memory_bytes)
                if self.version == 2:
                    _write(path / "memory.swap.max", 0, missing_ok=True)
            else:
                _write(path / "pids.max", max_pids)
            made.append(path)
        if self.version == 2:
            return made[:1]  # one unified group holds both controllers
        return made

    def destroy(self, paths: list[Path]) -> None:
        """Kill what is left in the groups and remove them (best effort)."""
        for path in paths:
            _kill_members(path)
            with contextlib.suppress(OSError):
                path.rmdir()

    def remove(self) -> None:
        for parent in self.dirs.values():
            for child in parent.glob("sb*"):
                self.destroy([child])
            with contextlib.suppress(OSError):
                parent.rmdir()


def _write(path: Path, value: int, missing_ok: bool = False) -> None:
    try:
        path.write_text(str(value))
    except FileNotFoundError:
        if not missing_ok:
            raise


def _kill_members(path: Path) -> None:
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        with contextlib.suppress(OSError):
            kill_file.write_text("1")
            return
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), 9)


def _own_v1_path(controller: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return path
    return None


def find_cgroups() -> CgroupParent | None:
    """A writable place for per-sandbox memory and pids groups, or None."""
    delegated = os.environ.get("TIRL_CGROUP")
    if delegated:
        parent = Path(delegated)
        enabled = (parent / "cgroup.subtree_control").read_text().split() if parent.is_dir() else []
        if {"memory", "pids"} <= set(enabled):
            mine = parent / f"tirl-{os.getpid()}"
            with contextlib.suppress(OSError):
                mine.mkdir(exist_ok=True)
                _write(mine / "cgroup.subtree_control", "+memory +pids")  # type: ignore[arg-type]
                return CgroupParent({"memory": mine, "pids": mine}, version=2)
        return None
    dirs = {}
    for controller in ("memory", "pids"):
        own = _own_v1_path(controller)
        base = V1_ROOT / controller
        if own is None or not (base / "cgroup.procs").exists():
            return None
        mine = base / own.lstrip("/") / f"tirl-{os.getpid()}"
        try:
            mine.mkdir(exist_ok=True)
        except OSError:
            return None
        dirs[controller] = mine
    return CgroupParent(dirs, version=1)


def join_prefix(paths: list[Path]) -> list[str]:
    """A `sh` prefix that moves itself into `paths` and then execs the rest of the command line."""
    if not paths:
        return []
    script = 'for g in "$@"; do [ "$g" = -- ] && break; echo $$ > "$g/cgroup.procs" || exit 97; shift; done; ' \
             'shift; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *[str(p) for p in paths], "--"]
