"""Run untrusted Python programs (model-written code) in a guarded subprocess.

Each program runs in a fresh ``python -I`` process with a scrubbed environment
(``PATH``, ``LANG`` and thread-count variables only). Its working directory
(``work``) sits in a fresh temporary directory that also holds the captured
stdout/stderr; the whole directory is removed afterwards. Layers, outermost
first (``SandboxResult.layers`` records which of 1-4 a run actually had):

1. **Namespaces** (``isolation="namespaces"``; needs root, probed once per
   interpreter): ``unshare --mount --net --pid`` gives the program

   - a network namespace with only a downed loopback (no network at all);
   - a PID namespace: the caller's processes are not visible (the program's
     parent is a small process 1 that only waits for it and reports how it
     ended) and every process left in it dies with it;
   - a private mount namespace: every mount is made read-only and nosuid
     (``mount_setattr(AT_RECURSIVE)``), a fresh ``/proc`` shows only the
     namespace's processes, and ``work`` is a new tmpfs (nosuid, nodev,
     noexec) of ``max_files * max_file_mb`` MiB and about ``max_files``
     inodes. So files created by C code (sqlite, dbm, ...) land in ``work`` or
     fail with EROFS, and their number is bounded by the kernel.

   Without namespaces (``isolation="none"``, or ``"auto"`` where the probe
   fails) layers 2-5 still apply and the result says ``isolation: "none"``.
2. **Unprivileged user**: when started as root, the runner switches to uid
   and gid 65534 (``nobody``) with no supplementary groups after the mounts,
   which drops every capability: it cannot remount, write root-owned files,
   open devices, signal or read (``/proc/<pid>/environ``, ``mem``) the
   caller's processes. Where that uid could not read the interpreter or
   reach the work directory (e.g. Python installed under ``/root``), it stays
   uid 0 but clears every capability instead (``layers`` says ``no-caps``):
   the caller's processes then hold capabilities it lacks, so they still
   cannot be traced or read, and root-owned files stay writable only where
   layers 1 and 3 allow. ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` is set after the
   switch (the switch clears it), so the program dies if its parent does.
3. **Landlock** (Linux >= 5.13, unprivileged; the features follow the
   kernel's ABI version): writes of any kind (create, remove, rename,
   truncate, mknod, ...) only beneath ``work`` (and to ``/dev/null``); reads
   anywhere; no ``execve``; no ptrace-style access (``/proc/<pid>/mem``,
   ``environ``) to processes outside the sandbox; from ABI 4 no TCP bind or
   connect; from ABI 6 no signals to, and no abstract unix sockets of,
   processes outside the sandbox. This is what closes the filesystem in
   ``isolation="none"``.
4. **Seccomp filter** (x86_64 and aarch64): with ``no_new_privs`` set, a BPF
   filter makes these system calls fail with EPERM: process creation
   (``fork``, ``vfork``, ``clone`` without ``CLONE_THREAD``, ``execve``),
   signalling another process (``kill``/``tgkill`` to any pid but the
   program's own, ``tkill``, ``pidfd_open``, ``pidfd_send_signal``,
   ``rt_sigqueueinfo``), reading other processes (``ptrace``,
   ``process_vm_readv``), ``socket``/``socketpair``, every mount and
   namespace call, ``keyctl``, ``bpf``, ``perf_event_open``, ``userfaultfd``,
   ``io_uring``, ``open_by_handle_at``. ``clone3`` fails with ENOSYS so that
   the C library falls back to ``clone`` (threads keep working).
5. **Resource limits and process group**: address space (RLIMIT_AS), CPU
   seconds (RLIMIT_CPU; SIGXCPU, then SIGKILL a second later), file size
   (RLIMIT_FSIZE), no core files, and RLIMIT_NPROC = 1 (enforced once the
   uid is not root; it then also stops threads). The child starts a
   new session; on timeout, and after every run, the parent kills the whole
   group with SIGKILL, waiting without reaping first so the group id cannot
   be reused by an unrelated process in between.
6. **In-process guards**, installed by a small runner before the program is
   compiled: a ``sys.addaudithook`` hook (which the program cannot remove) that
   refuses process creation, signals, sockets, changing resource limits,
   importing ``ctypes`` and other modules that bypass the hook, file writes,
   deletes, renames and permission changes outside ``work`` (paths resolved
   with ``realpath``), opening directories, and writing more than
   ``max_files`` distinct files through ``open``. Dangerous ``os`` functions
   are also replaced by stubs, as OpenAI's ``human-eval`` ``reliability_guard``
   does. These give the clearest error messages and are the first thing a
   usual hostile program meets; they see only what Python's audit events
   show (C code that opens files itself, like sqlite, is invisible to them),
   which is why layers 1-4 exist. Stdin is ``/dev/null``.

Success is signalled positively: the parent sends a random nonce on stdin, the
runner reads it before any program code exists, and writes it to a private
pipe only after the program (including ``check(...)``) returned normally. So
``sys.exit(0)``, ``os._exit(0)`` or a kill before the tests finish is a
failure, even though the exit status is 0.

What ``isolation="none"`` does not stop (see docs/sandbox.md for the table
the tests check): without layer 3 (old kernel) C code can create files
wherever the uid may write, e.g. in ``/tmp`` or ``/dev/shm``; the number of
files C code creates inside ``work`` is not bounded (only ``open`` is
counted); without layer 2 (not root) the program runs as the caller's user,
so without layer 3 as well it can signal and read the caller's processes;
``/proc`` lists every process of the machine (command lines are readable).
Not root and no namespaces also means RLIMIT_NPROC counts the caller's own
processes. The runner runs in the same interpreter as the program, so the
in-process guards stop accidents and the usual hostile patterns, not an
adversary who targets this runner; for code from untrusted people, run the
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

# The uid/gid the program runs as when the caller is root (``nobody``).
SANDBOX_UID = 65534

# The runner executes inside the child before any program code. It is passed
# with -c (not written to disk) and reads its settings from argv:
#   workdir, result fd, memory bytes, cpu seconds, file-size bytes, max files,
#   namespaced (0/1), uid to switch to (-1: stay), caller pid (0: do not check),
#   tmpfs bytes, tmpfs inodes, in-process guards (0/1).
_RUNNER = r'''
import os, sys
sys.dont_write_bytecode = True


def _main():
    import builtins, resource
    args = sys.argv[1:]
    workdir = os.path.realpath(args[0])
    (result_fd, mem, cpu, fsize, max_files, namespaced, uid, caller_pid, tmpfs_bytes,
     tmpfs_inodes, guards) = map(int, args[1:12])
    nonce = sys.stdin.buffer.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    program_path = os.path.join(workdir, "program.py")
    with open(program_path, encoding="utf-8") as f:
        source = f.read()
    try:
        layers = _confine(workdir, source, namespaced, uid, caller_pid, tmpfs_bytes,
                          tmpfs_inodes)
    except OSError as e:
        # Never run the program with less confinement than was asked for.
        sys.stderr.write(f"sandbox setup failed: {e}\n")
        sys.stderr.flush()
        os._exit(70)
    # CPU: SIGXCPU at the soft limit (a clear reason), SIGKILL a second later.
    for which, soft, hard in ((resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_CPU, cpu, cpu + 1),
                              (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_CORE, 0, 0),
                              (resource.RLIMIT_NPROC, 1, 1)):
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass  # a hard limit already lower than ours is fine
    # Written before any program code runs, so it is the first line the parent reads.
    os.write(result_fd, ("LAYERS " + " ".join(layers) + "\n").encode())
    if guards:
        _install_guards(workdir, max_files)
    code = compile(source, program_path, "exec")
    glob = {"__name__": "__main__", "__builtins__": builtins, "__file__": program_path}
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


def _confine(workdir, source, namespaced, uid, caller_pid, tmpfs_bytes, tmpfs_inodes):
    """OS-level confinement (mounts, uid, landlock, seccomp); returns the layers set up.

    Uses ctypes for the system calls Python 3.11 lacks, then removes ctypes from
    sys.modules so that the program cannot reach the objects used here.
    """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(what, result):
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return result

    def syscall(what, nr, *args):
        # Every integer is passed as a C long: syscall(2) is variadic and reads longs.
        return call(what, libc.syscall(ctypes.c_long(nr), *[
            ctypes.c_long(a) if isinstance(a, int) else a for a in args]))

    def prctl(what, option, arg):
        return call(what, libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg),
                                     ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)))

    layers = []
    # Switch uid only if the interpreter stays readable and the workdir reachable
    # by path (tracebacks, landlock's rule); the workdir then gets that owner.
    switch = uid >= 0 and _readable_by_others([sys.executable] + sys.path,
                                              os.path.dirname(workdir))
    owner = uid if switch else -1
    if namespaced:
        _private_mounts(ctypes, libc, syscall, workdir, source, owner, tmpfs_bytes,
                        tmpfs_inodes)
        layers.append("namespaces")
        _become_reaper()
    elif switch:
        os.chown(workdir, owner, owner)
    os.chdir(workdir)  # after the mounts: the old cwd is the directory under the tmpfs
    if switch:
        # Groups first, uid last: once the uid is not 0 nothing else may change.
        # Leaving uid 0 for good (real, effective and saved) clears every capability.
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        layers.append("uid")
    elif uid >= 0:
        # The interpreter lives where another uid cannot read it (e.g. under
        # /root): stay uid 0 but give up every capability. The owner's rights
        # on root's files remain; the read-only mounts and landlock stop writes.
        if _drop_capabilities(ctypes, syscall):
            layers.append("no-caps")
    PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
    # Set after the uid switch, which clears it; then make sure the parent did
    # not die before it took effect (in a PID namespace the parent is invisible).
    prctl("PR_SET_PDEATHSIG", PR_SET_PDEATHSIG, 9)
    if caller_pid and os.getppid() != caller_pid:
        raise OSError(0, "the caller exited before the program started")
    # Required by landlock_restrict_self and seccomp for an unprivileged process;
    # also keeps setuid/file-capability binaries from granting anything.
    prctl("PR_SET_NO_NEW_PRIVS", PR_SET_NO_NEW_PRIVS, 1)
    layers += _landlock(ctypes, libc, syscall, workdir)
    if _seccomp(ctypes, libc, call):
        layers.append("seccomp")
    for name in [m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]:
        del sys.modules[name]
    return layers


def _become_reaper():
    """Forks; the parent stays process 1 of the PID namespace and reports how the child ended.

    The kernel drops signals whose action is the default when they are sent to
    a namespace's first process (SIGXCPU from RLIMIT_CPU among them), and
    unshare(1) cannot pass a SIGKILL death on; so the program runs in the child.
    Returns in the child only.
    """
    pid = os.fork()
    if pid == 0:
        return
    import signal
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        # The same wording the caller uses for a signal outside namespaces.
        os.write(2, f"killed by signal {signal.Signals(sig).name}\n".encode())
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _readable_by_others(paths, passage):
    """Whether a uid that owns none of them can read `paths` and pass through `passage`.

    Reading needs o+r (and o+x for a directory) on the path and o+x on every
    parent; passing through a directory needs o+x on it and on its parents.
    """
    import stat
    path = passage
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        if path == "/":
            break
        path = os.path.dirname(path)
    for path in paths:
        path = os.path.realpath(path)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # a sys.path entry that does not exist
        need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
        if mode & need != need:
            return False
        while path != "/":
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
    return True


def _drop_capabilities(ctypes, syscall):
    """Clears the effective, permitted and inheritable capability sets; False on other arches.

    With no_new_privs (set later) an execve cannot give them back.
    """
    nr = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)  # capset
    if nr is None:
        return False
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}, all zero
    syscall("capset", nr, ctypes.byref(header), ctypes.byref(data))
    return True


def _private_mounts(ctypes, libc, syscall, workdir, source, uid, tmpfs_bytes, tmpfs_inodes):
    # uid: owner of the tmpfs and of program.py, -1 to leave them root's.
    """Inside the new mount namespace: read-only view, tmpfs workdir, private /proc."""
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_PRIVATE = 1, 2, 4, 8, 1 << 18
    MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, AT_FDCWD, AT_RECURSIVE = 1, 2, -100, 0x8000
    SYS_MOUNT_SETATTR = 442  # the same number on every architecture

    class MountAttr(ctypes.Structure):  # struct mount_attr (linux/mount.h)
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    # Every mount of this namespace (copies of the caller's) becomes read-only,
    # nosuid and private; this changes the per-mount flags of the copies only.
    attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, MS_PRIVATE, 0)
    syscall("mount_setattr(/, AT_RECURSIVE)", SYS_MOUNT_SETATTR, AT_FDCWD, b"/",
            AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))

    def mount(source_, target, fstype, flags, data):
        if libc.mount(source_, target, fstype, ctypes.c_ulong(flags), data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {fstype.decode()} on {target.decode()}: "
                               f"{os.strerror(err)}")

    # New mounts are writable: a size- and inode-limited tmpfs over the workdir
    # (the kernel bounds what C code can create), and a /proc of this PID namespace.
    owner = f",uid={uid},gid={uid}" if uid >= 0 else ""
    mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={tmpfs_bytes},nr_inodes={tmpfs_inodes},mode=0700{owner}".encode())
    mount(b"proc", b"/proc", b"proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    # The program file the parent wrote is now hidden: put a copy on the tmpfs
    # (tracebacks read their source lines from it).
    path = os.path.join(workdir, "program.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    if uid >= 0:
        os.chown(path, uid, uid)


def _landlock(ctypes, libc, syscall, workdir):
    """Landlock: writes only beneath workdir, no exec, no reach outside; [] if absent."""
    try:
        abi = syscall("landlock ABI", 444, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    except OSError:
        return []  # ENOSYS (kernel too old) or EOPNOTSUPP (disabled at boot)
    # LANDLOCK_ACCESS_FS_* bits 0-12 (ABI 1): EXECUTE, WRITE_FILE, READ_FILE,
    # READ_DIR, REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK,
    # MAKE_FIFO, MAKE_BLOCK, MAKE_SYM; 13 REFER (ABI 2); 14 TRUNCATE (ABI 3).
    # IOCTL_DEV (ABI 5) is left unhandled: device ioctls are not a write path.
    EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, REFER, TRUNCATE = 1, 2, 4, 8, 1 << 13, 1 << 14
    fs = (1 << 13) - 1
    fs |= REFER if abi >= 2 else 0
    fs |= TRUNCATE if abi >= 3 else 0
    net = 3 if abi >= 4 else 0  # LANDLOCK_ACCESS_NET_BIND_TCP | CONNECT_TCP
    scoped = 3 if abi >= 6 else 0  # LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | SIGNAL

    class RulesetAttr(ctypes.Structure):  # struct landlock_ruleset_attr
        _fields_ = [("handled_access_fs", ctypes.c_uint64),
                    ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):  # struct landlock_path_beneath_attr, packed
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(fs, net, scoped)
    # Older kernels reject fields they do not know: pass only the ABI's prefix.
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = syscall("landlock_create_ruleset", 444, ctypes.byref(attr), size, 0)
    try:
        file_rights = WRITE_FILE | READ_FILE | (TRUNCATE if abi >= 3 else 0)
        for path, allowed in (("/", READ_FILE | READ_DIR), (os.devnull, file_rights),
                              (workdir, fs & ~EXECUTE)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = PathBeneath(allowed, fd)
                syscall(f"landlock_add_rule({path})", 445, ruleset, 1,  # PATH_BENEATH
                        ctypes.byref(rule), 0)
            finally:
                os.close(fd)
        syscall("landlock_restrict_self", 446, ruleset, 0)
    finally:
        os.close(ruleset)
    return ["landlock"] + (["landlock-net"] if net else []) + (
        ["landlock-scope"] if scoped else [])


# Numbers of the system calls the filter refuses, per architecture.
_SECCOMP_TABLES = {
    # AUDIT_ARCH_X86_64; asm/unistd_64.h
    "x86_64": (0xC000003E, dict(
        fork=57, vfork=58, execve=59, execveat=322, tkill=200, ptrace=101,
        process_vm_readv=310, process_vm_writev=311, pidfd_open=434,
        pidfd_send_signal=424, pidfd_getfd=438, rt_sigqueueinfo=129,
        rt_tgsigqueueinfo=297, socket=41, socketpair=53, mount=165, umount2=166,
        pivot_root=155, chroot=161, unshare=272, setns=308, mount_setattr=442,
        move_mount=429, open_tree=428, fsopen=430, fsconfig=431, fsmount=432,
        fspick=433, keyctl=250, add_key=248, request_key=249, bpf=321,
        perf_event_open=298, userfaultfd=323, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, open_by_handle_at=304, name_to_handle_at=303,
        kcmp=312), dict(kill=62, tgkill=234, clone=56, clone3=435)),
    # AUDIT_ARCH_AARCH64; asm-generic/unistd.h (no fork/vfork: clone only)
    "aarch64": (0xC00000B7, dict(
        execve=221, execveat=281, tkill=130, ptrace=117, process_vm_readv=270,
        process_vm_writev=271, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438,
        rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, socket=198, socketpair=199,
        mount=40, umount2=39, pivot_root=41, chroot=51, unshare=97, setns=268,
        mount_setattr=442, move_mount=429, open_tree=428, fsopen=430, fsconfig=431,
        fsmount=432, fspick=433, keyctl=219, add_key=217, request_key=218, bpf=280,
        perf_event_open=241, userfaultfd=282, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, open_by_handle_at=265, name_to_handle_at=264,
        kcmp=272), dict(kill=129, tgkill=131, clone=220, clone3=435)),
}


def _seccomp(ctypes, libc, call):
    """Installs the seccomp filter (module docstring, layer 4); False on other arches."""
    table = _SECCOMP_TABLES.get(os.uname().machine)
    if table is None:
        return False
    arch, denied, special = table
    # Classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}:
    # nr at offset 0, arch at 4, the low 32 bits of args[0] at 16 (little endian).
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
    EPERM, ENOSYS = 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ERRNO | errno
    CLONE_THREAD = 0x00010000
    me = os.getpid()
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL),  # other ABI: kill
            (LD, 0, 0, 0)]
    if arch == 0xC000003E:
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]  # x32 system calls
    for nr in sorted(denied.values()):
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, EPERM)]
    # Each check below: if nr matches, decide on args[0]; else skip its 4 steps
    # (the accumulator still holds nr, as the load is skipped too).
    for name, test, value in (("kill", JEQ, me), ("tgkill", JEQ, me),
                              ("clone", JSET, CLONE_THREAD)):
        prog += [(JEQ, 0, 4, special[name]), (LD, 0, 0, 16), (test, 0, 1, value),
                 (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    # clone3 passes its flags in memory the filter cannot read: ENOSYS makes
    # the C library fall back to clone, which is checked above.
    prog += [(JEQ, 0, 1, special["clone3"]), (RET, 0, 0, ENOSYS), (RET, 0, 0, ALLOW)]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                    ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
    call("PR_SET_SECCOMP", libc.prctl(ctypes.c_int(PR_SET_SECCOMP),
                                      ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                                      ctypes.c_ulong(0), ctypes.c_ulong(0)))
    return True


def _install_guards(workdir, max_files):
    import stat

    def inside(path):
        if isinstance(path, int):
            return True  # an fd that was opened (and checked) earlier
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return False
        real = os.path.realpath(path)
        return real == workdir or real.startswith(workdir + os.sep)

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
                deny(f"writing {path!r} (outside {workdir})")
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
                    deny(f"{event} on {args[i]!r} (outside {workdir})")

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
    for name in ("subprocess", "multiprocessing", "ctypes", "_ctypes", "socket", "resource",
                 "pty"):
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
      layers: the OS-level layers the run had, of "namespaces", "uid",
        "landlock", "landlock-net", "landlock-scope", "seccomp" (module
        docstring); empty when the runner did not get that far.
    """
    passed: bool
    status: str
    detail: str
    returncode: Optional[int]
    elapsed_s: float
    stdout: str
    stderr: str
    isolation: str
    layers: tuple = ()

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["layers"] = list(self.layers)
        return out


