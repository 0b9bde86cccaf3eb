"""Shared helpers of the fault suite (tests/test_faults_*.py, tests/test_bad_input.py).

* sizes: ``sized(ci, full, full_size)`` scales every loop by ``RUNSTORE_STRESS_SCALE``;
  ``figure(capsys, ...)`` prints a test's figures into the CI log.
* ``RecordingFS``: a ``FileSystem`` that logs every write (file, offset, bytes), sync,
  truncate, create, rename and unlink the store performs; ``crash_states`` turns a prefix of
  that log into the files a power loss could leave behind (unsynced writes dropped, torn,
  zeroed, replaced by garbage; directory changes persisted in order up to an unsynced point).
  ``History`` drives a store through random operations while recording what was acknowledged
  when, and ``check_crash_state`` opens a crash state and compares it with what was
  acknowledged.
* ``FailingFS``: makes the k-th write / fdatasync / fsync / replace fail, once or from then on.
* broken locking, for the proofs that the race test can fail: ``no_cross_process_lock``,
  ``lockf_without_mutex``, ``lock_the_data_file`` patch ``runstore.lock.StoreLock`` in the
  process that calls them (the stress workers call them through ``Config.setup``).
* ``AckLog``: the write-ahead log a child process keeps of what it invoked and what was
  acknowledged, so a parent can check a SIGKILLed child's acknowledged writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import orjson
import pytest

import runstore.lock
import runstore.store
from runstore import (
    CorruptStoreError,
    PrepareOutcome,
    Run,
    Status,
    Store,
    StoreIOError,
    codec,
    journal,
    owner,
)
from runstore.errors import RunstoreError
from runstore.fsio import FileSystem
from runstore.stress import check_journal

# -- sizes and figures ----------------------------------------------------------------------


def scale() -> float:
    """``RUNSTORE_STRESS_SCALE`` (default 1): multiplies every loop count of the suite."""
    return float(os.environ.get("RUNSTORE_STRESS_SCALE", "1"))


def sized(ci: int, full: int, full_size: bool = False) -> int:
    """The number of iterations: ``full`` under the stress marker, else ``ci``, scaled."""
    return max(1, round((full if full_size else ci) * scale()))


def figure(capsys: Any, family: str, **numbers: Any) -> None:
    """Print one line of figures so that it appears in the CI log even when output is
    captured."""
    text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in numbers.items())
    with capsys.disabled():
        print(f"\n[fault figures] {family}: {text}", flush=True)


def open_fds() -> set[str]:
    """The descriptors open in this process (to prove none leaked)."""
    return set(os.listdir("/proc/self/fd"))


def run_for(machine: str = "m1", digest: str = "h1", **fields: Any) -> Run:
    return Run(machine=machine, test_dir=f"/tests/{digest}", test_dir_hash=digest, **fields)


def snapshot_dir(path: str) -> dict[str, bytes]:
    """Every regular file of a directory with its bytes (to prove a file was not changed)."""
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        st = os.lstat(full)
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                out[name] = f.read()
    return out


# -- write-ahead acknowledgement logs of child processes ------------------------------------


class AckLog:
    """A child's log: ``invoke(op, key)`` before a call, ``ack(op, run)`` after it returned,
    each flushed at once, so the parent knows what a SIGKILLed child had acknowledged."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _put(self, *item: Any) -> None:
        os.write(self._fd, orjson.dumps(item) + b"\n")

    def invoke(self, op: str, key: str = "") -> None:
        self._put("i", op, key)

    def ack(self, op: str, run: Run | None = None) -> None:
        if run is None:
            self._put("a", op, "", 0, "")
        else:
            self._put("a", op, run.id, run.revision, run.status.value)

    def close(self) -> None:
        os.close(self._fd)


@attrs.define
class Acked:
    """What a set of acknowledgement logs says: the latest acknowledged revision and status
    of each run, and the run (if any) of each call that was in flight when a child died."""

    runs: dict[str, tuple[int, str]] = attrs.Factory(dict)
    in_flight: list[tuple[str, str]] = attrs.Factory(list)
    acks: int = 0


