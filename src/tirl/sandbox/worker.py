"""The process that runs inside a sandbox: a fork server ("zygote") that runs code in forked sessions.

Standalone on purpose: it imports only the standard library (and the modules it is asked to
preload), never `tirl`, because inside the sandbox nothing else of the project is visible. It is
started as `python -I -S worker.py '<json options>'` (site-packages added back from the options).

Protocol with the host, over the zygote's stdin/stdout, one JSON object per line:
  host -> zygote  {"op": "exec", "code": str, "fresh": bool, "timeout_s": float}
                  {"op": "reset"}           end the session: kill its processes, wipe /tmp and the workspace
  zygote -> host  {"event": "ready", "preloaded": [...], "failed": {...}}     once, after start-up
                  {"event": "result", "status": "ok" | "error" | "timeout" | "crashed",
                   "stdout": str, "stderr": str, "value": str | null, "error": str | null,
                   "state_lost": bool, "new_session": bool, "duration_s": float}
                  {"event": "reset"}

A session is a child forked from the zygote (so preloaded modules cost nothing) that keeps its
globals between `exec` requests until a reset; `fresh: true` runs the code in a new session and
resets right after (stateless mode). The zygote enforces the per-call wall-clock limit, caps each
output stream (reading and discarding past the cap, so a flood costs CPU, not memory), and after
a timeout or a crash kills every process of the session, including detached ones: with a pid
namespace it signals every process it can (`kill(-1)`), otherwise it is the sessions' subreaper and
kills every process re-parented to it. The zygote is not dumpable, so session code cannot ptrace it.
"""

import ast
import builtins
import ctypes
import json
import linecache
import os
import resource
import select
import shutil
import signal
import sys
import time
import traceback

PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG = 4, 36, 1
CELL = "<cell>"
MAX_VALUE_CHARS = 10_000
MAX_TRACEBACK_LINES = 12


def _prctl(option, value):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------------
# the session child


def run_cell(code, env):
    """Run `code` in `env` like a notebook cell: (value repr or None, error text or None)."""
    linecache.cache[CELL] = (len(code), None, code.splitlines(True), CELL)
    try:
        tree = ast.parse(code, CELL, "exec")
    except SyntaxError as e:
        return None, "".join(traceback.format_exception_only(type(e), e)).rstrip()
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    try:
        exec(compile(tree, CELL, "exec"), env)
        value = eval(compile(ast.Expression(last.value), CELL, "eval"), env) if last is not None else None
    except BaseException as e:  # noqa: BLE001 - the user's error, reported as text
        return None, short_traceback(e)
    if value is None:
        return None, None
    try:
        text = repr(value)
    except BaseException as e:  # noqa: BLE001
        text = f"<repr failed: {type(e).__name__}: {e}>"
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + f"...[{len(text) - MAX_VALUE_CHARS} more characters]"
    return text, None


