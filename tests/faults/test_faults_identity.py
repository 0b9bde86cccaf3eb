"""The files under a store change identity while processes use it: the lock file or the
journal deleted, renamed away or replaced by another file. The lock file: every process still
locks the one file at the path (real processes racing ``prepare_atomic`` on one machine never
create two runs for it; a Store object that opened the old file waits for a fresh one, and so
does ``check``). The journal: a live store (in this process or another) refuses every later
call with an error naming the path and what became of its file, creates nothing at the path,
and never appends to the renamed file; a compaction by other processes (a rename over the
journal) is still followed. Each detection test has a broken variant: the identity checks
monkeypatched away, the same scenario then shows the failure (two runs created for one
machine, a silent reset or switch of the store, writes to a renamed file)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faults import snapshot_dir, stop_all

import runstore._journal
import runstore.verify
from runstore import (
    CorruptStoreError,
    LockTimeoutError,
    PrepareOutcome,
    Run,
    Status,
    Store,
    StoreIOError,
    UnsafeStoreError,
    _fileopen,
    _forks,
    _limits,
)
from runstore._journal import Journal
from runstore._lock import StoreLock
from runstore._statedir import DATA_NAME, LOCK_NAME

pytestmark = pytest.mark.timeout(120)

FORK = multiprocessing.get_context("fork")


def _run(machine: str = "m0", digest: str = "h") -> Run:
    return Run(machine=machine, test_dir=f"/tests/{digest}", test_dir_hash=digest)


def _files(path: pathlib.Path) -> dict[str, bytes]:
    """Every regular file of a directory with its bytes (symlinks by their target)."""
    out = {}
    for entry in sorted(path.iterdir()):
        if entry.is_symlink():
            out[entry.name] = b"-> " + os.fsencode(os.readlink(entry))
        elif entry.is_file():
            out[entry.name] = entry.read_bytes()
    return out


@contextlib.contextmanager
def _closing(s: Store) -> Iterator[Store]:
    """Close ``s`` at the end; close() cannot mark a changed journal either (it refuses)."""
    try:
        yield s
    finally:
        with contextlib.suppress(CorruptStoreError, UnsafeStoreError):
            s.close()


def _reap(procs: list[Any], timeout: float) -> list[int | None]:
    """Join worker processes (killing any still alive after ``timeout``); their exit codes."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
    finally:
        stop_all(procs)
    return [p.exitcode for p in procs]


# -- the lock file --------------------------------------------------------------------------

LOCK_CHANGES = ["deleted", "deleted-then-new-file", "renamed-over", "renamed-away"]


def _change_lock_file(state_dir: pathlib.Path, how: str) -> None:
    """Make the lock file at the path another file (or none) than the one already open."""
    path = state_dir / LOCK_NAME
    if how == "deleted":  # a cleaner of old files; the next opener creates a new one
        path.unlink()
    elif how == "deleted-then-new-file":
        path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    elif how == "renamed-over":
        other = state_dir / "other.lock"
        other.write_bytes(b"")
        other.chmod(0o600)
        os.replace(other, path)
    elif how == "renamed-away":  # the old file is still linked, elsewhere
        os.replace(path, state_dir.parent / "moved-away.lock")
    else:
        raise ValueError(how)


