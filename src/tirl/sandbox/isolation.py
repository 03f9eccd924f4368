"""Isolation levels and the command line that starts one sandbox at each level.

Levels, strongest first (see `reference` notes in the README's Sandbox section):

- `bwrap` (default): bubblewrap with every namespace (user, pid, net, ipc, uts, mount, cgroup), no
  network, a read-only view of /usr and of the Python installation only, size-limited private /tmp
  and workspace, cleared environment, unprivileged uid, new session, dies with its parent; plus a
  seccomp filter when `pyseccomp` is installed, cgroup memory/pids limits where a cgroup hierarchy
  is writable, and rlimits. When the trainer runs as root, bwrap itself is started under a dedicated
  unprivileged uid per sandbox (bwrap started by root maps the sandbox user onto host root).
- `landlock`: no namespaces; Landlock confines the filesystem (read: the system and Python; write:
  the workspace) and TCP; rlimits; dedicated uid when root. For hosts where user namespaces are
  blocked (Docker's default seccomp profile, Ubuntu 24.04 AppArmor).
- `rlimits`: rlimits, new session, dedicated uid when root, cleared environment. Protects against
  accidents (loops, memory, huge files), not against hostile code: files, network and processes of
  the host stay reachable.
- `none`: a plain child process with a cleared environment. For debugging only.

`probe` starts a real sandbox of the requested level; when it cannot, `SandboxUnavailableError`
names the cause and the fix. Nothing ever falls back to a weaker level by itself.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import site
import sys
import tempfile
from pathlib import Path

from tirl.errors import TirlError

LEVELS = ("bwrap", "landlock", "rlimits", "none")
WORKER = Path(__file__).with_name("worker.py")
LAUNCHER = Path(__file__).with_name("launcher.py")
SANDBOX_WORKER_PATH = "/opt/tirl/worker.py"
SANDBOX_WORKSPACE = "/workspace"
SANDBOX_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/nsswitch.conf")
UID_BASE = 61000
"""Sandbox k of a root trainer runs as uid UID_BASE + k (no login; nothing on the host owns it)."""
SANDBOX_NICE = 5
"""Scheduling niceness of sandboxed code, so that many executions at once do not starve the trainer."""
LANDLOCK_ABI_MIN = 4
"""Landlock ABI that also restricts TCP (kernel 6.7+)."""


class SandboxUnavailableError(TirlError):
    """The requested isolation cannot be set up here. The message names the cause and the fixes."""


_WEAKER = ("or accept weaker isolation explicitly: tools.python.isolation=landlock (no namespaces), "
           "rlimits (accidents only, not hostile code) or none")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox (per session where noted)."""

    memory_mb: int = 1024
    """Memory a session may allocate beyond the preloaded interpreter (rlimit; plus a cgroup where writable)."""
    cpu_s: int = 60
    """CPU seconds a session may use in total (each call also has a wall-clock limit)."""
    file_mb: int = 64
    """Largest file a session may write; also the size of /tmp and of the workspace (tmpfs)."""
    processes: int = 64
    """Processes and threads (pids cgroup where writable, else RLIMIT_NPROC under a dedicated uid)."""
    open_files: int = 256
    max_output_bytes: int = 65536
    """Bytes kept of each of stdout and stderr per call; the rest is read and dropped."""


@dataclasses.dataclass
class LaunchSpec:
    """Everything needed to start sandboxes of one configuration."""

    level: str
    limits: Limits
    preload: tuple[str, ...]
    seccomp_bpf: bytes | None = None
    cgroups: object | None = None  # tirl.sandbox.cgroups.CgroupParent