def short_traceback(error):
    """The traceback from the cell's frame on (the worker's own frames dropped), at most a few lines."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != CELL:
        tb = tb.tb_next
    lines = "".join(traceback.format_exception(type(error), error, tb)).rstrip().splitlines()
    if len(lines) > MAX_TRACEBACK_LINES:
        lines = lines[:1] + ["  ..."] + lines[-(MAX_TRACEBACK_LINES - 2):]
    return "\n".join(lines)


def session_main(req_r, resp_w, out_w, err_w, limits):
    """Body of a forked session: apply limits, then answer cell requests until told to stop."""
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the session dies with the zygote
    for fd, target in ((out_w, 1), (err_w, 2)):
        os.dup2(fd, target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    apply_limits(limits)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    env = {"__name__": "__main__", "__builtins__": builtins}
    requests = os.fdopen(req_r, "rb")
    for line in requests:
        request = json.loads(line)
        value, error = run_cell(request["code"], env)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a closed or broken stream is the user's doing
                pass
        os.write(resp_w, (json.dumps({"value": value, "error": error}) + "\n").encode())
    os._exit(0)


def apply_limits(limits):
    """rlimits for a session; memory counts from what the zygote already maps."""
    vm_kb = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                vm_kb = int(line.split()[1])
    table = {
        "memory_mb": (resource.RLIMIT_AS, lambda v: vm_kb * 1024 + v * 2**20),
        "cpu_s": (resource.RLIMIT_CPU, lambda v: int(v)),
        "file_mb": (resource.RLIMIT_FSIZE, lambda v: v * 2**20),
        "open_files": (resource.RLIMIT_NOFILE, lambda v: v),
        "processes": (resource.RLIMIT_NPROC, lambda v: v),
    }
    for key, (which, convert) in table.items():
        if limits.get(key) is not None:
            value = convert(limits[key])
            resource.setrlimit(which, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large file is an OSError, not a kill


# ----------------------------------------------------------------------------------------------------
# the zygote


class Zygote:
    """Forks sessions, relays cells to them, enforces wall-clock limits and cleans up after them."""

    def __init__(self, options, proto_in, proto_out):
        self.options = options
        self.proto_in, self.proto_out = proto_in, proto_out
        self.pid_namespace = options.get("pid_namespace", False)
        self.session = None  # (pid, req_w, resp_r, out_r, err_r)

    def send(self, message):
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.proto_out, data):]

    def start_session(self):
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                for fd in (self.proto_in, self.proto_out, req_w, resp_r, out_r, err_r):
                    os.close(fd)
                os.chdir(self.options["workspace"])
                session_main(req_r, resp_w, out_w, err_w, self.options.get("limits", {}))
            finally:
                os._exit(70)
        for fd in (req_r, resp_w, out_w, err_w):
            os.close(fd)
        self.session = (pid, req_w, resp_r, out_r, err_r)

    def execute(self, request):
        new_session = self.session is None or request.get("fresh", False)
        state_lost = False
        if new_session and self.session is not None:
            self.reset()
        if self.session is None:
            self.start_session()
        pid, req_w, resp_r, out_r, err_r = self.session
        cap = self.options.get("max_output_bytes", 65536)
        start = time.monotonic()
        try:
            os.write(req_w, (json.dumps({"code": request["code"]}) + "\n").encode())
        except BrokenPipeError:
            pass
        response, buffers, status = self.collect(resp_r, out_r, err_r, cap, start + request["timeout_s"])
        result = {"event": "result", "value": None, "error": None, "new_session": new_session}
        if status == "ok" and response is not None:
            result.update(response)
            status = "error" if response.get("error") else "ok"
        elif status == "timeout":
            state_lost = True
            result["error"] = f"TimeoutError: execution exceeded the {request['timeout_s']:g} s time limit"
        else:
            status, state_lost = "crashed", True
            result["error"] = self.describe_death(pid)
        if state_lost or request.get("fresh", False):
            self.reset()
        for name, (data, dropped) in buffers.items():
            text = data.decode("utf-8", errors="backslashreplace")
            if dropped:
                text += f"\n...[{dropped} more bytes of {name} not shown]"
            result[name] = text
        result.update(status=status, state_lost=state_lost, duration_s=time.monotonic() - start)
        self.send(result)

    def collect(self, resp_r, out_r, err_r, cap, deadline):
        """Read the cell's response and outputs until the response, the session's death or the deadline."""
        buffers = {"stdout": [bytearray(), 0], "stderr": [bytearray(), 0]}
        names = {out_r: "stdout", err_r: "stderr"}
        response_bytes = bytearray()
        open_fds = [resp_r, out_r, err_r]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, self._finish(buffers), "timeout"
            ready, _, _ = select.select(open_fds, [], [], remaining)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if fd == resp_r:
                    if not chunk:
                        self.drain(names, buffers, cap)
                        return None, self._finish(buffers), "crashed"
                    response_bytes += chunk
                    if response_bytes.endswith(b"\n"):
                        self.drain(names, buffers, cap)
                        try:
                            return json.loads(response_bytes), self._finish(buffers), "ok"
                        except ValueError:
                            return None, self._finish(buffers), "crashed"
                elif not chunk:
                    open_fds.remove(fd)
                else:
                    self.keep(buffers[names[fd]], chunk, cap)

    def drain(self, names, buffers, cap):
        """Read what the session already wrote to its output pipes (without waiting)."""
        for fd, name in names.items():
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.keep(buffers[name], chunk, cap)

    @staticmethod
    def keep(buffer, chunk, cap):
        room = cap - len(buffer[0])
        buffer[0] += chunk[:max(room, 0)]
        buffer[1] += max(len(chunk) - max(room, 0), 0)

    @staticmethod
    def _finish(buffers):
        return {name: (bytes(data), dropped) for name, (data, dropped) in buffers.items()}

    def describe_death(self, pid):
        try:
            _, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            hint = {signal.SIGKILL: " (out of memory, or killed)", signal.SIGXCPU: " (CPU time limit)",
                    signal.SIGSEGV: " (segmentation fault)"}.get(sig, "")
            return f"the interpreter died from signal {signal.Signals(sig).name}{hint}"
        if os.WIFEXITED(status):
            return f"the interpreter exited with status {os.WEXITSTATUS(status)}"
        return "the interpreter stopped answering"

    def reset(self):
        """Kill every process of the session (detached ones too) and wipe the writable directories."""
        if self.session is not None:
            pid, *fds = self.session
            for fd in fds:
                os.close(fd)
            self.session = None
            self.kill_descendants(pid)
        for directory in self.options.get("wipe", []):
            wipe(directory)

    def kill_descendants(self, session_pid):
        if self.pid_namespace:
            for attempt in range(1000):
                try:
                    os.kill(-1, signal.SIGKILL)  # everything in the namespace but init and ourselves
                except ProcessLookupError:
                    break  # nothing left to signal
                reap()
                if attempt:
                    time.sleep(0.0005)  # orphans still being reaped by the namespace's init
            reap()
            return
        try:
            os.killpg(session_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for _ in range(200):  # detached processes are re-parented to us (subreaper): kill until none are left
            children = child_pids()
            if not children:
                break
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            reap()
            time.sleep(0.001)
        reap()

    def serve(self):
        with os.fdopen(self.proto_in, "rb", buffering=0) as requests:
            buffer = b""
            while True:
                chunk = requests.read(65536)
                if not chunk:
                    self.reset()
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    request = json.loads(line)
                    if request["op"] == "exec":
                        self.execute(request)
                    elif request["op"] == "reset":
                        self.reset()
                        self.send({"event": "reset"})


def child_pids():
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                out.append(int(entry))
    return out


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def wipe(directory):
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for name in entries:
        path = os.path.join(directory, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except OSError:
            pass


def preload(names):
    loaded, failed = [], {}
    for name in names:
        try:
            __import__(name)
            loaded.append(name)
        except Exception as e:  # noqa: BLE001 - reported to the host, which decides
            failed[name] = f"{type(e).__name__}: {e}"
    return loaded, failed


# Landlock (isolation=landlock): filesystem allow-list, no TCP, no signals or abstract sockets outside
FS_READ = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read file, read dir
FS_FILE_RIGHTS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14)  # rights that apply to a file itself


def landlock_restrict(read_paths, write_paths):
    """Confine this process and its children; raises OSError when the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(444, None, 0, 1)
    if abi < 1:
        raise OSError(ctypes.get_errno(), "Landlock is not available")
    fs_all = (1 << 13) - 1 | ((1 << 13) if abi >= 2 else 0) | ((1 << 14) if abi >= 3 else 0) \
        | ((1 << 15) if abi >= 5 else 0)
    net = 3 if abi >= 4 else 0
    scoped = 3 if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs_all, net, scoped)
    ruleset = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr) if abi >= 6 else 16, 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    for paths, rights in ((read_paths, FS_READ), (write_paths, fs_all)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            allowed = rights if os.path.isdir(path) else rights & FS_FILE_RIGHTS
            rule = PathBeneath(allowed & fs_all, fd)
            if libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0) != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path} failed")
            os.close(fd)
    libc.prctl(38, 1, 0, 0, 0)  # no_new_privs, required by landlock_restrict_self
    if libc.syscall(446, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)


def main():
    options = json.loads(sys.argv[1])
    sys.path[:0] = options.get("sys_path", [])
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.nice(options.get("nice", 0))  # model code yields the CPU to the trainer
    if options.get("parent_death_signal"):
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if options.get("landlock"):
        landlock_restrict(options["landlock"]["read"], options["landlock"]["write"])
    loaded, failed = preload(options.get("preload", []))
    os.dup2(devnull, 2)
    _prctl(PR_SET_DUMPABLE, 0)
    zygote = Zygote(options, proto_in, proto_out)
    zygote.send({"event": "ready", "preloaded": loaded, "failed": failed, "pid": os.getpid()})
    zygote.serve()


if __name__ == "__main__":
    main()