def _lock_the_lock_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broken variant: the flock is taken on the lock file instead of the state
    directory, and the locked descriptor is taken to be the file at the path."""
    def lock_the_file(self: StoreLock) -> None:
        if self._fd is None:
            self._open_file()
        self._locked = self._fd

    monkeypatch.setattr(StoreLock, "_open", lock_the_file)
    monkeypatch.setattr(StoreLock, "_still_at_path", lambda self: True)


def _slow_make() -> Run:
    time.sleep(0.15)  # inside the critical section: another holder would overlap it
    return _run()


def _lock_worker(state_dir: str, ready: Any, go: Any, out: Any) -> None:
    """Open a Store (its lock file with it), say so, then race prepare_atomic on m0."""
    try:
        with Store(state_dir, durable=False, lock_timeout=30) as s:
            ready.set()
            go.wait(30)
            _run_row, outcome = s.prepare_atomic("m0", "h", _slow_make)
            out.send(outcome.value)
    except BaseException as exc:  # reported to the parent, which fails the test
        out.send(f"error: {type(exc).__name__}: {exc}")
        raise


def _journal_and_m0_problems(state_dir: pathlib.Path) -> list[str]:
    """What ``check`` finds wrong with the journal, else whether m0 has more (or fewer) than
    one non-terminal run."""
    report = runstore.check(state_dir)
    if not report.ok:
        return [f"journal: {problem.message}" for problem in report.problems]
    with Store(state_dir) as s:
        active = [r.id for r in s.list(machine="m0") if not r.status.is_terminal]
    return [] if len(active) == 1 else [f"m0 has {len(active)} non-terminal runs"]


def _lock_race(state_dir: pathlib.Path, how: str, fresh: int = 3) -> list[str]:
    """One process opens the store, the lock file is changed (``how``), ``fresh`` processes
    open the store afterwards, then all race prepare_atomic on one machine: what went wrong
    (more than one CREATED, a worker that failed, a damaged journal, more than one
    non-terminal run for the machine)."""
    Store(state_dir).close()
    go = FORK.Event()
    pipes = [FORK.Pipe(duplex=False) for _ in range(fresh + 1)]
    readies = [FORK.Event() for _ in range(fresh + 1)]
    procs = [FORK.Process(target=_lock_worker, args=(str(state_dir), readies[i], go,
                                                      pipes[i][1]))
             for i in range(fresh + 1)]
    try:
        procs[0].start()  # the long-lived one: opens the lock file before the change
        assert readies[0].wait(30), "the first worker did not open the store"
        _change_lock_file(state_dir, how)
        for p, ready in zip(procs[1:], readies[1:], strict=True):
            p.start()
            assert ready.wait(30), "a worker did not open the store"
        go.set()
        outcomes = [recv.recv() if recv.poll(60) else "no answer" for recv, _ in pipes]
    finally:
        codes = _reap(procs, 60)
    problems = [f"worker {i}: {outcome}" for i, outcome in enumerate(outcomes)
                if outcome not in (PrepareOutcome.CREATED.value, PrepareOutcome.REUSE.value)]
    problems += [f"worker {i} exited with {code}" for i, code in enumerate(codes) if code]
    created = outcomes.count(PrepareOutcome.CREATED.value)
    if created != 1:
        problems.append(f"{created} processes got CREATED for m0")
    return problems + _journal_and_m0_problems(state_dir)


@pytest.mark.parametrize("how", LOCK_CHANGES)
def test_processes_racing_after_the_lock_file_changed_create_one_run(
    store_dir: pathlib.Path, how: str
) -> None:
    """A process holding the old lock file and fresh ones racing prepare_atomic: one CREATED."""
    assert _lock_race(store_dir, how) == []
    st = os.lstat(store_dir / LOCK_NAME)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("how", LOCK_CHANGES)
def test_broken_variant_processes_racing_create_two_runs(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Broken variant: locking the lock file, the processes lock different files, and
    the race goes wrong: two of them create a run for m0, or their interleaved appends
    damage the journal (a worker then fails on it)."""
    _lock_the_lock_file(monkeypatch)  # inherited by the forked workers
    problems = _lock_race(store_dir, how)
    assert any("processes got CREATED" in problem or "journal:" in problem
               or "Corrupt" in problem for problem in problems), problems


@contextlib.contextmanager
def _held_by_fresh_store(state_dir: pathlib.Path) -> Iterator[Store]:
    """A Store opened now, holding the store lock until the block ends."""
    fresh = Store(state_dir, lock_timeout=5)
    fresh._lock.acquire(5)  # the lock itself, as a call in progress holds it
    try:
        yield fresh
    finally:
        fresh._lock.release()
        fresh.close()


def _old_store_waits(state_dir: pathlib.Path, how: str, call: str) -> bool:
    """A Store that opened the lock file before it changed (``how``) tries ``call`` while a
    fresh Store holds the lock: whether it waited (LockTimeoutError) as it must."""
    old = Store(state_dir, lock_timeout=0.3)
    try:
        old.create(_run("m1"))  # the lock file is open
        _change_lock_file(state_dir, how)
        with _held_by_fresh_store(state_dir):
            started = time.monotonic()
            try:
                if call == "acquire_file":  # the re-lock of a compaction beside the lock
                    old._lock.acquire_mutex(1)
                    try:
                        old._lock.acquire_file(0.3)
                        old._lock.release_file()
                    finally:
                        old._lock.release_mutex()
                else:
                    old.prepare_atomic("m0", "h", _run)
            except LockTimeoutError:
                assert time.monotonic() - started < 3
                return True
        old.create(_run("m2"))  # once the lock is free again the old Store goes on
        return False
    finally:
        old.close()