def read_acks(paths: Sequence[str]) -> Acked:
    out = Acked()
    for path in paths:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            continue
        pending = None
        for line in raw.split(b"\n"):
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if item[0] == "i":
                pending = (item[1], item[2])
                continue
            pending = None
            out.acks += 1
            _op, rid, rev, status = item[1:5]
            if rid and rev > out.runs.get(rid, (0, ""))[0]:
                out.runs[rid] = (rev, status)
        if pending is not None:
            out.in_flight.append(pending)
    return out


def lost_acks(acked: Acked, runs: dict[str, Run]) -> list[str]:
    """Acknowledged changes missing from ``runs`` (the reopened store's runs by id): a run
    whose stored revision is older than acknowledged, or whose acknowledged terminal
    version was changed."""
    lost = []
    for rid, (rev, status) in acked.runs.items():
        got = runs.get(rid)
        if got is None:
            lost.append(f"run {rid} (revision {rev}, {status}) is missing")
        elif got.revision < rev or (got.revision == rev and got.status.value != status) or (
            Status(status).is_terminal and got.revision != rev
        ):
            lost.append(f"run {rid}: acknowledged revision {rev} ({status}), stored "
                        f"{got.revision} ({got.status.value})")
    return lost


def audit_store(state_dir: str) -> tuple[dict[str, Run], list[str]]:
    """Open the store, read every run and re-check the file: returns the runs by id and the
    problems found (an unreadable store, a bad file, two active runs on a machine)."""
    problems: list[str] = []
    try:
        with Store(state_dir, lock_timeout=10) as store:
            runs = {r.id: r for r in store.list()}
    except (RunstoreError, OSError) as exc:
        return {}, [f"store unreadable: {type(exc).__name__}: {exc}"]
    report = journal.check(state_dir)
    problems.extend(f"check: {p.message}" for p in report.problems)
    jc = check_journal(os.path.join(state_dir, journal.DATA_NAME))
    problems.extend(f"journal: {p}" for p in jc.problems)
    active: dict[str, str] = {}
    for run in runs.values():
        if not run.status.is_terminal:
            if run.machine in active:
                problems.append(f"machine {run.machine} has two active runs "
                                f"{active[run.machine]} and {run.id}")
            active[run.machine] = run.id
    return runs, problems


# -- broken locking (the race test must catch each) -----------------------------------------


class _NoMutex:
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass


def no_cross_process_lock() -> None:
    """StoreLock takes only its thread mutex: processes do not exclude each other."""
    def lock_file(self: Any, fd: int, deadline: float, timeout: float) -> None:
        return None

    runstore.lock.StoreLock._lock_file = lock_file  # type: ignore[method-assign]  # the bug
    runstore.lock.StoreLock.release_file = lambda self: None  # type: ignore[method-assign]


def lockf_without_mutex() -> None:
    """POSIX record locks (lockf) on the lock file and no thread mutex: threads of one
    process sharing a Store all get in (a process owns a record lock, not a thread)."""
    original_init = runstore.lock.StoreLock.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._mutex = _NoMutex()

    def lock_file(self: Any, fd: int, deadline: float, timeout: float) -> None:
        fcntl.lockf(fd, fcntl.LOCK_EX)

    def release_file(self: Any) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    runstore.lock.StoreLock.__init__ = init  # type: ignore[method-assign]  # the bug
    runstore.lock.StoreLock._lock_file = lock_file  # type: ignore[method-assign]
    runstore.lock.StoreLock.release_file = release_file  # type: ignore[method-assign]


def lock_the_data_file() -> None:
    """flock the journal itself (opened afresh at each acquire) instead of runs.lock, and
    compact often: a process that waited on the replaced inode and one that opened the new
    file both hold "the" lock."""
    def lock_file(self: Any, fd: int, deadline: float, timeout: float) -> None:
        path = os.path.join(os.path.dirname(self.lock_path), journal.DATA_NAME)
        data_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(data_fd, fcntl.LOCK_EX)
        self._data_fd = data_fd

    def release_file(self: Any) -> None:
        data_fd = getattr(self, "_data_fd", None)
        if data_fd is not None:
            self._data_fd = None
            os.close(data_fd)  # closing drops the flock

    original_append = runstore.store.Store._append
    rng = random.Random()

    def append(self: Any, changes: Any) -> int:
        end: int = original_append(self, changes)
        if rng.random() < 0.3:
            self._index_appended()  # compaction works on a complete view
            self._compact(retain=0)
        return end

    runstore.lock.StoreLock._lock_file = lock_file  # type: ignore[method-assign]  # the bug
    runstore.lock.StoreLock.release_file = release_file  # type: ignore[method-assign]
    runstore.store.Store._append = append  # type: ignore[method-assign]


