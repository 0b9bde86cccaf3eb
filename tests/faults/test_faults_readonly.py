"""Reading never writes: reading commands and read-only handles leave every file of the state
directory byte-for-byte as it was (a torn tail is reported, and cut only by the next write);
they work on a read-only copy whose lock file cannot be opened for writing, where writes fail
with ``ReadOnlyStoreError``; ``check`` says what it cannot know; and a follower keeps
answering while a writer is stopped holding the lock.

Every detection has a broken variant: the old behaviour put back by monkeypatching, and the
failure it then lets through shown to happen."""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import pathlib
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from faults import NOBODY, as_nobody, run_for, snapshot_dir, wait_pid

import runstore._journal
import runstore._scan
import runstore.store
import runstore.verify
from runstore import (
    LockTimeoutError,
    ReadOnlyStoreError,
    Run,
    Status,
    Store,
    UnsafeStoreError,
    _statedir,
    verify,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("clean_cli_env")]

#: half of a record line: a write a crash cut short
TORN = b'{"seq":99,"id":"20990101T000000.000000Z-0123456789abcdef","status":"pend'


def _store_with_runs(state_dir: pathlib.Path, *, closed: bool = True) -> list[Run]:
    """Two failed runs and a running one (owned on another host), written by a store
    that is closed (or not)."""
    s = Store(state_dir)
    for machine in ("m1", "m2"):
        run, _ = s.prepare_atomic(machine, "h", lambda m=machine: run_for(m, "h"))
        s.finish(run.id, Status.FAILED)
    run, _ = s.prepare_atomic("m3", "h", lambda: run_for("m3", "h"))
    run = s.start(run.id)
    # owned on another host: a reaper here judges it by its heartbeat's age alone
    s.update(attrs.evolve(run, owner_host="elsewhere.invalid"))
    runs = s.list()
    if closed:
        s.close()
    return runs


def _torn_store(state_dir: pathlib.Path) -> tuple[list[Run], int]:
    """A store whose last write was cut short by a crash: (its runs, where the tear begins)."""
    runs = _store_with_runs(state_dir, closed=False)
    path = state_dir / _statedir.DATA_NAME
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(TORN)
    return runs, size


def _cutting_recover(self: Store, damage: Any) -> bool:
    """The old ``Store._recover``: cut a torn tail wherever it is found, reads included."""
    j = self._journal
    verdict = runstore._scan.judge(j.reader(), os.fstat(j.fd).st_size, self._view.cur, damage)
    assert verdict is None
    j.truncate(damage.offset, damage.reason)
    self._stale = False
    return False


def _read_everything(state_dir: pathlib.Path, run_id: str) -> dict[str, Any]:
    """Every kind of read a store offers, on a fresh handle; what they answered."""
    with Store(state_dir, lock_timeout=0.5) as s:
        runs = s.list()
        got = s.get(run_id)
        stats = s.stats()
        out: dict[str, Any] = {
            "runs": runs, "got": got, "active": s.active(), "last_seq": s.last_seq(),
            "changes": [c.seq for c in s.changes(0)], "stats": stats,
            "watched": [c.seq for c in s.watch(0, timeout=0)],
            "by_machine": s.active_by_machine("m3"),
        }
        with tempfile.TemporaryFile("w+b") as f:
            out["exported"] = s.export(f)
    out["check"] = verify.check(state_dir, lock_timeout=0.5)
    return out


# -- 1. reads leave a torn tail; the next write cuts it --------------------------------------


def test_reads_leave_a_torn_tail_in_place(store_dir: pathlib.Path) -> None:
    """Opening, list, get, active, stats, changes, watch, export and check of a store with a
    torn tail change no file; stats and check report the tail (offset and length)."""
    runs, tear = _torn_store(store_dir)
    before = snapshot_dir(str(store_dir))
    seen = _read_everything(store_dir, runs[0].id)
    assert snapshot_dir(str(store_dir)) == before
    assert seen["runs"] == runs and seen["got"] == runs[0] and seen["exported"] == 3
    assert (seen["stats"].torn_tail_offset, seen["stats"].torn_tail_bytes) == (tear, len(TORN))
    report = seen["check"]
    assert report.ok and report.torn_tail is not None
    assert (report.torn_tail.offset, report.torn_tail.length) == (tear, len(TORN))
    assert f"cuts bytes {tear} to {tear + len(TORN)} ({len(TORN)} bytes)" in report.notes[0]