@pytest.mark.parametrize("call", ["prepare_atomic", "acquire_file"])
@pytest.mark.parametrize("how", LOCK_CHANGES)
def test_store_that_opened_the_old_lock_file_waits_for_the_holder_of_the_new(
    store_dir: pathlib.Path, how: str, call: str
) -> None:
    """A Store object holding the old lock file waits while a fresh Store holds the new one."""
    assert _old_store_waits(store_dir, how, call)
    with Store(store_dir) as s:  # and works once it is free
        assert s.prepare_atomic("m0", "h", _run)[1] is PrepareOutcome.CREATED


@pytest.mark.parametrize("call", ["prepare_atomic", "acquire_file"])
@pytest.mark.parametrize("how", LOCK_CHANGES)
def test_broken_variant_old_lock_file_lets_two_holders_in(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str, call: str
) -> None:
    """Broken variant: locking the lock file, the old Store gets in beside the holder."""
    _lock_the_lock_file(monkeypatch)
    assert not _old_store_waits(store_dir, how, call)


def test_deleted_lock_file_is_recreated_private_and_the_store_goes_on(
    store_dir: pathlib.Path,
) -> None:
    """A lock file deleted under an open Store is recreated 0600 when the store next
    records what was synced (a compaction here; also a checkpoint or a clean close)."""
    with Store(store_dir) as s:
        s.create(_run("m1"))
        (store_dir / LOCK_NAME).unlink()
        s.create(_run("m2"))
        s.compact()
        st = os.lstat(store_dir / LOCK_NAME)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert s._lock._identity == (st.st_dev, st.st_ino)
        assert len(s.list()) == 2