# -- store helpers: a cycle, the whole view, checkpoint lines -------------------------------


def cycle(store: Store, machine: str, test_dir: str = "/t") -> str:
    """One dispatcher cycle (prepare, start, finish completed) on ``machine``; the run id."""
    run, _ = store.prepare_atomic(machine, "h", lambda: Run(machine, test_dir, "h"))
    store.start(run.id)
    store.finish(run.id, Status.COMPLETED, exit_code=0)
    return run.id


def history(store: Any, n: int, machines: int = 13, prefix: str = "m") -> None:
    """``n`` prepare/start/finish cycles on ``machines`` machines named ``prefix`` + a
    number, on any backend: some runs left pending or running, a reused one failed."""
    for i in range(n):
        m = f"{prefix}{i % machines}"
        run, outcome = store.prepare_atomic(m, "h", lambda m=m: Run(m, "/t", "h"))
        if outcome is not PrepareOutcome.CREATED:
            if run.status is Status.PENDING:
                store.start(run.id)
            store.finish(run.id, Status.FAILED, exit_code=1)
            continue
        if i % 4:
            store.start(run.id)
        if i % 4 > 1:
            store.finish(run.id, Status.COMPLETED, exit_code=0)


def view(store: Store) -> tuple[object, ...]:
    """Everything a caller can see of a store's view, the change feed included."""
    stats = store.stats()
    return (store.list(), store.active(), store.last_seq(), list(store.changes(0)),
            stats.runs, stats.superseded_lines, stats.oldest_seq,
            [store.active_by_machine(f"m{i}") for i in range(6)])


