"""Run untrusted Python programs (model-written code) in a guarded subprocess.

Each program runs in a fresh ``python -I`` process whose working directory is a
fresh temporary directory, removed afterwards. Layers, outermost first:

1. **Namespaces** (where ``unshare`` works): a new network namespace (no
   interfaces but a downed loopback, so no network) and a new PID namespace
   (when the program's first process dies, the kernel kills every process left
   in it). Probed once per interpreter; without them the run still has layers
   2-4 and the result says ``isolation: "none"``.
2. **Process group**: the child starts a new session; on timeout, and after
   every run, the parent kills the whole group with SIGKILL. The parent waits
   without reaping first, so the group id cannot be reused by an unrelated
   process in between.
3. **Resource limits**: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU),
   file size (RLIMIT_FSIZE), no core files, and RLIMIT_NPROC = 1 (no new
   processes or threads for a non-root user). Linux does not enforce
   RLIMIT_NPROC for root, which is why layers 1, 2 and 4 exist.
4. **In-process guards**, installed by a small runner before the program is
   compiled: a ``sys.addaudithook`` hook (which the program cannot remove) that
   refuses process creation (fork, exec, spawn, ``subprocess``, ``os.system``),
   signals to other processes (``os.kill``, ``os.killpg``), sockets, changing
   resource limits, importing ``ctypes`` and other modules that bypass the
   hook, file writes/deletes/renames/permission changes outside the temporary
   directory (paths are resolved with ``realpath``, so symlinks do not escape),
   opening directories (a directory fd would allow ``dir_fd`` tricks), and
   writing more than ``max_files`` distinct files (with RLIMIT_FSIZE this
   bounds the disk a run can fill).
   Dangerous ``os`` functions are also replaced by stubs, as OpenAI's
   ``human-eval`` ``reliability_guard`` does. Stdin is ``/dev/null``.

Success is signalled positively: the parent sends a random nonce on stdin, the
runner reads it before any program code exists, and writes it to a private
pipe only after the program (including ``check(...)``) returned normally. So
``sys.exit(0)``, ``os._exit(0)`` or a kill before the tests finish is a
failure, even though the exit status is 0.

Limits of this design, stated plainly: the guards run in the same interpreter
as the program, so they stop accidents and the usual hostile patterns (fork
bombs, deleting files, network calls, premature exits), not an adversary who
targets this runner (for example by digging the nonce out of a frame, or with
a compiled extension written to disk). For code from untrusted people, run the
whole evaluation inside a container or VM as well.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

# The runner executes inside the child before any program code. It is passed
# with -c (not written to the temporary directory) and reads its settings from
# argv: tmpdir, result fd, memory bytes, cpu seconds, file-size bytes, max files.
_RUNNER = r'''
import os, sys
sys.dont_write_bytecode = True


def _main():
    import builtins, resource
    tmpdir, result_fd = os.path.realpath(sys.argv[1]), int(sys.argv[2])
    mem, cpu, fsize = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    max_files = int(sys.argv[6])
    nonce = sys.stdin.buffer.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    with open(os.path.join(tmpdir, "program.py"), encoding="utf-8") as f:
        source = f.read()
    for which, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NPROC, 1)):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass  # a hard limit already lower than ours is fine
    _install_guards(tmpdir, max_files)
    code = compile(source, os.path.join(tmpdir, "program.py"), "exec")
    glob = {"__name__": "__main__", "__builtins__": builtins,
            "__file__": os.path.join(tmpdir, "program.py")}
    exec(code, glob)
    # Reached only when the program returned normally: report success, then
    # leave at once so that threads or atexit hooks cannot change the outcome.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.write(result_fd, b"PASSED " + nonce + b"\n")
    os._exit(0)


def _install_guards(tmpdir, max_files):
    import stat

    def inside(path):
        if isinstance(path, int):
            return True  # an fd that was opened (and checked) earlier
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return False
        real = os.path.realpath(path)
        return real == tmpdir or real.startswith(tmpdir + os.sep)

    def deny(event):
        raise PermissionError(f"sandbox: {event} is not allowed")

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
               "os.forkpty", "subprocess.Popen", "os.kill", "os.killpg",
               "signal.pthread_kill", "socket.__new__", "socket.socketpair",
               "resource.setrlimit", "resource.prlimit", "os.symlink", "os.link",
               "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
               "gc.get_objects", "gc.get_referrers", "gc.get_referents", "os.startfile",
               "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "sys.setprofile",
               "sys.settrace", "sys._current_frames"}
    no_import = {"ctypes", "_ctypes", "_testcapi", "_testinternalcapi",
                 "_xxsubinterpreters", "_posixsubprocess", "_socket", "_multiprocessing"}
    # event -> positions of path arguments, and of dir_fd arguments.
    path_events = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)),
                   "os.rename": ((0, 1), (2, 3)), "os.mkdir": ((0,), (2,)),
                   "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
                   "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()),
                   "shutil.rmtree": ((0,), (1,))}

    written = set()

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                flags is not None and flags & write_flags)
            if isinstance(path, int):
                return
            if writing and not inside(path):
                deny(f"writing {path!r} (outside {tmpdir})")
            if writing:
                # RLIMIT_FSIZE caps each file; this caps how many, so the disk
                # use of a run is bounded by max_files * max_file_mb.
                written.add(os.path.realpath(path))
                if len(written) > max_files:
                    deny(f"writing more than {max_files} files")
            # No directory fds at all: with one, a dir_fd= argument (which the
            # events do not show) could reach outside the directory.
            try:
                is_dir = stat.S_ISDIR(os.stat(path).st_mode)
            except (OSError, TypeError, ValueError):
                is_dir = False
            if is_dir:
                deny(f"opening directory {path!r}")
        elif event in blocked:
            deny(event)
        elif event == "import" and args[0].split(".")[0] in no_import:
            deny(f"import {args[0]}")
        elif event in path_events:
            paths, dir_fds = path_events[event]
            if event in ("os.chmod", "os.chown", "os.utime") and isinstance(args[0], int):
                deny(f"{event} on a file descriptor")
            # The events report "no dir_fd" as -1 (os.*) or None (shutil).
            if any(args[i] not in (None, -1) for i in dir_fds if i < len(args)):
                deny(f"{event} with dir_fd")
            for i in paths:
                if not inside(args[i]):
                    deny(f"{event} on {args[i]!r} (outside {tmpdir})")

    sys.addaudithook(hook)

    def disabled(*args, **kwargs):
        raise PermissionError("sandbox: this function is disabled")

    for name in ("fork", "forkpty", "system", "kill", "killpg", "setsid", "setpgid",
                 "setpgrp", "setuid", "setgid", "setreuid", "setregid", "mkfifo",
                 "mknod", "chroot", "putenv", "unsetenv", "execv", "execve", "spawnv"):
        if hasattr(os, name):
            setattr(os, name, disabled)
    import shutil
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, disabled)
    # Modules that would only help an escape; an import now finds None and fails.
    for name in ("subprocess", "multiprocessing", "ctypes", "socket", "resource", "pty"):
        sys.modules[name] = None


_main()
'''

_DEFAULT_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_TAIL_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    Attributes:
      passed: the program returned normally (nonce received).
      status: "passed", "failed" or "timed_out".
      detail: a one-line reason (last stderr line, "timed out after 3.0 s", ...).
      returncode: exit status of the child (negative: killed by that signal).
      elapsed_s: wall-clock seconds from start to exit or kill.
      stdout: the last characters of stdout.
      stderr: the last characters of stderr.
      isolation: "namespaces" or "none".
    """
    passed: bool
    status: str
    detail: str
    returncode: Optional[int]
    elapsed_s: float
    stdout: str
    stderr: str
    isolation: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=None)
