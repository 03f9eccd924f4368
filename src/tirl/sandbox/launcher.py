"""Start one sandbox's isolation wrapper from a root trainer: join cgroups, expose Python, drop to a uid.

Standalone (standard library only), run as `python -I -S launcher.py '<json>'` with:
  {"cgroups": [dirs], "uid": int | null, "expose": {path: blocking ancestor}, "argv": [command ...]}

1. Join the sandbox's cgroups, so that nothing of the sandbox ever runs outside them.
2. When `expose` is set (Python lives under a directory the sandbox uid cannot traverse, such as
   /root), enter a private mount namespace, cover that directory with an empty tmpfs there (hiding
   everything else in it) and bind-mount each path read-only back at its own place. The host's
   mounts are not touched.
3. Drop every privilege for good: no supplementary groups, real/effective/saved uid and gid set to
   the sandbox's dedicated uid, no_new_privs; then exec the command (bubblewrap, or the worker).
Any failure exits with status 97 and one line on stderr saying what failed.
"""

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429  # the same number on every architecture (since Linux 5.2)
AT_FDCWD, AT_RECURSIVE, OPEN_TREE_CLONE, O_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH = -100, 0x8000, 1, 0o2000000, 4

libc = ctypes.CDLL(None, use_errno=True)


def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     data and data.encode()), f"mount {source} on {target}")


def expose(paths):
    """Make each path (host path -> the ancestor the sandbox uid cannot traverse) reachable again.

    The paths are cloned as detached mounts (open_tree) before their ancestors are covered, then
    attached back at their own places (move_mount): Linux 5.2+.
    """
    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    trees = {}
    for path in paths:
        fd = libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | AT_RECURSIVE | O_CLOEXEC)
        check(0 if fd >= 0 else -1, f"open_tree {path}")
        trees[path] = fd
    for ancestor in sorted(set(paths.values()), key=len):
        mount("tirl-expose", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path, fd in trees.items():
        os.makedirs(path, mode=0o755, exist_ok=True)
        check(libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, path.encode(), MOVE_MOUNT_F_EMPTY_PATH),
              f"move_mount {path}")
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)


def main():
    spec = json.loads(sys.argv[1])
    try:
        for directory in spec.get("cgroups", []):
            with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if spec.get("expose"):
            expose(spec["expose"])
        uid = spec.get("uid")
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        os.execvp(spec["argv"][0], spec["argv"])
    except OSError as e:
        print(f"tirl sandbox launcher: {e}", file=sys.stderr)
        sys.exit(97)


if __name__ == "__main__":
    main()