@contextlib.contextmanager
def full_reading() -> Iterator[None]:
    """Opening as before checkpoints: every line since the base read."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(journal.Journal, "last_checkpoint", lambda self, lo, hi: None)
        yield


def checkpoints(path: str | os.PathLike[str]) -> list[tuple[int, bytes]]:
    """The checkpoint lines of a journal, each with its offset."""
    out, offset = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(codec.CHECKPOINT_START):
                out.append((offset, line))
            offset += len(line)
    return out


# -- a failing file system ------------------------------------------------------------------


class ReadLog(FileSystem):
    """Plain I/O that counts what is read: ``sizes`` asked for, ``read`` bytes returned."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.read = 0

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        data = super().pread(fd, size, offset)
        self.sizes.append(size)
        self.read += len(data)
        return data


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held(state_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Another process holding an exclusive flock on the store's runs.lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, os.path.join(state_dir, "runs.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


class FailingFS(FileSystem):
    """Fail the ``nth`` call (1-based) of ``kind`` ("write", "fdatasync", "fsync", "replace",
    "ftruncate", "open") with ``err``; ``persistent`` fails every later call of that kind
    too. ``partial`` makes a failing write first write half its bytes (a short write, then
    the error on the next call), as ENOSPC does."""

    def __init__(self, kind: str, nth: int, err: int = errno.EIO, *, persistent: bool = False,
                 partial: bool = False) -> None:
        self.kind, self.nth, self.err = kind, nth, err
        self.persistent, self.partial = persistent, partial
        self.calls: dict[str, int] = {}
        self.failed = 0
        self.armed = True
        self._short_done = False

    def _fail(self, kind: str) -> bool:
        if not self.armed or kind != self.kind:
            return False
        n = self.calls[kind] = self.calls.get(kind, 0) + 1
        if n == self.nth or (self.persistent and n > self.nth):
            self.failed += 1
            return True
        return False

    def _raise(self) -> None:
        raise OSError(self.err, os.strerror(self.err))

    def open(self, name: str, flags: int, mode: int, dir_fd: int) -> int:
        if self._fail("open"):
            self._raise()
        return super().open(name, flags, mode, dir_fd)

    def write(self, fd: int, data: bytes) -> int:
        if self.partial and self.kind == "write" and self.armed and not self._short_done:
            n = self.calls.get("write", 0) + 1
            if n == self.nth and len(data) > 1:
                self._short_done = True
                return super().write(fd, bytes(data[:len(data) // 2]))
        if self._fail("write"):
            self._raise()
        return super().write(fd, data)

    def fdatasync(self, fd: int) -> None:
        if self._fail("fdatasync"):
            self._raise()
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        if self._fail("fsync"):
            self._raise()
        super().fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        if self._fail("ftruncate"):
            self._raise()
        super().ftruncate(fd, length)

    def replace(self, src: str, dst: str, dir_fd: int) -> None:
        if self._fail("replace"):
            self._raise()
        super().replace(src, dst, dir_fd)


# -- a recording file system and the crash states it implies --------------------------------


@attrs.frozen
class Op:
    """One logged file-system operation. ``file`` numbers an inode (0 for directory ops)."""

    kind: str  # create | write | truncate | sync | lostsync | dirsync | rename | unlink
    file: int = 0
    offset: int = 0
    data: bytes = b""
    name: str = ""
    dst: str = ""


class RecordingFS(FileSystem):
    """Performs every operation and logs it. ``initial`` names the files already in the
    directory (all durable). ``skip`` removes syncs from the store, as a bug would:
    "fdatasync", "fsync_file" (the temp file before its rename), "fsync_dir".
    ``fail_fdatasync`` fails those fdatasync calls (1-based) with EIO the way Linux may after
    a write-back error: the pages are marked clean without reaching the disk ("fsyncgate"),
    so the writes they held may be lost whatever later syncs say."""

    def __init__(self, initial: dict[str, bytes] | None = None, *,
                 skip: frozenset[str] = frozenset(),
                 fail_fdatasync: frozenset[int] = frozenset()) -> None:
        self.ops: list[Op] = []
        self.initial: dict[int, bytes] = {}
        self.initial_names: dict[int, str] = {}
        self.names: dict[str, int] = {}
        self.fds: dict[int, int] = {}
        self.appending: set[int] = set()
        self.opened: list[tuple[str, int]] = []  # (name, flags) of every open
        self.skip = skip
        self.fail_fdatasync = fail_fdatasync
        self.fdatasyncs = 0
        self._inodes = itertools.count(1)
        for name, data in (initial or {}).items():
            ino = next(self._inodes)
            self.initial[ino] = data
            self.initial_names[ino] = name
            self.names[name] = ino

    @property
    def position(self) -> int:
        return len(self.ops)

    def open(self, name: str, flags: int, mode: int, dir_fd: int) -> int:
        self.opened.append((name, flags))
        fd = super().open(name, flags, mode, dir_fd)
        if flags & os.O_CREAT and (flags & os.O_EXCL or name not in self.names):
            ino = next(self._inodes)
            self.names[name] = ino
            self.ops.append(Op("create", ino, name=name))
        elif name not in self.names:  # a file that was there before recording began
            ino = next(self._inodes)
            self.initial[ino] = os.pread(fd, 1 << 30, 0)
            self.initial_names[ino] = name
            self.names[name] = ino
        self.fds[fd] = self.names[name]
        if flags & os.O_APPEND:
            self.appending.add(fd)
        return fd

    def write(self, fd: int, data: bytes) -> int:
        ino = self.fds.get(fd)
        if ino is None:
            return super().write(fd, data)
        offset = os.fstat(fd).st_size if fd in self.appending else os.lseek(fd, 0, os.SEEK_CUR)
        n = super().write(fd, data)
        self.ops.append(Op("write", ino, offset, bytes(data[:n])))
        return n

    def ftruncate(self, fd: int, length: int) -> None:
        super().ftruncate(fd, length)
        if fd in self.fds:
            self.ops.append(Op("truncate", self.fds[fd], length))

    def _sync(self, fd: int, kind: str) -> None:
        if fd in self.fds:
            if kind in self.skip or (kind == "fsync" and "fsync_file" in self.skip):
                return
            if kind == "fdatasync":
                self.fdatasyncs += 1
                if self.fdatasyncs in self.fail_fdatasync:
                    self.ops.append(Op("lostsync", self.fds[fd]))
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
            getattr(os, kind)(fd)
            self.ops.append(Op("sync", self.fds[fd]))
        elif stat.S_ISDIR(os.fstat(fd).st_mode):
            if "fsync_dir" in self.skip:
                return
            os.fsync(fd)
            self.ops.append(Op("dirsync"))
        else:
            getattr(os, kind)(fd)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def fsync(self, fd: int) -> None:
        self._sync(fd, "fsync")

    def replace(self, src: str, dst: str, dir_fd: int) -> None:
        super().replace(src, dst, dir_fd)
        self.names[dst] = self.names.pop(src)
        self.ops.append(Op("rename", name=src, dst=dst))

    def unlink(self, name: str, dir_fd: int) -> None:
        super().unlink(name, dir_fd)
        self.names.pop(name, None)
        self.ops.append(Op("unlink", name=name))

    def close(self, fd: int) -> None:
        self.fds.pop(fd, None)
        self.appending.discard(fd)
        super().close(fd)


#: what a crash may do to one write that was not synced
WRITE_FATES = ("kept", "dropped", "torn", "zeros", "garbage")


@attrs.define
class Replay:
    """The log up to a crash point, digested: per inode its operations with a flag telling
    whether each is certainly on disk; the directory's certain entries and its unsynced
    changes in order."""

    file_ops: dict[int, list[tuple[Op, bool]]]
    initial: dict[int, bytes]
    dir_certain: dict[str, int]
    dir_pending: list[Op]

    def uncertain(self, inodes: set[int]) -> list[tuple[int, int]]:
        """(inode, index) of every operation of these inodes that may or may not be on disk."""
        return [(ino, i) for ino in sorted(inodes)
                for i, (_op, certain) in enumerate(self.file_ops.get(ino, ())) if not certain]


def replay(rec: RecordingFS, upto: int) -> Replay:
    """Digest ``rec.ops[:upto]``."""
    file_ops: dict[int, list[tuple[Op, bool]]] = {}
    lost: dict[int, set[int]] = {}
    certain_entries = {name: ino for ino, name in rec.initial_names.items()}
    pending: list[Op] = []
    for op in rec.ops[:upto]:
        if op.kind in ("write", "truncate"):
            file_ops.setdefault(op.file, []).append((op, False))
        elif op.kind == "sync":
            ops = file_ops.get(op.file, [])
            gone = lost.get(op.file, set())
            file_ops[op.file] = [(o, c or i not in gone) for i, (o, c) in enumerate(ops)]
        elif op.kind == "lostsync":  # these writes may never reach the disk now
            ops = file_ops.get(op.file, [])
            lost.setdefault(op.file, set()).update(i for i, (_o, c) in enumerate(ops) if not c)
        elif op.kind == "dirsync":
            for dop in pending:
                _apply_dir(certain_entries, dop)
            pending = []
        else:  # create, rename, unlink
            pending.append(op)
    return Replay(file_ops, rec.initial, certain_entries, pending)


def _apply_dir(entries: dict[str, int], op: Op) -> None:
    if op.kind == "create":
        entries[op.name] = op.file
    elif op.kind == "rename":
        if op.name in entries:
            entries[op.dst] = entries.pop(op.name)
    elif op.kind == "unlink":
        entries.pop(op.name, None)


def _write_at(buf: bytearray, offset: int, data: bytes) -> None:
    if offset > len(buf):
        buf.extend(bytes(offset - len(buf)))
    buf[offset:offset + len(data)] = data


def materialise(rp: Replay, dir_prefix: int, fates: dict[tuple[int, int], str],
                rng: random.Random) -> dict[str, bytes]:
    """The files of one crash state: the directory changes up to ``dir_prefix`` persisted,
    each uncertain file operation with its fate (default: dropped)."""
    entries = dict(rp.dir_certain)
    for op in rp.dir_pending[:dir_prefix]:
        _apply_dir(entries, op)
    files = {}
    for name, ino in entries.items():
        buf = bytearray(rp.initial.get(ino, b""))
        for i, (op, certain) in enumerate(rp.file_ops.get(ino, ())):
            fate = "kept" if certain else fates.get((ino, i), "dropped")
            if fate == "dropped":
                continue
            if op.kind == "truncate":
                del buf[op.offset:]
                continue
            data = op.data
            if fate == "torn":
                data = data[:rng.randrange(len(data))] if data else data
            elif fate == "zeros":
                data = bytes(len(data))
            elif fate == "garbage":
                data = rng.randbytes(len(data))
            _write_at(buf, op.offset, data)
        files[name] = bytes(buf)
    return files


def crash_states(rec: RecordingFS, rng: random.Random, *, exhaustive: bool, limit: int,
                 points: Sequence[int] | None = None
                 ) -> Iterator[tuple[int, dict[str, bytes]]]:
    """(crash point, files) pairs. Exhaustive: every crash point (or ``points``), every
    persisted prefix of the unsynced directory changes and every combination of fates of the
    unsynced writes, while that stays under ``limit`` states per point (else ``limit`` random
    ones). Otherwise ``limit`` random states at random crash points."""
    if not exhaustive:
        for _ in range(limit):
            k = rng.randrange(rec.position + 1) if points is None else rng.choice(points)
            rp = replay(rec, k)
            yield k, _random_state(rp, rng)
        return
    for k in (range(rec.position + 1) if points is None else points):
        rp = replay(rec, k)
        inodes = set(rp.dir_certain.values()) | {op.file for op in rp.dir_pending if op.file}
        slots = rp.uncertain(inodes)
        options = [WRITE_FATES if rp.file_ops[ino][i][0].kind == "write" else ("kept", "dropped")
                   for ino, i in slots]
        total = (len(rp.dir_pending) + 1)
        for o in options:
            total *= len(o)
        if total > limit:
            for _ in range(limit):
                yield k, _random_state(rp, rng)
            continue
        for prefix in range(len(rp.dir_pending) + 1):
            for combo in itertools.product(*options):
                yield k, materialise(rp, prefix, dict(zip(slots, combo, strict=True)), rng)


def _random_state(rp: Replay, rng: random.Random) -> dict[str, bytes]:
    inodes = set(rp.dir_certain.values()) | {op.file for op in rp.dir_pending if op.file}
    fates = {}
    for ino, i in rp.uncertain(inodes):
        if rp.file_ops[ino][i][0].kind == "write":
            fates[(ino, i)] = rng.choice(WRITE_FATES)
        else:
            fates[(ino, i)] = rng.choice(("kept", "dropped"))
    return materialise(rp, rng.randrange(len(rp.dir_pending) + 1), fates, rng)


@attrs.define
class History:
    """A store driven through random operations on a ``RecordingFS``, remembering after each
    operation the runs the store held (``snaps``), where in the log each operation started
    and returned, which returned (acknowledged) and which were durability barriers even
    without ``durable`` (compaction, close). After a failed sync the store's reads leave the
    unsynced lines out, but a crash may keep them: ``maybe`` holds the runs the file held
    after each operation that raised (None after the others)."""

    rec: RecordingFS
    durable: bool
    snaps: list[dict[str, Run]] = attrs.Factory(list)
    started: list[int] = attrs.Factory(list)
    acked: list[int | None] = attrs.Factory(list)
    barriers: list[bool] = attrs.Factory(list)
    names: list[str] = attrs.Factory(list)
    maybe: list[dict[str, Run] | None] = attrs.Factory(list)

    def allowed(self, k: int) -> tuple[int, int]:
        """The range of snapshots a crash after log position ``k`` may show: from the latest
        acknowledged change (durable mode; else the latest compaction or close) to the
        latest operation that had begun writing."""
        done = [j for j, a in enumerate(self.acked) if a is not None and a <= k
                and (self.barriers[j] if not self.durable else a > self.started[j])]
        low = max(done) if done else 0
        high = max(j for j, s in enumerate(self.started)
                   if s < k or j == 0 or (self.acked[j] is not None and self.acked[j] <= k))
        return low, high


def record_history(state_dir: str, rng: random.Random, steps: int, *, durable: bool = True,
                   rec: RecordingFS | None = None, machines: int = 2,
                   compact_every: int = 0) -> History:
    """Run ``steps`` random operations (prepare, start, heartbeat, update, finish, create,
    compact, close and reopen) on a store in ``state_dir`` through ``rec``. Snapshot 0 is
    the state after opening (creation or recovery)."""
    rec = rec or RecordingFS()
    h = History(rec, durable)
    store: Store | None = None

    def step(name: str, fn: Callable[[], Any], barrier: bool = False) -> None:
        nonlocal store
        h.started.append(rec.position)
        h.names.append(name)
        h.barriers.append(barrier)
        try:
            fn()
            h.acked.append(rec.position)
            h.maybe.append(None)
        except StoreIOError:
            h.acked.append(None)
            h.maybe.append(_runs_in_copy(state_dir))
        assert store is not None
        try:
            h.snaps.append({r.id: r for r in store.list()})
        except StoreIOError:
            h.snaps.append(dict(h.snaps[-1]) if h.snaps else {})

    def open_store() -> None:
        nonlocal store
        store = Store(state_dir, durable=durable, _fs=rec)

    step("open", open_store, barrier=True)
    for n in range(steps):
        assert store is not None
        s = store
        runs = h.snaps[-1]
        active = [r for r in runs.values() if not r.is_terminal]
        pending = [r for r in active if r.status is Status.PENDING]
        roll = rng.random()
        if compact_every and n % compact_every == compact_every - 1:
            step("compact", s.compact, barrier=True)
        elif roll < 0.30 or not active:
            m, d = f"m{rng.randrange(machines)}", f"h{rng.randrange(2)}"
            step("prepare", lambda s=s, m=m, d=d: s.prepare_atomic(m, d, lambda: run_for(m, d)))
        elif roll < 0.45 and pending:
            rid = rng.choice(pending).id
            step("start", lambda s=s, rid=rid: s.start(rid))
        elif roll < 0.55:
            rid = rng.choice(active).id
            step("heartbeat", lambda s=s, rid=rid: s.heartbeat(rid))
        elif roll < 0.62:
            r = rng.choice(active)
            new = attrs.evolve(r, artifacts_path=f"/a/{rng.randrange(1000)}")
            step("update", lambda s=s, new=new: s.update(new))
        elif roll < 0.82:
            rid = rng.choice(active).id
            st = rng.choice([x for x in Status if x.is_terminal
                             and (x is not Status.COMPLETED or runs[rid].status is Status.RUNNING)])
            step("finish", lambda s=s, rid=rid, st=st: s.finish(rid, st))
        elif roll < 0.88:
            m = f"x{rng.randrange(100)}"
            step("create", lambda s=s, m=m: s.create(run_for(m, "hx", status=Status.COMPLETED)))
        elif roll < 0.94:
            step("compact", s.compact, barrier=True)
        else:
            def reopen() -> None:
                assert store is not None
                store.close()
                open_store()
            step("reopen", reopen, barrier=True)
    assert store is not None
    store.close()
    return h


def _runs_in_copy(state_dir: str) -> dict[str, Run]:
    """The runs a copy of the journal in ``state_dir`` holds, every line taken (the store
    itself is left alone)."""
    copy = tempfile.mkdtemp()
    try:
        shutil.copyfile(os.path.join(state_dir, journal.DATA_NAME),
                        os.path.join(copy, journal.DATA_NAME))
        with Store(copy) as store:
            return {r.id: r for r in store.list()}
    finally:
        shutil.rmtree(copy)


class Scratch:
    """A scratch directory re-created for each crash state."""

    def __init__(self, base: str) -> None:
        self.path = os.path.join(base, "crash")

    def write(self, files: dict[str, bytes]) -> str:
        shutil.rmtree(self.path, ignore_errors=True)
        os.mkdir(self.path, 0o700)
        for name, data in files.items():
            fd = os.open(os.path.join(self.path, name), os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return self.path


def check_crash_state(scratch: Scratch, files: dict[str, bytes], h: History, k: int, *,
                      write_after: bool = False) -> str | None:
    """Open the crash state ``files`` (a power loss after log position ``k`` of ``h``):
    return None when it opens to one of the snapshots the crash may show, else what is
    wrong. With ``write_after`` also write to it and reopen (recovery left a usable store)."""
    path = scratch.write(files)
    low, high = h.allowed(k)
    try:
        with _rebooted(), Store(path, lock_timeout=5) as store:
            got = {r.id: r for r in store.list()}
            if write_after:
                store.create(run_for("after-crash", "h", status=Status.COMPLETED))
        report = journal.check(path)
        if not report.ok:
            return f"crash point {k}: the reopened file fails check: {report.problems[0]}"
        if write_after:
            with Store(path) as store:
                again = {r.id: r for r in store.list() if r.machine != "after-crash"}
            if again != got:
                return f"crash point {k}: a write after recovery changed the recovered runs"
    except CorruptStoreError as exc:
        return f"crash point {k}: a legal crash state was refused: {exc}"
    except (RunstoreError, OSError) as exc:
        return f"crash point {k}: {type(exc).__name__}: {exc}"
    for j in range(high, low - 1, -1):
        if got in (h.snaps[j], h.maybe[j]):
            return None
    detail = _diff(h.snaps[low], got)
    return (f"crash point {k}: the store shows none of the states {low}..{high} "
            f"(after {h.names[low]!r} .. {h.names[high]!r}); vs state {low}: {detail}")


@contextlib.contextmanager
def _rebooted() -> Iterator[None]:
    """Open a crash state as after the reboot a power loss is: another boot id, so that no
    checkpoint is taken on the word of the boot that wrote it."""
    real = owner.boot_id
    owner.boot_id = lambda: "after-the-power-loss"  # type: ignore[assignment]
    try:
        yield
    finally:
        owner.boot_id = real  # type: ignore[assignment]


def _diff(want: dict[str, Run], got: dict[str, Run]) -> str:
    missing = [i for i in want if i not in got]
    extra = [i for i in got if i not in want]
    changed = [f"{i} rev {want[i].revision}->{got[i].revision}" for i in want
               if i in got and want[i] != got[i]]
    return f"missing {missing[:3]}, extra {extra[:3]}, changed {changed[:3]}"


# -- small process helpers ------------------------------------------------------------------


def wait_pid(pid: int, timeout: float = 30.0) -> int:
    """waitpid with a deadline; returns the raw wait status (kills the child on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.002)


def in_thread(fn: Callable[[], Any]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


# -- writer processes for the failpoint and SIGKILL tests -----------------------------------


def failpoint_names() -> list[str]:
    """Every ``failpoints.hit("...")`` in the package's source (new points are covered
    automatically)."""
    import re

    import runstore

    names: set[str] = set()
    pkg = os.path.dirname(runstore.__file__)
    for name in os.listdir(pkg):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name), encoding="utf-8") as f:
                names.update(re.findall(r'failpoints\.hit\("([^"]+)"\)', f.read()))
    return sorted(names)


def writer(state_dir: str, log_path: str, seed: int, *, ops: int = 10**9, durable: bool = True,
           machines: int = 4, compact_every: int = 0, prune_every: int = 0,
           archive: str = "", store: Store | None = None) -> None:
    """A dispatcher-like writer: random prepare (reaping dead owners) / start / heartbeat /
    finish / update, plus ``compact()`` and ``prune()`` every so many operations, each call
    logged before (invoke) and after (ack) in ``log_path``."""
    rng = random.Random(seed)
    log = AckLog(log_path)
    own = store if store is not None else Store(state_dir, durable=durable, lock_timeout=30)
    mine: list[Run] = []
    for n in range(1, ops + 1):
        if compact_every and n % compact_every == 0:
            log.invoke("compact")
            own.compact()
            log.ack("compact")
            continue
        if prune_every and n % prune_every == 0:
            log.invoke("prune")
            own.prune(keep_last=rng.randrange(1, 4), archive=archive or None)
            log.ack("prune")
            continue
        if not mine or rng.random() < 0.3:
            m, d = f"m{rng.randrange(machines)}", f"h{rng.randrange(2)}"
            log.invoke("prepare", m)
            run, outcome = own.prepare_atomic(m, d, lambda m=m, d=d: run_for(m, d), reap=True)
            log.ack("prepare", run)
            if outcome.value == "created":
                mine.append(run)
            continue
        run = rng.choice(mine)
        roll = rng.random()
        try:
            if run.status is Status.PENDING and roll < 0.5:
                log.invoke("start", run.id)
                new = own.start(run.id)
            elif roll < 0.7:
                log.invoke("heartbeat", run.id)
                new = own.heartbeat(run.id)
            elif roll < 0.8:
                log.invoke("update", run.id)
                new = own.update(attrs.evolve(run, logs_path=f"/l/{n}"))
            else:
                st = Status.COMPLETED if run.status is Status.RUNNING else Status.FAILED
                log.invoke("finish", run.id)
                new = own.finish(run.id, st)
        except RunstoreError:  # reaped or changed by another writer: forget it
            log.ack("error")
            mine.remove(run)
            continue
        log.ack("change", new)
        mine.remove(run)
        if not new.is_terminal:
            mine.append(new)
    own.close()
    log.close()


def spawn_python(code: str, env: dict[str, str] | None = None) -> Any:
    """Start ``python -c code`` with the tests directory importable."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join([here, full.get("PYTHONPATH", "")])
    full.update(env or {})
    return subprocess.Popen([sys.executable, "-c", code], env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