def test_reads_leave_a_torn_tail_broken_variant(store_dir: pathlib.Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: with reads cutting the tail again (the old recovery), the same reads
    change the journal: the comparison above would catch it."""
    runs, tear = _torn_store(store_dir)
    before = snapshot_dir(str(store_dir))
    monkeypatch.setattr(runstore.store.Store, "_recover", _cutting_recover)
    _read_everything(store_dir, runs[0].id)
    after = snapshot_dir(str(store_dir))
    assert after != before
    assert after[_statedir.DATA_NAME] == before[_statedir.DATA_NAME][:tear]


def test_the_next_write_cuts_exactly_what_check_said(store_dir: pathlib.Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The first write cuts the torn tail (bytes and offset as check reported them, logged
    as a warning) and appends after the valid lines; nothing before the tear changes."""
    _runs, tear = _torn_store(store_dir)
    data = (store_dir / _statedir.DATA_NAME).read_bytes()
    torn = verify.check(store_dir).torn_tail
    assert torn is not None and (torn.offset, torn.end) == (tear, len(data))
    with caplog.at_level(logging.WARNING, logger="runstore"), Store(store_dir) as s:
        s.list()
        assert not caplog.records
        s.create(run_for("m4", "h", status=Status.COMPLETED))
    [warning] = [r.getMessage() for r in caplog.records if r.name == "runstore"]
    assert f"dropping {torn.length} bytes from offset {torn.offset}" in warning
    after = (store_dir / _statedir.DATA_NAME).read_bytes()
    assert after.startswith(data[:tear]) and TORN not in after
    report = verify.check(store_dir)
    assert report.ok and report.torn_tail is None and report.records == 8


# -- 1. the reading commands of the CLI -------------------------------------------------------

READING = [["list"], ["active"], ["stats"], ["stats", "--json"], ["check"], ["check", "--json"],
           ["export"], ["watch", "--since", "0", "--timeout", "0"]]


def _cli_reads(run_cli: Callable[..., tuple[int, str, str]], state: str,
               run_id: str) -> dict[str, tuple[int, str, str]]:
    results = {" ".join(argv): run_cli("--state-dir", state, "--lock-timeout", "0.5", *argv)
               for argv in READING}
    results["show"] = run_cli("--state-dir", state, "show", run_id)
    return results


def test_reading_commands_leave_the_files(store_dir: pathlib.Path,
                                          run_cli: Callable[..., tuple[int, str, str]]) -> None:
    """list, show, active, stats, check, export and watch leave a torn store's files as they
    were; stats and check say where the torn tail is and that the next write cuts it."""
    runs, tear = _torn_store(store_dir)
    before = snapshot_dir(str(store_dir))
    results = _cli_reads(run_cli, str(store_dir), runs[0].id)
    assert snapshot_dir(str(store_dir)) == before
    assert {k: v[0] for k, v in results.items()} == dict.fromkeys(results, 0)
    assert f"{len(TORN)} bytes from byte {tear:,}" in results["stats"][1]
    assert json.loads(results["stats --json"][1])["torn_tail_offset"] == tear
    check = json.loads(results["check --json"][1])
    assert check["ok"] and check["torn_tail"]["offset"] == tear
    assert check["torn_tail"]["bytes"] == len(TORN)
    assert f"cuts bytes {tear} to {tear + len(TORN)}" in results["check"][1]


def test_reading_commands_broken_variant(store_dir: pathlib.Path,
                                         run_cli: Callable[..., tuple[int, str, str]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: with the old recovery, the first reading command cuts the file."""
    _runs, tear = _torn_store(store_dir)
    before = snapshot_dir(str(store_dir))
    monkeypatch.setattr(runstore.store.Store, "_recover", _cutting_recover)
    code, _out, _err = run_cli("--state-dir", str(store_dir), "stats")
    assert code == 0
    assert snapshot_dir(str(store_dir))[_statedir.DATA_NAME] == before[_statedir.DATA_NAME][:tear]


# -- 2. a read-only copy ----------------------------------------------------------------------


@pytest.fixture
def shared_base() -> Iterator[pathlib.Path]:
    """A directory every user can enter (pytest's own temp root is 0700)."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="runstore-ro-"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        for root, dirs, files in os.walk(base):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
        shutil.rmtree(base)


def _make_read_only(state: pathlib.Path, *, keep_lock: bool) -> None:
    """chmod a-w the directory and its files (given to uid 65534 when run as root)."""
    if not keep_lock:
        (state / _statedir.LOCK_NAME).unlink()
    for p in [state, *state.iterdir()]:
        if os.geteuid() == 0:
            os.chown(p, NOBODY, NOBODY)
        os.chmod(p, 0o500 if p == state else 0o400)


def _as_reader(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` in a forked child, as uid 65534 when this is root (root ignores modes);
    return the JSON it produced."""
    out = as_nobody(lambda: json.dumps(fn()))
    return {"child failed": out} if out.startswith("child failed") else dict(json.loads(out))


def _read_then_write(state: pathlib.Path) -> Callable[[], dict[str, Any]]:
    def attempt() -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            with Store(state, lock_timeout=0.5) as s:
                out["runs"] = len(s.list())
                out["stats_runs"] = s.stats().runs
                out["active"] = [r.machine for r in s.active()]
                out["watched"] = len(list(s.watch(0, timeout=0)))
                out["dry_reap"] = len(s.reap(stale_after=dt.timedelta(0), dry_run=True))
                report = verify.check(state, lock_timeout=0.5)
                out["check_ok"] = report.ok
                out["check_torn"] = report.torn_tail is not None
                for name, write in [("create", lambda: s.create(run_for("m9", "h"))),
                                    ("compact", s.compact),
                                    ("finish", lambda: s.finish(s.active()[0].id,
                                                                Status.FAILED))]:
                    try:
                        write()
                        out[name] = "written"
                    except ReadOnlyStoreError as exc:
                        out[name] = f"ReadOnlyStoreError: {exc}"
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    return attempt


@pytest.mark.parametrize("keep_lock", [True, False], ids=["lock-file-read-only", "no-lock-file"])
def test_a_read_only_copy_reads_and_refuses_writes(shared_base: pathlib.Path,
                                                   keep_lock: bool) -> None:
    """On a copy with the directory and files chmod a-w (the lock file read-only or
    missing), a store opens, every read and check work, the torn tail is reported, and each
    write raises ReadOnlyStoreError naming the file and the remedy; no file changes."""
    state = shared_base / "copy"
    _torn_store(state)
    _make_read_only(state, keep_lock=keep_lock)
    before = snapshot_dir(str(state))
    out = _as_reader(_read_then_write(state))
    assert "error" not in out and "child failed" not in out, out
    assert (out["runs"], out["stats_runs"], out["active"]) == (3, 3, ["m3"])
    assert out["watched"] > 0 and out["check_ok"] and out["check_torn"]
    assert out["dry_reap"] == 1  # a decision that writes nothing needs no lock
    for name in ("create", "compact", "finish"):
        assert out[name].startswith("ReadOnlyStoreError"), out[name]
        assert "cannot be opened for writing" in out[name]
        assert "writable copy" in out[name] and str(state) in out[name]
    assert snapshot_dir(str(state)) == before


def test_a_read_only_copy_broken_variant(shared_base: pathlib.Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: with the lock file required for writing at opening (as before), the
    same read-only copy cannot even be opened: UnsafeStoreError, no read answers."""
    state = shared_base / "copy"
    _torn_store(state)
    _make_read_only(state, keep_lock=True)

    def must_open(self: Any) -> None:
        self._lock.open_file()  # no fallback to reading

    monkeypatch.setattr(runstore.store.Store, "_open",
                        lambda self: (must_open(self), self._transact(lambda: (None, []))))
    out = _as_reader(_read_then_write(state))
    assert out.get("error", "").startswith(("UnsafeStoreError", "ReadOnlyStoreError")), out
    assert "runs" not in out


def _read_only_mount(monkeypatch: pytest.MonkeyPatch, state: pathlib.Path) -> None:
    """Every open for writing (or creating) fails with EROFS, as on a read-only mount."""
    real_open = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def open_ro(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & writing:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_ro)


def test_a_read_only_mount_reads_and_refuses_writes(store_dir: pathlib.Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """On a read-only mount (EROFS on every open for writing) the store opens, reads and
    checks; a write raises ReadOnlyStoreError saying the file system is read-only."""
    runs, _tear = _torn_store(store_dir)
    before = snapshot_dir(str(store_dir))
    _read_only_mount(monkeypatch, store_dir)
    with Store(store_dir) as s:
        assert s.list() == runs and s.stats().torn_tail_bytes == len(TORN)
        with pytest.raises(ReadOnlyStoreError) as info:
            s.prepare_atomic("m9", "h", lambda: run_for("m9", "h"))
        assert info.value.path == str(store_dir / _statedir.LOCK_NAME)
        assert "Read-only file system" in str(info.value)
        assert isinstance(info.value, PermissionError)
    assert verify.check(store_dir).ok
    monkeypatch.undo()
    assert snapshot_dir(str(store_dir)) == before


def test_a_read_only_mount_broken_variant(store_dir: pathlib.Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: a journal opened for writing only (no fallback to reading) makes
    the read-only mount unreadable."""
    _torn_store(store_dir)
    _read_only_mount(monkeypatch, store_dir)
    monkeypatch.setattr(runstore._journal, "_NOT_WRITABLE", frozenset())
    with pytest.raises(Exception) as info:
        Store(store_dir)
    assert info.value.errno == errno.EROFS or "Read-only" in str(info.value)  # type: ignore[attr-defined]


def test_a_write_to_a_read_only_journal_names_it(store_dir: pathlib.Path) -> None:
    """A journal opened for reading only (its lock file writable) refuses a write with
    ReadOnlyStoreError naming the journal; nothing is written."""
    _store_with_runs(store_dir)
    path = store_dir / _statedir.DATA_NAME
    with Store(store_dir) as s:
        s._journal.read_only = "Permission denied"  # as open() sets it on EACCES
        before = path.read_bytes()
        with pytest.raises(ReadOnlyStoreError) as info:
            s.create(run_for("m9", "h"))
        assert info.value.path == str(path)
        assert path.read_bytes() == before


# -- 3. check says what it cannot know ----------------------------------------------------------


def test_check_never_claims_nothing_acknowledged_is_lost(
        store_dir: pathlib.Path, run_cli: Callable[..., tuple[int, str, str]]) -> None:
    """A torn tail: check says that whether it held an acknowledged change cannot be known.
    A store that was not closed: check says its last bytes are not known synced. A closed
    one: no such note."""
    _torn_store(store_dir)
    code, out, _err = run_cli("--state-dir", str(store_dir), "check")
    assert code == 0
    assert "nothing acknowledged is lost" not in out
    assert "cannot be known" in out and "not known to be synced" in out
    shutil.rmtree(store_dir)
    _store_with_runs(store_dir, closed=True)
    report = verify.check(store_dir)
    assert report.ok and report.notes == ()
    assert report.synced == report.size


def test_check_unsynced_note_broken_variant(store_dir: pathlib.Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: a reader that takes every line as synced (its durable mark ignored)
    makes no note about an unclosed store: the note above rests on the marks."""
    _store_with_runs(store_dir, closed=False)
    assert any("not known to be synced" in n for n in verify.check(store_dir).notes)
    real_scan = runstore.verify.scan

    def trusting_scan(buf: bytes, start: int, cur: Any) -> Any:
        result = real_scan(buf, start, cur)
        cur.durable = cur.end
        return result

    monkeypatch.setattr(runstore.verify, "scan", trusting_scan)
    assert not any("not known to be synced" in n for n in verify.check(store_dir).notes)


# -- 4. followers do not depend on the writers' lock -----------------------------------------


def _stopped_writer(state: pathlib.Path, creates: int) -> int:
    """Fork a writer that creates ``creates`` runs, takes the lock and stops (SIGSTOP)
    holding it; return its pid once it holds the lock."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            s = Store(state)
            for i in range(creates):
                s.create(run_for(f"w{i}", "h", status=Status.COMPLETED))
            s._lock.acquire(5)
            os.write(w, b"locked")
            os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 16) == b"locked"
    finally:
        os.close(r)
    return pid


def _follow_while_stopped(state: pathlib.Path) -> tuple[list[int], int]:
    """A watcher opened before a writer appends and stops holding the lock: the seqs it
    delivers within 1.5 s (its lock_timeout is 0.2 s), and the runs list() then shows."""
    _store_with_runs(state)
    watcher = Store(state, lock_timeout=0.2)
    try:
        start = watcher.last_seq()
        pid = _stopped_writer(state, 5)
        try:
            seen = [c.seq for c in watcher.watch(start, timeout=1.5)]
            return seen, len(watcher.list())
        finally:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
            wait_pid(pid)
    finally:
        watcher.close()


def test_watch_follows_while_a_writer_is_stopped_holding_the_lock(
        store_dir: pathlib.Path) -> None:
    """watch delivers what a writer appended before it stopped (SIGSTOP) holding the lock,
    and keeps polling past lock_timeout without LockTimeoutError; list() answers too."""
    started = time.monotonic()
    seen, listed = _follow_while_stopped(store_dir)
    assert time.monotonic() - started >= 1.5
    last = seen[-1]
    assert seen == list(range(last - 4, last + 1)) and listed == 8


def test_watch_while_stopped_broken_variant(store_dir: pathlib.Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: reads that catch up only under the lock (the old ``_read``) raise
    LockTimeoutError out of watch while the writer is stopped."""
    def locked_read(self: Store, answer: Callable[[], Any], about: str | None = None) -> Any:
        self._lock.acquire_mutex(self.lock_timeout)
        try:
            if self._current_for(about):
                return answer()
        finally:
            self._lock.release_mutex()
        return self._transact(lambda: (answer(), []))

    monkeypatch.setattr(runstore.store.Store, "_read", locked_read)
    with pytest.raises(LockTimeoutError):
        _follow_while_stopped(store_dir)


def test_lock_free_reads_answer_while_a_writer_is_stopped(store_dir: pathlib.Path) -> None:
    """get, active_by_machine, active, stats and last_seq of a store opened before the
    writer appended answer while it is stopped holding the lock; a write times out."""
    _store_with_runs(store_dir)
    reader = Store(store_dir, lock_timeout=0.2)
    pid = _stopped_writer(store_dir, 3)
    try:
        assert reader.stats().runs == 6 and reader.last_seq() == 10
        new = [r for r in reader.list() if r.machine.startswith("w")]
        assert reader.get(new[0].id) == new[0]
        assert reader.active_by_machine("m3") is not None
        assert [r.machine for r in reader.active()] == ["m3"]
        with pytest.raises(LockTimeoutError):
            reader.create(run_for("m9", "h"))
    finally:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
        wait_pid(pid)
        reader.close()


def test_a_store_used_only_to_read_creates_no_lock_file(store_dir: pathlib.Path) -> None:
    """A store whose lock file is missing (a copy without it) opened and read leaves the
    directory as it was; its first write creates the lock file."""
    runs = _store_with_runs(store_dir)
    (store_dir / _statedir.LOCK_NAME).unlink()
    before = snapshot_dir(str(store_dir))
    with Store(store_dir) as s:
        assert s.list() == runs and s.stats().runs == 3
        assert snapshot_dir(str(store_dir)) == before
        s.create(run_for("m9", "h"))
    assert (store_dir / _statedir.LOCK_NAME).is_file()


def test_unsafe_files_are_still_refused_when_only_reading(store_dir: pathlib.Path) -> None:
    """Reading without the lock checks the files as before: a symlink at the journal is
    refused (UnsafeStoreError), not read through."""
    _store_with_runs(store_dir)
    target = store_dir.parent / "elsewhere.jsonl"
    os.replace(store_dir / _statedir.DATA_NAME, target)
    os.symlink(target, store_dir / _statedir.DATA_NAME)
    with pytest.raises(UnsafeStoreError, match="symbolic link"):
        Store(store_dir)
