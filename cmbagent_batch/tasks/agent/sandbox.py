"""Confine code an agent runs: it may read anything, but write only beneath its task's ``codebase/``.

Linux Landlock does the confining: unprivileged, inherited by every child, and impossible to lift
once in place. Reading and executing stay free (Python, libraries, input data); creating, writing,
truncating, renaming, linking and removing are allowed only beneath the writable directories, plus
writing to the character devices ``/dev/null``, ``/dev/zero`` and ``/dev/tty`` (when present).
``/tmp`` is **not** writable inside: whoever starts confined code points ``TMPDIR`` at a writable
directory. Network access stays free unless asked otherwise (``deny_tcp``). Some things confined
code may want need another ``--writable``: ``/dev/shm`` for Python ``multiprocessing`` locks and
queues (POSIX semaphores live there), GPU device files such as ``/dev/nvidia*`` (opened read-write).
Reopening ``/dev/stdout`` or ``/dev/stderr`` works for a pipe but not for a file outside (``>&2`` works).

Command line, used as a prefix for each command an agent runs; it imports nothing heavy::

    python -m cmbagent_batch.tasks.agent.sandbox --writable DIR [--writable PATH ...] [--deny-tcp] -- COMMAND [ARG ...]

It confines itself, then executes COMMAND, which keeps its process id. Exit status 126 when the
confinement is impossible or COMMAND cannot be executed, 127 when COMMAND is not found, 2 on a
wrong command line.

Not covered by Landlock, so not confined: changing the mode, owner, times or extended attributes
of existing files; writes through file descriptors opened before confinement (stdout, stderr);
UDP, raw and unix sockets. With Landlock ABI 1 (kernels 5.13 to 5.18) a file cannot be moved or
hard-linked into another directory even beneath ``codebase/`` (``EXDEV``; ``mv`` falls back to copying);
before ABI 3 (kernel 6.2) ``truncate`` of a file outside is not prevented.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
import sys
from collections.abc import Sequence

from cmbagent_batch.errors import SandboxError

# Generic system call numbers: the same on x86_64, aarch64 and every architecture but alpha and ia64.
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights (linux/landlock.h). Reading (READ_FILE, READ_DIR) and EXECUTE are never handled,
# so they stay allowed everywhere.
_FS_WRITE_FILE = 1 << 1
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SOCK = 1 << 9
_FS_MAKE_FIFO = 1 << 10
_FS_MAKE_BLOCK = 1 << 11
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13  # ABI 2: move or link a file into another directory
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5: ioctl on character and block devices
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1  # ABI 4

# The write-type rights each ABI added; a ruleset handles those of the running ABI and older.
_FS_WRITES_BY_ABI = (
    (1, _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE_CHAR | _FS_MAKE_DIR | _FS_MAKE_REG
     | _FS_MAKE_SOCK | _FS_MAKE_FIFO | _FS_MAKE_BLOCK | _FS_MAKE_SYM),
    (2, _FS_REFER),
    (3, _FS_TRUNCATE),
    (5, _FS_IOCTL_DEV),
)
# The rights that mean something on a file rather than a directory (the kernel rejects the others).
_FS_FILE_RIGHTS = _FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_ABI = 4

# Sinks that ordinary programs open for writing; harmless, so always writable.
DEVICE_SINKS = ("/dev/null", "/dev/zero", "/dev/tty")

UNAVAILABLE = (
    "code execution needs Linux Landlock (kernel 5.13 or newer with landlock enabled) "
    "to confine agent code to codebase/; this kernel reports: {reason}"
)
_PROGRAM = "cmbagent-batch sandbox"
USAGE = (
    "usage: python -m cmbagent_batch.tasks.agent.sandbox --writable DIR [--writable PATH ...] [--deny-tcp]"
    " -- COMMAND [ARG ...]"
)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # packed in the kernel's header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: object) -> int:
    """``syscall(2)``; raises ``OSError`` on failure. Integers go as full machine words (it is variadic)."""
    function = _libc().syscall
    function.restype = ctypes.c_long
    result = function(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(result)


def _abi_version() -> int:
    """The Landlock ABI the kernel speaks; raises ``OSError`` when it has none."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, f"not Linux but {sys.platform}")
    return _syscall(_SYS_CREATE_RULESET, ctypes.c_void_p(None), 0, _CREATE_RULESET_VERSION)


def landlock_status() -> tuple[int, str]:
    """``(abi, description)``: the Landlock ABI version of this kernel, 0 when unavailable, and why."""
    try:
        abi = _abi_version()
    except OSError as exc:
        return 0, _why_unavailable(exc)
    except AttributeError:  # a libc without syscall()
        return 0, "the C library has no syscall function"
    return abi, f"Landlock ABI {abi}"