def python_paths() -> list[str]:
    """Directories the sandboxed interpreter needs (read-only): its installation and site-packages."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for p in site.getsitepackages():
        paths.add(p)
    out = []
    for p in sorted(paths, key=len):
        real = os.path.realpath(p)
        if os.path.isdir(p) and not p.startswith("/usr/") and p != "/usr" and not any(
                p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
        if real != p and os.path.isdir(real) and not real.startswith("/usr/") and real not in out:
            out.append(real)
    return out


def running_as_root() -> bool:
    return os.geteuid() == 0


def worker_options(spec: LaunchSpec, workspace: str, wipe: list[str], pid_namespace: bool) -> dict:
    limits = spec.limits
    session_limits = {"memory_mb": limits.memory_mb, "cpu_s": limits.cpu_s, "file_mb": limits.file_mb,
                      "open_files": limits.open_files}
    if spec.cgroups is None and running_as_root() and spec.level != "none":
        session_limits["processes"] = limits.processes  # per dedicated uid, so it counts only this sandbox
    return {"preload": list(spec.preload), "workspace": workspace, "wipe": wipe, "pid_namespace": pid_namespace,
            "limits": session_limits, "max_output_bytes": limits.max_output_bytes, "parent_death_signal": True,
            "nice": SANDBOX_NICE}


def bwrap_command(spec: LaunchSpec, worker_fd: int, seccomp_fd: int | None) -> list[str]:
    """The bwrap command line (fds: the worker source and the seccomp program)."""
    size = str(spec.limits.file_mb * 2**20)
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
           "--cap-drop", "ALL", "--clearenv", "--uid", "65534", "--gid", "65534",
           "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{name}"):
            cmd += ["--symlink", os.readlink(f"/{name}"), f"/{name}"]
        elif os.path.isdir(f"/{name}"):
            cmd += ["--ro-bind", f"/{name}", f"/{name}"]
    for f in SANDBOX_ETC_FILES:
        if os.path.exists(f):
            cmd += ["--ro-bind", f, f]
    for path in python_paths():
        cmd += ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
            "--perms", "1777", "--size", size, "--tmpfs", SANDBOX_WORKSPACE,
            "--perms", "0444", "--ro-bind-data", str(worker_fd), SANDBOX_WORKER_PATH,
            "--chdir", SANDBOX_WORKSPACE]
    for key, value in sandbox_env(SANDBOX_WORKSPACE).items():
        cmd += ["--setenv", key, value]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    options = worker_options(spec, SANDBOX_WORKSPACE, ["/tmp", SANDBOX_WORKSPACE, "/dev/shm"], pid_namespace=True)
    return cmd + ["--", sys.executable, "-I", SANDBOX_WORKER_PATH, json.dumps(options)]


def blocked_ancestors(paths: list[str]) -> dict[str, str]:
    """{path: its first ancestor that other users cannot traverse} for the paths that have one."""
    out = {}
    for path in paths:
        parts = Path(path).parts
        for k in range(2, len(parts) + 1):
            directory = os.path.join(*parts[:k])
            if not os.stat(directory).st_mode & 0o001:
                out[path] = directory
                break
    return out


def launcher_command(spec: LaunchSpec, slot: int, cgroup_paths: list, inner: list[str]) -> list[str]:
    """The command that joins cgroups, exposes Python and drops to the slot's uid (root trainers),
    then runs `inner`; `inner` alone when there is nothing to do."""
    root = running_as_root() and spec.level != "none"
    if not root and not cgroup_paths:
        return inner
    launch = {"cgroups": [str(p) for p in cgroup_paths], "uid": UID_BASE + slot if root else None,
              "expose": blocked_ancestors(python_paths()) if root else {}, "argv": inner}
    return [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(launch)]


def sandbox_env(home: str) -> dict[str, str]:
    """The whole environment code in a sandbox sees (nothing of the trainer's)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home if home != SANDBOX_WORKSPACE else "/tmp",
            "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def host_command(spec: LaunchSpec, workspace: str) -> list[str]:
    """The worker command line for the levels without namespaces (landlock, rlimits, none)."""
    options = worker_options(spec, workspace, [workspace], pid_namespace=False)
    if spec.level == "landlock":
        options["landlock"] = {"read": ["/usr", "/etc", "/proc", "/dev", *python_paths(),
                                        str(WORKER.parent)], "write": [workspace, "/dev/null"]}
    return [sys.executable, "-I", str(WORKER), json.dumps(options)]


def make_workspace(slot: int, dedicated_uid: bool) -> str:
    """A private host directory for the levels without a mount namespace, owned by the sandbox uid."""
    path = tempfile.mkdtemp(prefix=f"tirl-sandbox-{slot}-")
    if dedicated_uid and running_as_root():
        os.chown(path, UID_BASE + slot, UID_BASE + slot)
    os.chmod(path, 0o700)
    return path


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 when unavailable)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


def check_requirements(level: str) -> None:
    """Cheap checks before a probe: the binaries a level needs; raises `SandboxUnavailableError`."""
    if level not in LEVELS:
        raise SandboxUnavailableError(f"unknown isolation {level!r}; choose one of {', '.join(LEVELS)}")
    needs = {"bwrap": ["bwrap"]}.get(level, [])
    for binary in needs:
        if shutil.which(binary) is None:
            package = {"bwrap": "bubblewrap"}[binary]
            raise SandboxUnavailableError(
                f"isolation={level} needs `{binary}`, which is not installed: apt-get install {package} "
                f"(dnf/pacman: {package}); {_WEAKER}")
    if level == "landlock" and landlock_abi() < LANDLOCK_ABI_MIN:
        raise SandboxUnavailableError(
            f"isolation=landlock needs Landlock ABI >= {LANDLOCK_ABI_MIN} (Linux 6.7+ with landlock in the LSM "
            f"list); this kernel offers ABI {landlock_abi()}. Use isolation=bwrap, or rlimits/none knowingly")


def explain_failure(level: str, stderr: str) -> str:
    """Why a sandbox did not start, with the fixes for the known causes."""
    text = stderr.strip()[-600:] or "(no error output)"
    if level == "bwrap" and ("namespace" in text or "Operation not permitted" in text or "setting up uid" in text):
        return (f"bubblewrap could not create its namespaces: {text}\nFixes: user namespaces must be allowed: "
                "Ubuntu 23.10+: an AppArmor profile for bwrap or `sysctl kernel.apparmor_restrict_unprivileged_userns=0`; "
                "Docker: `--security-opt seccomp=unconfined --security-opt apparmor=unconfined`; "
                f"other hosts: `sysctl user.max_user_namespaces=10000`; {_WEAKER}")
    return f"the isolation={level} sandbox failed to start: {text}"
