"""The seccomp deny-list applied inside bubblewrap sandboxes, compiled once to BPF.

Optional (`pip install 'tirl[sandbox]'` for `pyseccomp`, which uses the system's libseccomp): the
namespaces already remove the network and every host process from view; the filter also refuses
sockets other than AF_UNIX (so nothing can reach a network even if a namespace were shared),
ptrace, bpf, perf, userfaultfd, io_uring, keyrings, mounts, namespace changes and kernel-module or
reboot calls. `clone3` answers ENOSYS so that C libraries fall back to `clone`.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key", "request_key",
    "mount", "umount2", "pivot_root", "unshare", "setns", "open_by_handle_at", "name_to_handle_at",
    "kexec_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff",
    "acct", "quotactl", "syslog", "chroot",
)


def compile_filter() -> bytes | None:
    """The BPF program, or None when `pyseccomp`/libseccomp is not available."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError):
        return None
    filt = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in DENIED:
        try:
            filt.add_rule(sc.ERRNO(errno.EPERM), name)
        except (ValueError, RuntimeError, OSError):
            continue  # a syscall this architecture does not have
    filt.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        data = f.read()
    return data or None


if __name__ == "__main__":  # pragma: no cover - manual check
    print(len(compile_filter() or b""), "bytes", os.uname().machine)
