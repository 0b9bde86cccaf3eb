"""Who owns a run: host name, pid and that process's start time, so a reused pid is not
mistaken for the owner. Linux ``/proc`` is read; elsewhere the start time is empty and
liveness is only judged by the pid."""

from __future__ import annotations

import functools
import os

from . import _forks


@functools.cache
def boot_id() -> str:
    """This boot of the machine (Linux: a random id the kernel makes at boot), or "": data
    written since a boot but never synced is intact as long as that boot lasts."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """A token naming one incarnation of ``pid`` (boot id + start time in clock ticks), or
    "" when the process does not exist or the platform does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    fields = raw[raw.rfind(b")") + 2:].split()
    if fields[:1] == [b"Z"]:
        return ""  # a zombie has exited: only its exit status is left to collect
    # field 22 of /proc/PID/stat is starttime; fields[0] is field 3 (state)
    return f"{boot_id()}:{fields[19].decode()}" if len(fields) > 19 else ""


_me: tuple[str, int, str] | None = None


def current() -> tuple[str, int, str]:
    """(host, pid, start token) of this process; recomputed after fork."""
    global _me
    if _me is None:
        me = _forks.pid()
        _me = (os.uname().nodename, me, process_start(me))
    return _me


@_forks.in_child
def _forget_me() -> None:
    global _me
    _me = None


#: the largest pid a ``pid_t`` holds (a signed 32-bit int on Linux and macOS)
_PID_T_MAX = (1 << 31) - 1


@functools.cache
def pid_limit() -> int:
    """The largest pid a process on this host can have: Linux's ``kernel/pid_max`` less
    one, else the largest ``pid_t``."""
    try:
        with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
            return min(int(f.read().strip()) - 1, _PID_T_MAX)
    except (OSError, ValueError):
        return _PID_T_MAX


def possible_pid(pid: int) -> bool:
    """Whether a process on this host can have ``pid``: 1 to ``pid_limit()``. Any other
    value (0 and negative ones name process groups to ``kill``) is no process here."""
    return 0 < pid <= pid_limit()


def is_alive(host: str, pid: int | None, start: str) -> bool:
    """True only when the owner provably still runs: same host, and its pid belongs to a
    process started at ``start`` (so never where the start time is not known)."""
    if not host or pid is None or not start or host != os.uname().nodename:
        return False
    return possible_pid(pid) and process_start(pid) == start


def is_gone(host: str, pid: int | None, start: str) -> bool:
    """True only when the owner provably no longer runs: same host, and its pid is free,
    now belongs to a process started at another time, or is one no process here can have
    (``possible_pid``)."""
    if not host or pid is None or host != os.uname().nodename:
        return False
    if not possible_pid(pid):
        return True  # no process on this host can have that pid
    now = process_start(pid)
    if now:
        return bool(start) and now != start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