def test_lock_file_replaced_by_a_symlink_is_refused(
    store_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A lock file swapped for a symlink under an open Store: refused when the store next
    records what was synced (a compaction here), and by every call after; the target is
    not created."""
    target = tmp_path / "target"
    with _closing(Store(store_dir)) as s:
        s.create(_run("m1"))
        (store_dir / LOCK_NAME).unlink()
        (store_dir / LOCK_NAME).symlink_to(target)
        with pytest.raises(StoreIOError, match="symbolic link"):
            s.compact()  # (its rewrite fails)
        with pytest.raises(UnsafeStoreError, match="symbolic link"):
            s.create(_run("m2"))
        assert not target.exists()


def _check_waits(state_dir: pathlib.Path, how: str, monkeypatch: pytest.MonkeyPatch) -> bool:
    """``check`` opens the lock file, which changes (``how``) before it is flocked, while a
    fresh Store holds the new one: whether check waited (LockTimeoutError)."""
    Store(state_dir).close()
    original = runstore.verify.flock_until
    holder: list[contextlib.ExitStack] = []

    def flock_until(fd: int, deadline: float, lock_path: str, timeout: float) -> None:
        if not holder:  # between check's open and its first flock
            _change_lock_file(state_dir, how)
            stack = contextlib.ExitStack()
            stack.enter_context(_held_by_fresh_store(state_dir))
            holder.append(stack)
        original(fd, deadline, lock_path, timeout)

    monkeypatch.setattr(runstore.verify, "flock_until", flock_until)
    try:
        runstore.check(state_dir, lock_timeout=0.3)
    except LockTimeoutError:
        return True
    finally:
        for stack in holder:
            stack.close()
    return False


@pytest.mark.parametrize("how", LOCK_CHANGES)
def test_check_waits_for_the_holder_of_the_lock_file_at_the_path(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """check() whose lock file changed before its flock waits for the new one's holder."""
    assert _check_waits(store_dir, how, monkeypatch)


@pytest.mark.parametrize("how", LOCK_CHANGES)
def test_broken_variant_check_reads_while_another_holds_the_lock(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Broken variant: check() locking the lock file it opened reads under another's lock."""
    opened: list[int] = []

    def lock_the_file(dir_fd: int, lock_path: str, timeout: float) -> None:
        opened.append(os.open(LOCK_NAME, os.O_RDWR, dir_fd=dir_fd))
        runstore.verify.flock_until(opened[-1], time.monotonic() + timeout, lock_path,
                                    timeout)

    monkeypatch.setattr(runstore.verify, "_lock_store", lock_the_file)
    try:
        assert not _check_waits(store_dir, how, monkeypatch)
    finally:
        for fd in opened:
            os.close(fd)


def _changed_while_held(state_dir: pathlib.Path, how: str) -> list[str]:
    """A Store inside prepare_atomic (in ``make()``, its lock held) has the lock file
    changed (``how``) under it, as a cleaner of old files would; a Store opened then tries
    prepare_atomic on the same machine for another hash and must wait for the first
    (``LockTimeoutError``): what went wrong otherwise."""
    Store(state_dir).close()
    problems: list[str] = []
    second: list[str] = []

    def make() -> Run:
        _change_lock_file(state_dir, how)
        try:
            with Store(state_dir, lock_timeout=0.3) as fresh:
                run, outcome = fresh.prepare_atomic("m0", "h2", lambda: _run("m0", "h2"))
                second.append(f"{outcome.name} {run.id}")
        except LockTimeoutError:
            second.append("waited")
        except Exception as exc:
            second.append(f"{type(exc).__name__}: {exc}")
        return _run("m0")

    try:
        with Store(state_dir, lock_timeout=5) as holder:
            outcome = holder.prepare_atomic("m0", "h", make)[1]
            if outcome is not PrepareOutcome.CREATED:
                problems.append(f"the holder got {outcome.name}")
    except Exception as exc:
        problems.append(f"the holder: {type(exc).__name__}: {exc}")
    if second != ["waited"]:
        problems.append(f"the second store, while the first held the lock: {second}")
    return problems + _journal_and_m0_problems(state_dir)


@pytest.mark.parametrize("broken", [False, True], ids=["directory-flock", "broken-file-flock"])
@pytest.mark.parametrize("how", LOCK_CHANGES)
def test_lock_file_changed_while_held_lets_nobody_in_beside_the_holder(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str, broken: bool
) -> None:
    """The flock is on the state directory: deleting or replacing the lock file while a
    store holds the lock lets nobody in beside it. Broken variant: with the flock on the
    lock file, a store opened after the change locks a new file at the path and gets in
    beside the holder."""
    if broken:
        _lock_the_lock_file(monkeypatch)
        problems = _changed_while_held(store_dir, how)
        assert any("the second store" in problem for problem in problems), problems
        return
    assert _changed_while_held(store_dir, how) == []
    st = os.lstat(store_dir / LOCK_NAME)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


# -- the journal ----------------------------------------------------------------------------

#: how the journal's path comes to name another file, or none. Without the identity checks
#: an empty file or one that is not a journal was refused too, but with a message that did
#: not say what happened, and a symlink is refused as unsafe either way.
JOURNAL_CHANGES = [
    "deleted", "renamed-away", "other-store-renamed-over", "other-store-after-delete",
    "empty-renamed-over", "empty-after-delete", "not-a-journal", "copy-after-renamed-away",
    "symlink",
]
#: where a journal renamed away goes (beside the state directory)
MOVED = "moved-away.jsonl"


def _change_journal(state_dir: pathlib.Path, how: str) -> None:
    """Make the journal's path another file (or none) than the one the store has open."""
    path = state_dir / DATA_NAME
    other_dir = state_dir.parent / "other-store"
    if how == "deleted":
        path.unlink()
    elif how == "renamed-away":
        os.replace(path, state_dir.parent / MOVED)
    elif how in ("other-store-renamed-over", "other-store-after-delete"):
        with Store(other_dir) as other:
            other.create(_run("m0", "other"))
        if how == "other-store-after-delete":
            path.unlink()
            shutil.copyfile(other_dir / DATA_NAME, path)
            path.chmod(0o600)
        else:
            os.replace(other_dir / DATA_NAME, path)
    elif how == "empty-renamed-over":
        (state_dir / "empty").write_bytes(b"")
        os.replace(state_dir / "empty", path)
    elif how == "empty-after-delete":
        path.unlink()
        path.write_bytes(b"")
    elif how == "not-a-journal":
        (state_dir / "text").write_bytes(b"hello\nworld\n")
        os.replace(state_dir / "text", path)
    elif how == "copy-after-renamed-away":  # the same store id, but not a compaction's
        shutil.copyfile(path, state_dir / "copy")
        os.replace(path, state_dir.parent / MOVED)
        os.replace(state_dir / "copy", path)
    elif how == "symlink":
        path.unlink()
        path.symlink_to(state_dir.parent / "symlink-target")
    else:
        raise ValueError(how)


def _calls(run_id: str) -> list[tuple[str, Callable[[Store], object]]]:
    """Every kind of call a live store answers (each must refuse a changed journal)."""
    return [
        ("create", lambda s: s.create(_run("m7"))),
        ("prepare_atomic busy", lambda s: s.prepare_atomic("m0", "h", _run)),
        ("prepare_atomic free", lambda s: s.prepare_atomic("m8", "h", lambda: _run("m8"))),
        ("get", lambda s: s.get(run_id)),
        ("get unknown", lambda s: s.get("r-unknown")),
        ("list", lambda s: s.list()),
        ("active", lambda s: s.active()),
        ("active_by_machine", lambda s: s.active_by_machine("m0")),
        ("last_seq", lambda s: s.last_seq()),
        ("changes", lambda s: list(s.changes())),
        ("heartbeat", lambda s: s.heartbeat(run_id)),
        ("start", lambda s: s.start(run_id)),
        ("finish", lambda s: s.finish(run_id, Status.COMPLETED)),
        ("stats", lambda s: s.stats()),
        ("compact", lambda s: s.compact()),
        ("reap", lambda s: s.reap(stale_after=_dt.timedelta(seconds=0))),
        ("prune", lambda s: s.prune(keep_last=0)),
        ("export", lambda s: s.export(io.BytesIO())),
        ("import_runs", lambda s: s.import_runs([Run("m9", "/t", "h", id="r-imported")])),
    ]


def _try_calls(s: Store, run_id: str) -> list[tuple[str, str, str]]:
    """Every call, twice: (call, the exception's type name or "ok", its message)."""
    results = []
    for _round in range(2):
        for name, call in _calls(run_id):
            try:
                call(s)
            except Exception as exc:  # judged by _problems
                results.append((name, type(exc).__name__, str(exc)))
            else:
                results.append((name, "ok", ""))
    return results


def _problems(state_dir: pathlib.Path, how: str, results: list[tuple[str, str, str]],
              before: dict[str, bytes], moved_before: bytes | None) -> list[str]:
    """What is wrong after the calls on a store whose journal changed (``how``): a call that
    did not raise the clear error, a file created or changed at the path, writes to the
    renamed file."""
    journal_path = str(state_dir / DATA_NAME)
    wanted = "UnsafeStoreError" if how == "symlink" else "CorruptStoreError"
    problems = []
    for name, kind, message in results:
        if kind != wanted:
            problems.append(f"{name}: {kind} {message[:200]}")
        elif journal_path not in message:
            problems.append(f"{name}: the message does not name {journal_path}: {message}")
        elif kind == "CorruptStoreError" and "while this process had it open" not in message:
            problems.append(f"{name}: the message does not say what happened: {message}")
    after = _files(state_dir)
    if after != before:
        changed = sorted(n for n in set(after) | set(before) if after.get(n) != before.get(n))
        problems.append(f"files changed in the state directory: {changed}")
    moved = state_dir.parent / MOVED
    if moved_before is not None and moved.read_bytes() != moved_before:
        problems.append("the renamed journal was written to")
    if os.path.lexists(state_dir.parent / "symlink-target"):
        problems.append("the symlink's target was created")
    return problems


def _without_journal_identity_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broken variant: the catch-up as it was before the identity checks (``fstat`` of
    the open file, reloading from the path when it is unlinked, creating a journal when the
    path is empty), no memory of the store id and no record of the journal in the lock
    file."""
    from runstore import store as store_module

    def catch_up(self: Store, about: str | None = None) -> None:
        j = self._journal
        self._reading = False  # a read (re)creates a missing journal too, as every call did
        if self._pid != _forks.pid():
            self._pid = _forks.pid()
            j.after_fork()
            self._stale = True
        if self._stale or j.fd is None:
            self._load()
            return
        cur = self._view.cur
        assert cur is not None
        st = os.fstat(j.fd)
        if st.st_nlink == 0 or st.st_size < cur.end:
            self._load()
        elif st.st_size > cur.end:
            self._ingest_from(cur.end, st.st_size, defer=True, about=about)

    def stat_path(self: Journal) -> os.stat_result | None:
        if self.fd is None:
            return None
        st = os.fstat(self.fd)
        return st if st.st_nlink else None

    original_open, original_create = Journal.open, Journal.create

    def forgetting(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Journal, *args: Any, **kwargs: Any) -> Any:
            self.store_id = ""
            return original(self, *args, **kwargs)
        return call

    monkeypatch.setattr(store_module.Store, "_catch_up", catch_up)
    monkeypatch.setattr(Journal, "stat_path", stat_path)
    monkeypatch.setattr(Journal, "open", forgetting(original_open))
    monkeypatch.setattr(Journal, "create", forgetting(original_create))
    monkeypatch.setattr(_fileopen, "read_vouch", lambda fd: None)  # no record of the file


def _live_store_scenario(state_dir: pathlib.Path, how: str) -> list[str]:
    """A Store of this process with writes and a busy machine; the journal changes
    (``how``); every call, then close: the problems found."""
    with _closing(Store(state_dir)) as s:
        run, _ = s.prepare_atomic("m0", "h", _run)
        s.create(_run("m1"))
        _change_journal(state_dir, how)
        moved = state_dir.parent / MOVED
        moved_before = moved.read_bytes() if moved.exists() else None
        before = _files(state_dir)
        results = _try_calls(s, run.id)
    return _problems(state_dir, how, results, before, moved_before)


@pytest.mark.parametrize("how", JOURNAL_CHANGES)
def test_live_store_refuses_a_changed_journal(store_dir: pathlib.Path, how: str) -> None:
    """Journal deleted/renamed/replaced under a live Store: every later call refuses, clearly."""
    assert _live_store_scenario(store_dir, how) == []


@pytest.mark.parametrize("how", [h for h in JOURNAL_CHANGES if h != "symlink"])
def test_broken_variant_live_store_resets_or_follows(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Broken variant: without the identity checks the same scenario goes wrong."""
    _without_journal_identity_checks(monkeypatch)
    assert _live_store_scenario(store_dir, how) != []


def test_broken_variant_deleted_journal_hands_a_busy_machine_out_again(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: a deleted journal silently reset: m0, busy, is CREATED again."""
    _without_journal_identity_checks(monkeypatch)
    with Store(store_dir) as s:
        assert s.prepare_atomic("m0", "h", _run)[1] is PrepareOutcome.CREATED
        (store_dir / DATA_NAME).unlink()
        assert s.prepare_atomic("m0", "h", _run)[1] is PrepareOutcome.CREATED


def test_deleted_journal_keeps_the_busy_machine_busy(store_dir: pathlib.Path) -> None:
    """A deleted journal: prepare_atomic on the busy machine refuses, never CREATED again."""
    with _closing(Store(store_dir)) as s:
        assert s.prepare_atomic("m0", "h", _run)[1] is PrepareOutcome.CREATED
        (store_dir / DATA_NAME).unlink()
        with pytest.raises(CorruptStoreError) as info:
            s.prepare_atomic("m0", "h", _run)
        assert info.value.path == str(store_dir / DATA_NAME)
        assert "deleted or renamed" in str(info.value)
        assert "never recreates it" in str(info.value)
    assert not (store_dir / DATA_NAME).exists()


def test_renamed_journal_error_names_where_the_file_went(store_dir: pathlib.Path) -> None:
    """A journal renamed away and replaced: the error names the path and the file's new name."""
    with _closing(Store(store_dir)) as s:
        s.create(_run("m1"))
        _change_journal(store_dir, "copy-after-renamed-away")
        with pytest.raises(CorruptStoreError) as info:
            s.create(_run("m2"))
        message = str(info.value)
        assert str(store_dir / DATA_NAME) in message
        assert str(store_dir.parent / MOVED) in message


def _other_process(state_dir: str, conn: Any) -> None:
    """A live store in another process: open it, write, wait for the journal to change, then
    try every call and report the results."""
    s = Store(state_dir)
    run, _ = s.prepare_atomic("m0", "h", _run)
    s.create(_run("m1"))
    conn.send(run.id)
    conn.recv()  # the journal has changed
    results = _try_calls(s, run.id)
    with contextlib.suppress(CorruptStoreError, UnsafeStoreError):
        s.close()
    conn.send(results)
    conn.close()


def _other_process_scenario(state_dir: pathlib.Path, how: str) -> list[str]:
    parent, child = FORK.Pipe()
    proc = FORK.Process(target=_other_process, args=(str(state_dir), child))
    proc.start()
    try:
        assert parent.poll(30), "the other process did not open the store"
        parent.recv()
        _change_journal(state_dir, how)
        moved = state_dir.parent / MOVED
        moved_before = moved.read_bytes() if moved.exists() else None
        before = _files(state_dir)
        parent.send("changed")
        assert parent.poll(60), "the other process did not report"
        results = parent.recv()
    finally:
        codes = _reap([proc], 30)
    assert codes == [0]
    return _problems(state_dir, how, results, before, moved_before)


@pytest.mark.parametrize("how", JOURNAL_CHANGES)
def test_live_store_in_another_process_refuses_a_changed_journal(
    store_dir: pathlib.Path, how: str
) -> None:
    """The same with the live store in another process: every call there refuses."""
    assert _other_process_scenario(store_dir, how) == []


@pytest.mark.parametrize("how", ["deleted", "renamed-away", "other-store-renamed-over",
                                 "copy-after-renamed-away"])
def test_broken_variant_other_process_resets_or_follows(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Broken variant: in another process, without the checks, calls succeed wrongly."""
    _without_journal_identity_checks(monkeypatch)  # inherited by the forked process
    assert _other_process_scenario(store_dir, how) != []


def _refusal_in_a_forked_child(call: Callable[[], object]) -> tuple[str, str]:
    """("refused", its message) when ``call`` raises CorruptStoreError in a forked child,
    else ("ok", "")."""
    parent, child = FORK.Pipe()

    def in_child() -> None:
        try:
            call()
        except CorruptStoreError as exc:
            child.send(("refused", str(exc)))
        else:
            child.send(("ok", ""))

    proc = FORK.Process(target=in_child)
    proc.start()
    try:
        assert parent.poll(30)
        kind, message = parent.recv()
    finally:
        assert _reap([proc], 30) == [0]
    return kind, message


def test_forked_child_refuses_a_journal_deleted_before_it_reopens(
    store_dir: pathlib.Path,
) -> None:
    """A Store inherited by fork reopens its journal: missing -> refused, nothing created."""
    with _closing(Store(store_dir)) as s:
        s.create(_run("m1"))
        (store_dir / DATA_NAME).unlink()
        kind, message = _refusal_in_a_forked_child(lambda: s.create(_run("m2")))
        assert kind == "refused"
        assert "never recreates it" in message or "never starts a new, empty store" in message
    assert not (store_dir / DATA_NAME).exists()


def test_forked_child_refuses_another_stores_journal(store_dir: pathlib.Path) -> None:
    """A Store inherited by fork that finds another store's journal at the path refuses it."""
    with _closing(Store(store_dir)) as s:
        s.create(_run("m1"))
        _change_journal(store_dir, "other-store-renamed-over")
        kind, message = _refusal_in_a_forked_child(s.list)
        assert kind == "refused" and "another store" in message


def _watch_scenario(state_dir: pathlib.Path, how: str) -> str:
    """A watcher following the store; the journal changes (``how``): what the watcher did
    ("raised: ..." or "followed quietly")."""
    with _closing(Store(state_dir)) as s:
        s.create(_run("m1"))
        watcher = s.watch(since_seq=0, timeout=1.0, poll_interval=0.01)
        assert next(watcher).seq == 1
        _change_journal(state_dir, how)
        try:
            for _change in watcher:
                pass
        except (CorruptStoreError, UnsafeStoreError) as exc:
            return f"raised: {exc}"
        return "followed quietly"


@pytest.mark.parametrize("how", ["deleted", "other-store-renamed-over", "empty-after-delete",
                                 "copy-after-renamed-away"])
def test_watch_surfaces_a_changed_journal(store_dir: pathlib.Path, how: str) -> None:
    """watch() raises the clear error instead of following a new or another store."""
    outcome = _watch_scenario(store_dir, how)
    assert outcome.startswith("raised:") and "while this process had it open" in outcome


@pytest.mark.parametrize("how", ["deleted", "other-store-renamed-over"])
def test_broken_variant_watch_follows_quietly(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Broken variant: without the checks watch() follows the new file without a word."""
    _without_journal_identity_checks(monkeypatch)
    assert _watch_scenario(store_dir, how) == "followed quietly"


# -- compaction elsewhere is still followed -------------------------------------------------


def test_compaction_by_another_store_object_is_followed(store_dir: pathlib.Path) -> None:
    """Another Store of this process compacts (a rename over the journal): no false alarm."""
    with Store(store_dir) as a, Store(store_dir) as b:
        made = [a.create(_run(f"a{i}")).id for i in range(3)]
        for i in range(3):
            b.compact()
            made.append(b.create(_run(f"b{i}")).id)
            made.append(a.create(_run(f"c{i}")).id)
            assert [r.id for r in a.list()] == made
        assert a.active_by_machine("b2") is not None


def _compacting_process(state_dir: str, rounds: int) -> None:
    with Store(state_dir) as s:
        for i in range(rounds):
            s.create(_run(f"p{os.getpid()}-{i}"))
            s.compact()


def test_compaction_by_other_processes_is_followed(store_dir: pathlib.Path) -> None:
    """Other processes writing and compacting while this one writes: nothing refused."""
    rounds = 30
    with Store(store_dir) as s:
        first = os.stat(store_dir / DATA_NAME).st_ino
        procs = [FORK.Process(target=_compacting_process, args=(str(store_dir), rounds))
                 for _ in range(2)]
        try:
            for p in procs:
                p.start()
            mine = [s.create(_run(f"me-{i}")).id for i in range(rounds)]
        finally:
            codes = _reap(procs, 60)
        assert codes == [0, 0]
        runs = s.list()
        assert len(runs) == 3 * rounds
        assert {r.id for r in runs} >= set(mine)
        assert os.stat(store_dir / DATA_NAME).st_ino != first  # compactions did happen


def test_automatic_compaction_beside_the_lock_is_followed(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Automatic compactions (temp file renamed over the journal) by another Store object."""

    monkeypatch.setattr(_limits, "RETAIN_CHANGES", 4)
    monkeypatch.setattr(_limits, "COMPACT_MIN_SUPERSEDED", 4)
    with Store(store_dir, durable=False) as a, Store(store_dir, durable=False) as b:
        run = a.create(_run("m0"))
        before = os.stat(store_dir / DATA_NAME).st_ino
        for _ in range(40):
            b.heartbeat(run.id)
        assert os.stat(store_dir / DATA_NAME).st_ino != before
        assert a.get(run.id).revision == 41
        a.start(run.id)
        a.finish(run.id, Status.COMPLETED)
        assert b.get(run.id).status is Status.COMPLETED


# -- a new process finds the journal gone ---------------------------------------------------

JOURNAL_LOSSES = ["deleted", "renamed"]


def _lose_journal(store_dir: pathlib.Path, how: str) -> None:
    if how == "deleted":
        (store_dir / DATA_NAME).unlink()
    else:
        (store_dir / DATA_NAME).rename(store_dir.parent / "moved.jsonl")


def _killed_writer(state_dir: str) -> None:
    s = Store(state_dir)
    s.prepare_atomic("m0", "h", _run)
    os._exit(0)  # no clean close


@pytest.mark.parametrize("how", JOURNAL_LOSSES)
@pytest.mark.parametrize("closed", [True, False], ids=["closed", "crashed"])
def test_a_new_process_refuses_a_store_whose_journal_is_gone(
    store_dir: pathlib.Path, how: str, closed: bool
) -> None:
    """The lock file records the journal from the store's creation on: a process opening the
    store after its journal was deleted or renamed refuses instead of starting an empty store
    in its place (where m0, busy, would be handed out again)."""
    if closed:
        with Store(store_dir) as s:
            s.prepare_atomic("m0", "h", _run)
    else:
        child = FORK.Process(target=_killed_writer, args=(str(store_dir),))
        child.start()
        child.join(30)
        assert child.exitcode == 0
    _lose_journal(store_dir, how)
    before = snapshot_dir(str(store_dir))
    for _attempt in range(2):
        with pytest.raises(CorruptStoreError) as info:
            Store(store_dir)
        assert info.value.path == str(store_dir / DATA_NAME)
        assert "the journal is missing" in str(info.value)
        assert "restore the journal from a backup" in str(info.value)
        assert "remove runs.lock" in str(info.value)
    assert snapshot_dir(str(store_dir)) == before  # nothing created


def test_broken_variant_a_new_process_starts_an_empty_store(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: without the lock file's record, the busy m0 is CREATED again."""

    with Store(store_dir) as s:
        s.prepare_atomic("m0", "h", _run)
    _lose_journal(store_dir, "deleted")
    monkeypatch.setattr(_fileopen, "read_vouch", lambda fd: None)
    with Store(store_dir) as s:
        assert s.prepare_atomic("m0", "h", _run)[1] is PrepareOutcome.CREATED


def test_starting_anew_on_purpose_removes_the_lock_file_too(store_dir: pathlib.Path) -> None:
    """The remedy the error gives works: with runs.lock removed as well, a new store starts."""
    with Store(store_dir) as s:
        s.prepare_atomic("m0", "h", _run)
    _lose_journal(store_dir, "deleted")
    with pytest.raises(CorruptStoreError):
        Store(store_dir)
    (store_dir / "runs.lock").unlink()
    with Store(store_dir) as s:
        assert s.list() == []
        assert s.prepare_atomic("m0", "h", _run)[1] is PrepareOutcome.CREATED