@functools.lru_cache(maxsize=None)
def _namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command that works here, or () when none does.

    Probed by running an empty program the whole way (namespaces, mounts, uid
    switch), so a machine where any step fails falls back to "none" up front
    instead of failing every run. Root only: without a user namespace the
    mounts need CAP_SYS_ADMIN, and inside one the program would keep
    capabilities over its mounts.
    """
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return ()
    prefix = (unshare, "--mount", "--net", "--pid", "--fork", "--kill-child")
    try:
        probe = _run(prefix, "pass", timeout_s=30.0, memory_mb=1024, cpu_s=30,
                     max_file_mb=1, max_files=4, python=sys.executable, tmp_root=None,
                     guards=True)
    except (OSError, subprocess.SubprocessError):
        return ()
    return prefix if probe.passed and "namespaces" in probe.layers else ()


def isolation_available() -> bool:
    """Whether the namespace layer (module docstring, layer 1) works on this machine."""
    return bool(_namespace_prefix())


def run_program(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
                cpu_s: Optional[int] = None, max_file_mb: int = 16, max_files: int = 64,
                isolation: str = "auto", python: Optional[str] = None,
                tmp_root: Optional[str] = None, in_process_guards: bool = True
                ) -> SandboxResult:
    """Runs `program` in a guarded subprocess and reports whether it returned normally.

    Args:
      program: Python source. It runs as ``__main__`` with a fresh directory as
        its working directory.
      timeout_s: wall-clock limit; the whole process group is killed after it.
      memory_mb: address-space limit (RLIMIT_AS) of the interpreter.
      cpu_s: CPU-time limit; defaults to ``ceil(timeout_s) + 1``.
      max_file_mb: largest file the program may write (also caps stdout/stderr).
      max_files: how many distinct files the program may open for writing
        (with namespaces also a kernel bound on the files and directories in
        its directory, whoever creates them).
      isolation: "auto" (namespaces where available), "namespaces" (fail if
        unavailable) or "none" (layers 2-6 of the module docstring; see its
        list of what this does not stop).
      python: interpreter to run; defaults to ``sys.executable``.
      tmp_root: where to make the temporary directory (default: system temp).
      in_process_guards: False skips the audit hook and stubs (layer 6), to
        test what the OS-level layers stop on their own. Never for real use.

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
            raise RuntimeError("run_program: isolation='namespaces' but 'unshare --mount "
                               "--net --pid' with a read-only mount view does not work on "
                               "this machine (it needs root); use isolation='auto'")
    cpu_s = int(cpu_s if cpu_s is not None else -(-timeout_s // 1) + 1)
    return _run(prefix, program, timeout_s, memory_mb, cpu_s, max_file_mb, max_files,
                python or sys.executable, tmp_root, in_process_guards)


def _run(prefix, program, timeout_s, memory_mb, cpu_s, max_file_mb, max_files, python,
         tmp_root, guards):
    """Makes the temporary directory, runs, removes the directory."""
    # base (0711: others may pass through, not list) holds the captured output,
    # owned by the caller; base/work is the program's and, after the uid switch,
    # the only place it can write.
    base = os.path.realpath(tempfile.mkdtemp(prefix="psm-sandbox-", dir=tmp_root))
    try:
        os.chmod(base, 0o711)
        workdir = os.path.join(base, "work")
        os.mkdir(workdir, 0o700)
        uid = SANDBOX_UID if os.geteuid() == 0 else -1  # the runner decides whether to switch
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        return _run_in(base, workdir, program, prefix, timeout_s, memory_mb, cpu_s,
                       max_file_mb, max_files, python, uid, guards)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_in(base, workdir, program, prefix, timeout_s, memory_mb, cpu_s, max_file_mb,
            max_files, python, uid, guards):
    nonce = secrets.token_hex(16).encode()
    read_fd, write_fd = os.pipe()
    out_path, err_path = os.path.join(base, "stdout.txt"), os.path.join(base, "stderr.txt")
    # Outside a PID namespace the runner checks that its parent is still us.
    caller_pid = 0 if prefix else os.getpid()
    # tmpfs inodes: the root directory, program.py and a little slack besides max_files.
    cmd = list(prefix) + [python, "-I", "-c", _RUNNER, workdir, str(write_fd),
                          str(memory_mb << 20), str(cpu_s), str(max_file_mb << 20),
                          str(max_files), str(int(bool(prefix))), str(uid), str(caller_pid),
                          str((max_files * max_file_mb) << 20), str(max_files + 4),
                          str(int(bool(guards)))]
    start = time.monotonic()
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.PIPE, stdout=out,
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
        if timed_out:
            # SIGKILLed members of the group (with namespaces: the waiting process
            # 1 and the program, under the launcher) take a moment to go.
            _wait_group_gone(proc.pid, time.monotonic() + 5.0)
        report = _read_available(read_fd)
    finally:
        os.close(read_fd)
    passed = (b"PASSED " + nonce + b"\n") in report
    layers: tuple = ()
    if report.startswith(b"LAYERS "):  # the runner's first line, before any program code
        layers = tuple(report[7:report.index(b"\n")].decode("ascii", "replace").split())
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
                         stderr=stderr, isolation="namespaces" if prefix else "none",
                         layers=layers)


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


def _wait_group_gone(pgid: int, deadline: float) -> None:
    """Waits until no process of group `pgid` is alive (or `deadline` passes)."""
    while time.monotonic() < deadline:
        alive = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ')'.
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != b"Z":
                alive = True
                break
        if not alive:
            return
        time.sleep(0.005)


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
