"""How durable commits are cheapest on this disk: the raw measurements behind runstore's
choice to sync after releasing its lock (and not through a group-commit gate).

P processes each append a 534-byte line under an exclusive flock, then make it durable with
``fdatasync``, for a few seconds. Ways compared, in one run:

* ``inside``: fdatasync while holding the lock (one commit at a time);
* ``after``: fdatasync after releasing it (runstore's way: the kernel may overlap the syncs);
* ``gate``: after, but through a second lock, skipping the sync when another process's sync
  already covered the line (a leader/follower group commit);
* ``prealloc``: like ``after``, but overwriting space written with zeros beforehand, so a
  sync has no file-size change to commit (what SQLite's and PostgreSQL's logs do);
* ``sidelog``: the journal appended without a sync, each line also written into a zeroed
  side file at the same offset, and only the side file synced (a redo log beside a journal
  that stays plain JSON lines). It gains nothing over ``after``: the journal's own growth
  still has to reach ext4's journal, and the side file's sync waits for that commit.

``--cs-us`` busy-waits that long inside the lock and again outside, like a critical section
and a caller's own work. Run: ``python -m benchmarks.bench_sync [--procs 2] [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import tempfile
import time

LINE = b"x" * 533 + b"\n"
MODES = ("inside", "after", "gate", "prealloc", "sidelog")
PREALLOC = 64 << 20  # enough for ~10 s at 11,000 commits/s; beyond it writes append


def _spin(us: float) -> None:
    until = time.perf_counter() + us / 1e6
    while time.perf_counter() < until:
        pass


def _worker(work: str, mode: str, seconds: float, cs_us: float) -> tuple[float, float]:
    """(commits/s, syncs/s) of one process."""
    flags = os.O_RDWR if mode == "prealloc" else os.O_RDWR | os.O_APPEND
    fd = os.open(os.path.join(work, "data"), flags)
    side = os.open(os.path.join(work, "side"), os.O_RDWR)
    lock = os.open(os.path.join(work, "lock"), os.O_RDWR)
    gate = os.open(os.path.join(work, "gate"), os.O_RDWR)
    commits = syncs = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _spin(cs_us)
        if mode == "prealloc":  # the shared end of data lives in the lock file
            end = int.from_bytes(os.pread(lock, 8, 0).ljust(8, b"\0"), "little")
            os.pwrite(fd, LINE, end)
            end += len(LINE)
            os.pwrite(lock, end.to_bytes(8, "little"), 0)
        else:
            os.write(fd, LINE)
            end = os.fstat(fd).st_size
            if mode == "sidelog":
                os.pwrite(side, LINE, end - len(LINE))
        if mode == "inside":
            os.fdatasync(fd)
            syncs += 1
        fcntl.flock(lock, fcntl.LOCK_UN)
        if mode in ("after", "prealloc", "sidelog"):
            os.fdatasync(side if mode == "sidelog" else fd)
            syncs += 1
        elif mode == "gate":
            fcntl.flock(gate, fcntl.LOCK_EX)
            covered = int.from_bytes(os.pread(gate, 8, 0).ljust(8, b"\0"), "little")
            if covered < end:
                reach = os.fstat(fd).st_size
                os.fdatasync(fd)
                syncs += 1
                os.pwrite(gate, reach.to_bytes(8, "little"), 0)
            fcntl.flock(gate, fcntl.LOCK_UN)
        commits += 1
        _spin(cs_us)
    elapsed = time.perf_counter() - start
    return commits / elapsed, syncs / elapsed


def measure(mode: str, procs: int, seconds: float, cs_us: float, base: str | None) -> tuple[
        float, float]:
    """Total (commits/s, syncs/s) of ``procs`` processes in a fresh directory."""
    work = tempfile.mkdtemp(prefix="runstore-sync-", dir=base)
    try:
        for name in ("data", "lock", "gate", "side"):
            os.close(os.open(os.path.join(work, name), os.O_RDWR | os.O_CREAT, 0o600))
        if mode in ("prealloc", "sidelog"):
            fd = os.open(os.path.join(work, "data" if mode == "prealloc" else "side"),
                         os.O_WRONLY)
            zeros = bytes(1 << 20)
            for _ in range(PREALLOC >> 20):
                os.write(fd, zeros)
            os.fsync(fd)
            os.close(fd)
        read, write = os.pipe()
        pids = []
        for _ in range(procs):
            pid = os.fork()
            if pid == 0:
                commits, syncs = _worker(work, mode, seconds, cs_us)
                os.write(write, f"{commits} {syncs}\n".encode())
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(write)
        figures = [float(x) for x in os.read(read, 1 << 16).split()]
        os.close(read)
        return sum(figures[0::2]), sum(figures[1::2])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_sync",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--cs-us", type=float, default=0.0,
                        help="microseconds spent inside the lock, and again outside it")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workdir", default=None, help="where the files are (default: temp)")
    args = parser.parse_args(argv)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    print(f"{args.procs} processes, {args.seconds:g} s each, {args.cs_us:g} us in and out "
          "of the lock")
    print("| way | commits/s | fdatasyncs/s |\n|---|---:|---:|")
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; use {', '.join(MODES)}")
        commits, syncs = measure(mode, args.procs, args.seconds, args.cs_us, args.workdir)
        print(f"| {mode} | {commits:,.0f} | {syncs:,.0f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