def _namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command that works here, or () when none does."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    base = [unshare, "--net", "--pid", "--fork", "--kill-child"]
    candidates = [base] if os.geteuid() == 0 else [base + ["--map-root-user"]]
    for prefix in candidates:
        try:
            probe = subprocess.run(prefix + [sys.executable, "-I", "-S", "-c", "pass"],
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    return ()


def isolation_available() -> bool:
    """Whether network and PID namespaces can be used on this machine."""
    return bool(_namespace_prefix())


def run_program(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
                cpu_s: Optional[int] = None, max_file_mb: int = 16, max_files: int = 64,
                isolation: str = "auto", python: Optional[str] = None,
                tmp_root: Optional[str] = None) -> SandboxResult:
    """Runs `program` in a guarded subprocess and reports whether it returned normally.

    Args:
      program: Python source. It runs as ``__main__`` with a fresh temporary
        directory as its working directory.
      timeout_s: wall-clock limit; the whole process group is killed after it.
      memory_mb: address-space limit (RLIMIT_AS) of the interpreter.
      cpu_s: CPU-time limit; defaults to ``ceil(timeout_s) + 1``.
      max_file_mb: largest file the program may write (also caps stdout/stderr).
      max_files: how many distinct files the program may open for writing.
      isolation: "auto" (namespaces where available), "namespaces" (fail if
        unavailable) or "none".
      python: interpreter to run; defaults to ``sys.executable``.
      tmp_root: where to make the temporary directory (default: system temp).

    Returns:
      A `SandboxResult`.
    """
    if not isinstance(program, str):
        raise TypeError(f"run_program expects program source as str, got {type(program).__name__}")
    if timeout_s <= 0:
        raise ValueError(f"run_program: timeout_s must be > 0, got {timeout_s}")
    if isolation not in ("auto", "namespaces", "none"):
        raise ValueError(f"run_program: isolation must be 'auto', 'namespaces' or 'none', "
                         f"got {isolation!r}")
    prefix: tuple[str, ...] = ()
    if isolation != "none":
        prefix = _namespace_prefix()
        if not prefix and isolation == "namespaces":
            raise RuntimeError("run_program: isolation='namespaces' but 'unshare --net --pid' "
                               "does not work on this machine; use isolation='auto'")
    cpu_s = int(cpu_s if cpu_s is not None else -(-timeout_s // 1) + 1)
    tmpdir = os.path.realpath(tempfile.mkdtemp(prefix="psm-sandbox-", dir=tmp_root))
    try:
        return _run_in(tmpdir, program, prefix, timeout_s, memory_mb, cpu_s, max_file_mb,
                       max_files, python or sys.executable)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _run_in(tmpdir, program, prefix, timeout_s, memory_mb, cpu_s, max_file_mb, max_files,
            python):
    with open(os.path.join(tmpdir, "program.py"), "w", encoding="utf-8") as f:
        f.write(program)
    nonce = secrets.token_hex(16).encode()
    read_fd, write_fd = os.pipe()
    out_path, err_path = os.path.join(tmpdir, "stdout.txt"), os.path.join(tmpdir, "stderr.txt")
    cmd = list(prefix) + [python, "-I", "-c", _RUNNER, tmpdir, str(write_fd),
                          str(memory_mb << 20), str(cpu_s), str(max_file_mb << 20),
                          str(max_files)]
    start = time.monotonic()
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=tmpdir, stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, pass_fds=(write_fd,), start_new_session=True,
                                    env=dict(_DEFAULT_ENV))
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    os.close(write_fd)
    try:
        try:
            proc.stdin.write(nonce + b"\n")
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        timed_out = not _wait_unreaped(proc.pid, start + timeout_s)
        elapsed = time.monotonic() - start
        # The group leader is still a zombie here, so its group id is still
        # ours: kill whatever is left of the group, then reap.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        returncode = proc.wait()
        report = _read_available(read_fd)
    finally:
        os.close(read_fd)
    passed = (b"PASSED " + nonce + b"\n") in report
    stdout, stderr = _tail(out_path), _tail(err_path)
    if passed:
        status, detail = "passed", "passed"
    elif timed_out:
        status, detail = "timed_out", f"timed out after {timeout_s:g} s"
    else:
        status = "failed"
        # Skip the namespace launcher's own complaints about how the child died.
        lines = [line for line in stderr.splitlines()
                 if line.strip() and not line.startswith("unshare:")]
        if lines:
            detail = lines[-1].strip()
        elif returncode is not None and returncode < 0:
            detail = f"killed by signal {signal.Signals(-returncode).name}"
        else:
            detail = f"exited with status {returncode} before the tests completed"
    return SandboxResult(passed=passed, status=status, detail=detail[:500],
                         returncode=returncode, elapsed_s=round(elapsed, 4), stdout=stdout,
                         stderr=stderr, isolation="namespaces" if prefix else "none")


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Waits until `pid` exits (True) or `deadline` passes (False), without reaping."""
    delay = 0.0005
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.02)


def _read_available(fd: int) -> bytes:
    """Reads what is in the pipe now, never blocking (a leftover writer may hold it)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        if sum(map(len, chunks)) > 1 << 20:
            break
    return b"".join(chunks)


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * _TAIL_CHARS))
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")[-_TAIL_CHARS:]