def _why_unavailable(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    if exc.errno == errno.ENOSYS:
        return f"landlock system calls are not implemented ({name}: {exc.strerror})"
    if exc.errno == errno.EOPNOTSUPP:
        # Linux's ENOTSUP is EOPNOTSUPP, the name the kernel's documentation uses here.
        return f"landlock is built in but disabled at boot (EOPNOTSUPP: {exc.strerror})"
    return f"landlock system calls fail ({name}: {exc.strerror})"


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel; 0 when Landlock is unavailable (``landlock_status`` says why)."""
    return landlock_status()[0]


def handled_fs_rights(abi: int) -> int:
    """The write-type filesystem rights a ruleset handles under ``abi``: all this module knows of."""
    rights = 0
    for since, added in _FS_WRITES_BY_ABI:
        if abi >= since:
            rights |= added
    return rights


def confine_writes(directory: str, *, extra_writable: Sequence[str] = (), deny_tcp: bool = False) -> None:
    """Allow the calling thread and all its future children to write only beneath ``directory``.

    ``extra_writable`` names more directories (writable beneath, like ``directory``) or files
    (writable, not removable). ``deny_tcp`` also forbids binding and connecting TCP sockets
    (Landlock ABI 4, kernel 6.7). There is no way back. Other threads of the process stay free:
    call this in a child process before it starts anything, or use the command line.
    Raises ``SandboxError`` when Landlock is unavailable, a path does not exist, or the kernel refuses.
    """
    abi, reason = landlock_status()
    if abi == 0:
        raise SandboxError(UNAVAILABLE.format(reason=reason))
    if deny_tcp and abi < _NET_ABI:
        raise SandboxError(f"denying TCP needs Landlock ABI {_NET_ABI} (kernel 6.7 or newer); this kernel has ABI {abi}")
    handled = handled_fs_rights(abi)
    fds: list[tuple[str, int]] = []
    try:
        for path in (directory, *extra_writable):
            fds.append((path, _open_path(path)))
        for path in DEVICE_SINKS:
            try:
                fds.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
            except OSError:
                pass  # no such device here (e.g. no /dev/tty in a container): nothing to grant
        _restrict(handled, fds, deny_tcp)
    finally:
        for _, fd in fds:
            os.close(fd)


def _open_path(path: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise SandboxError(f"writable path {path!r} does not exist") from None
        raise SandboxError(f"writable path {path!r}: {exc.strerror}") from None


def _restrict(handled: int, fds: Sequence[tuple[str, int]], deny_tcp: bool) -> None:
    attr = _RulesetAttr(handled, _NET_BIND_TCP | _NET_CONNECT_TCP if deny_tcp else 0)
    # Pass only the fields in use: an older kernel rejects a longer struct it does not know.
    size = ctypes.sizeof(attr) if deny_tcp else ctypes.sizeof(ctypes.c_uint64)
    try:
        ruleset = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    except OSError as exc:
        raise SandboxError(f"landlock_create_ruleset failed: {exc.strerror}") from None
    try:
        for path, fd in fds:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            rule = _PathBeneathAttr(handled if is_dir else handled & _FS_FILE_RIGHTS, fd)
            try:
                _syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
            except OSError as exc:
                raise SandboxError(f"landlock_add_rule for {path!r} failed: {exc.strerror}") from None
        # Required of an unprivileged process, and keeps set-user-ID programs from escaping.
        if _libc().prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0)) != 0:
            raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
        try:
            _syscall(_SYS_RESTRICT_SELF, ruleset, 0)
        except OSError as exc:
            raise SandboxError(f"landlock_restrict_self failed: {exc.strerror}") from None
    finally:
        os.close(ruleset)


# --- command line ------------------------------------------------------------------------------------


def _parse(argv: Sequence[str]) -> tuple[list[str], bool, list[str]]:
    """``(writable, deny_tcp, command)``; raises ``ValueError`` with the problem."""
    writable: list[str] = []
    deny_tcp = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            command = list(argv[i + 1:])
            if not command:
                raise ValueError("no COMMAND after --")
            if not writable:
                raise ValueError("--writable is required")
            return writable, deny_tcp, command
        if arg == "--writable":
            if i + 1 == len(argv):
                raise ValueError("--writable needs a path")
            writable.append(argv[i + 1])
            i += 2
        elif arg.startswith("--writable="):
            writable.append(arg.partition("=")[2])
            i += 1
        elif arg == "--deny-tcp":
            deny_tcp = True
            i += 1
        else:
            raise ValueError(f"unknown argument {arg!r}")
    raise ValueError("missing -- before COMMAND")


def main(argv: Sequence[str] | None = None) -> int:
    """Confine, then execute the command in place; returns an exit status only when that fails."""
    try:
        writable, deny_tcp, command = _parse(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"{_PROGRAM}: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        confine_writes(writable[0], extra_writable=writable[1:], deny_tcp=deny_tcp)
    except SandboxError as exc:
        print(f"{_PROGRAM}: {exc}", file=sys.stderr)
        return 126
    _restore_signals()
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        print(f"{_PROGRAM}: {command[0]}: command not found", file=sys.stderr)
        return 127
    except OSError as exc:
        print(f"{_PROGRAM}: {command[0]}: {exc.strerror}", file=sys.stderr)
        return 126
    return 126  # not reached: execvp returns only by raising


def _restore_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec: give the
    # command the defaults, as subprocess does, or `yes | head -1` complains of a broken pipe.
    import signal

    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
