"""What a durable store shows is durable. A writer appends under the flock and syncs after
releasing it (group commit); meanwhile another handle (another process in production) can read
its lines. Every read that shows such a change must first make it durable, so that a power
loss - emulated here as the journal cut back to its bytes as of the last completed sync -
never takes back something a caller saw (and may have acted on: freed a machine elsewhere,
deleted scratch space). Each detection test has a broken variant: ``Store._make_visible``
monkeypatched away, the same scenario then shows a change the power loss takes back."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faults import run_for

from runstore import IOKind, PrepareOutcome, Run, Status, Store, StoreIOError, _limits
from runstore._fsio import FileSystem
from runstore._statedir import DATA_NAME

pytestmark = pytest.mark.timeout(120)


class Disk(FileSystem):
    """A file system shared by the stores of a test that remembers, per inode, the bytes of
    each file as of its last completed sync: what a power loss would leave. ``hold()`` makes
    the next sync of the thread that calls the store wait, before syncing, until released."""

    def __init__(self, fail_syncs: int = 0) -> None:
        self.synced: dict[int, bytes] = {}
        self.syncs = 0
        self.fail_syncs = fail_syncs
        self._hold: threading.Event | None = None
        self.waiting = threading.Event()

    def _record(self, fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        with open(f"/proc/self/fd/{fd}", "rb") as f:  # temp files are open write-only
            self.synced[st.st_ino] = f.read()
        self.syncs += 1

    def _sync(self, fd: int, sync: Callable[[int], None]) -> None:
        hold, self._hold = self._hold, None
        if hold is not None:
            self.waiting.set()
            assert hold.wait(60)
        if self.fail_syncs:
            self.fail_syncs -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        sync(fd)
        self._record(fd)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, os.fdatasync)

    def fsync(self, fd: int) -> None:
        self._sync(fd, os.fsync)

    def vouch(self, path: pathlib.Path) -> None:
        """Record a file synced by a store that did not use this file system."""
        self.synced[os.stat(path).st_ino] = path.read_bytes()

    def hold(self) -> threading.Event:
        self.waiting.clear()
        self._hold = threading.Event()
        return self._hold


def after_power_loss(state_dir: pathlib.Path, disk: Disk, into: pathlib.Path) -> Store:
    """A store opened on a copy of ``state_dir`` whose journal holds only what was synced."""
    ino = os.stat(state_dir / DATA_NAME).st_ino
    into.mkdir()
    (into / DATA_NAME).write_bytes(disk.synced.get(ino, b""))
    return Store(into)


@contextlib.contextmanager
def in_flight(disk: Disk, call: Callable[[], Any]) -> Iterator[list[Any]]:
    """Run ``call`` (a write on another handle) in a thread until it has written its lines,
    released the flock and is about to sync them; let it finish on exit."""
    release = disk.hold()
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    try:
        assert disk.waiting.wait(30), "the write never reached its sync"
        yield result
    finally:
        release.set()
        thread.join(30)
    assert result, "the write in flight failed"


@pytest.fixture
def scene(tmp_path: pathlib.Path) -> tuple[pathlib.Path, Disk, Store, Store, Run]:
    """A durable store with one running run on m1, a writer and a reader handle on it."""
    state = tmp_path / "s"
    disk = Disk()
    writer = Store(state, _fs=disk)
    run, _ = writer.prepare_atomic("m1", "h1", lambda: run_for("m1", "h1"))
    writer.start(run.id)
    reader = Store(state, _fs=disk)
    return state, disk, writer, reader, run


#: reads that show a finished run (each returns what it showed, and a predicate on a store
#: that says whether that store still holds what was shown)
READS: dict[str, tuple[Callable[[Store, Run], Any], Callable[[Store, Run], bool]]] = {
    "get": (lambda s, r: s.get(r.id).status,
            lambda s, r: s.get(r.id).status is Status.COMPLETED),
    "list": (lambda s, r: [x.status for x in s.list()],
             lambda s, r: [x.status for x in s.list()] == [Status.COMPLETED]),
    "active": (lambda s, r: s.active(), lambda s, r: s.active() == []),
    "active_by_machine": (lambda s, r: s.active_by_machine("m1"),
                          lambda s, r: s.active_by_machine("m1") is None),
    "find": (lambda s, r: s.find_by_test_dir_hash_and_machine("h1", "m1")[0].status,
             lambda s, r: s.find_by_test_dir_hash_and_machine("h1", "m1")[0].status
             is Status.COMPLETED),
    "changes": (lambda s, r: [c.run.status for c in s.changes(0)][-1],
                lambda s, r: [c.run.status for c in s.changes(0)][-1] is Status.COMPLETED),
    "last_seq": (lambda s, r: s.last_seq(), lambda s, r: s.last_seq() == 3),
    "stats": (lambda s, r: s.stats().last_seq, lambda s, r: s.stats().last_seq == 3),
}


def _finish(writer: Store, run: Run) -> Callable[[], Run]:
    return lambda: writer.finish(run.id, Status.COMPLETED, exit_code=0)


def _shows_finish(scene: tuple[pathlib.Path, Disk, Store, Store, Run], read: str,
                  tmp_path: pathlib.Path) -> tuple[Any, bool]:
    state, disk, writer, reader, run = scene
    show, holds = READS[read]
    with in_flight(disk, _finish(writer, run)):
        shown = show(reader, run)
        lost = after_power_loss(state, disk, tmp_path / "lost")
        try:
            kept = holds(lost, run)
        finally:
            lost.close()
    return shown, kept


@pytest.mark.parametrize("read", sorted(READS))
def test_a_read_shows_a_change_only_once_it_is_durable(
        scene: tuple[pathlib.Path, Disk, Store, Store, Run], read: str,
        tmp_path: pathlib.Path) -> None:
    shown, kept = _shows_finish(scene, read, tmp_path)
    assert kept, f"{read} showed {shown!r}, which a power loss then took back"


@pytest.mark.parametrize("read", ["get", "active_by_machine", "changes"])
def test_broken_variant_without_the_sync_a_power_loss_takes_back_what_was_read(
        scene: tuple[pathlib.Path, Disk, Store, Store, Run], read: str,
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Store, "_make_visible", lambda self: None)
    shown, kept = _shows_finish(scene, read, tmp_path)
    assert not kept, f"{read} showed {shown!r}; without the sync it should not be durable"


def test_busy_names_only_a_durable_run(tmp_path: pathlib.Path) -> None:
    """A dispatcher told BUSY for a machine acts on it (tries another machine); the run that
    made the machine busy must survive a power loss."""
    state, disk = tmp_path / "s", Disk()
    writer, reader = Store(state, _fs=disk), Store(state, _fs=disk)
    with in_flight(disk, lambda: writer.prepare_atomic(
            "m2", "h2", lambda: run_for("m2", "h2"))) as made:
        busy, outcome = reader.prepare_atomic("m2", "other", lambda: run_for("m2", "other"))
        assert outcome is PrepareOutcome.BUSY
        with after_power_loss(state, disk, tmp_path / "lost") as lost:
            assert lost.get(busy.id).machine == "m2"
    assert made[0][0].id == busy.id


def test_a_reader_opened_during_the_sync_answers_only_after_syncing(
        scene: tuple[pathlib.Path, Disk, Store, Store, Run], tmp_path: pathlib.Path) -> None:
    """Opening reads the whole file (its view then holds the unsynced line); the first
    read answers from that view, after one sync (made by the opening or by the read)."""
    state, disk, writer, _reader, run = scene
    with in_flight(disk, _finish(writer, run)):
        before = disk.syncs
        fresh = Store(state, _fs=disk)
        assert fresh.get(run.id).status is Status.COMPLETED
        assert disk.syncs == before + 1
        with after_power_loss(state, disk, tmp_path / "lost") as lost:
            assert lost.get(run.id).status is Status.COMPLETED
        fresh.close()


def test_watch_yields_only_durable_changes(
        scene: tuple[pathlib.Path, Disk, Store, Store, Run], tmp_path: pathlib.Path) -> None:
    state, disk, writer, reader, run = scene
    with in_flight(disk, _finish(writer, run)):
        feed = reader.watch(since_seq=2, poll_interval=0.01)
        change = next(feed)
        feed.close()
        assert change.run.status is Status.COMPLETED
        with after_power_loss(state, disk, tmp_path / "lost") as lost:
            assert [c.seq for c in lost.changes(0)][-1] == change.seq


def test_a_non_durable_reader_may_show_an_unsynced_change(
        scene: tuple[pathlib.Path, Disk, Store, Store, Run], tmp_path: pathlib.Path) -> None:
    """``durable=False`` promises nothing across a power loss, and pays no sync for reads."""
    state, disk, writer, _reader, run = scene
    loose = Store(state, _fs=disk, durable=False)
    with in_flight(disk, _finish(writer, run)):
        before = disk.syncs
        assert loose.get(run.id).status is Status.COMPLETED
        assert disk.syncs == before
        with after_power_loss(state, disk, tmp_path / "lost") as lost:
            assert lost.get(run.id).status is Status.RUNNING
    loose.close()


def test_a_failed_sync_of_a_read_shows_nothing_unsynced(
        scene: tuple[pathlib.Path, Disk, Store, Store, Run], tmp_path: pathlib.Path) -> None:
    """The reader's sync fails (EIO): the read raises a StoreIOError of kind SYNC_READ naming
    the journal and shows nothing; the next call rewrites the file through a synced temp
    file before it answers, so what it shows then survives a power loss."""
    state, disk, writer, reader, run = scene
    with in_flight(disk, _finish(writer, run)):
        disk.fail_syncs = 1
        with pytest.raises(StoreIOError) as info:
            reader.get(run.id)
        assert info.value.kind is IOKind.SYNC_READ
        assert str(state / DATA_NAME) in str(info.value)
        assert "nothing was shown" in str(info.value)
        inode = os.stat(state / DATA_NAME).st_ino
        assert reader.get(run.id).status is Status.COMPLETED
        assert os.stat(state / DATA_NAME).st_ino != inode  # rewritten
        with after_power_loss(state, disk, tmp_path / "lost") as lost:
            assert lost.get(run.id).status is Status.COMPLETED
    reader.close()


def test_own_writes_and_reads_cost_no_extra_sync(tmp_path: pathlib.Path) -> None:
    """One sync per acknowledged write; reads of what this handle wrote and synced, and
    reads of a store whose lines are already vouched for, sync nothing."""
    disk = Disk()
    store = Store(tmp_path / "s", _fs=disk)
    before = disk.syncs
    for i in range(20):
        run, _ = store.prepare_atomic(f"m{i}", "h", lambda i=i: run_for(f"m{i}", "h"))
        store.start(run.id)
        store.get(run.id)
        store.list()
        store.finish(run.id, Status.COMPLETED, exit_code=0)
        store.active()
    assert disk.syncs - before == 60
    store.close()
    again = Store(tmp_path / "s", _fs=disk)
    before = disk.syncs
    assert len(again.list()) == 20
    assert disk.syncs == before
    again.close()


def _finish_then_die(state: str, run_id: str) -> None:
    os.environ["RUNSTORE_FAILPOINT"] = "append.after_write"
    import runstore._failpoints as failpoints
    failpoints._arm(os.environ["RUNSTORE_FAILPOINT"])
    Store(state).finish(run_id, Status.COMPLETED, exit_code=0)


@pytest.mark.parametrize("broken", [False, True], ids=["gated", "broken-variant"])
def test_another_process_killed_before_its_sync(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, broken: bool) -> None:
    """A process writes its line and dies before syncing it (the page cache still holds
    it): a reader that shows the change syncs it first."""
    import multiprocessing
    state = tmp_path / "s"
    with Store(state) as setup:
        run, _ = setup.prepare_atomic("m1", "h1", lambda: run_for("m1", "h1"))
        setup.start(run.id)
    disk = Disk()
    disk.vouch(state / DATA_NAME)  # closed cleanly: synced
    reader = Store(state, _fs=disk)
    child = multiprocessing.get_context("fork").Process(
        target=_finish_then_die, args=(str(state), run.id))
    child.start()
    child.join(30)
    assert child.exitcode == -9
    if broken:
        monkeypatch.setattr(Store, "_make_visible", lambda self: None)
    before = disk.syncs
    assert reader.get(run.id).status is Status.COMPLETED
    with after_power_loss(state, disk, tmp_path / "lost") as lost:
        kept = lost.get(run.id).status is Status.COMPLETED
    assert (disk.syncs > before, kept) == ((False, False) if broken else (True, True))
    reader.close()


class ShortWrite(FileSystem):
    """Writes only the first line of the next append, waits ``pause`` seconds (the lock
    held), then fails it with ENOSPC: the store cuts the line back."""

    def __init__(self) -> None:
        self.armed = False
        self.reached = threading.Event()

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if not self.armed:
            return os.write(fd, data)
        self.armed = False
        first = bytes(data)
        os.write(fd, first[:first.index(b"\n") + 1])
        self.reached.set()
        time.sleep(0.1)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _read_during_a_failing_import(tmp_path: pathlib.Path) -> list[str]:
    """What a reader lists while another handle's import of two runs has written its first
    line and is about to fail and cut it back."""
    state, fs = tmp_path / "s", ShortWrite()
    writer, reader = Store(state, _fs=fs), Store(state)
    reader.list()
    fs.armed = True
    failed: list[BaseException] = []

    def importing() -> None:
        try:
            writer.import_runs([
                run_for("m1", "h1", status=Status.COMPLETED,
                        id="20260101T000000.000000Z-0000000000000001"),
                run_for("m2", "h2", status=Status.COMPLETED,
                        id="20260101T000000.000000Z-0000000000000002")])
        except StoreIOError as exc:
            failed.append(exc)

    thread = threading.Thread(target=importing)
    thread.start()
    assert fs.reached.wait(30)
    seen = [r.machine for r in reader.list()]
    thread.join(30)
    assert failed and failed[0].kind is IOKind.WRITE  # not acknowledged, and cut back
    assert reader.list() == [] and writer.list() == []
    writer.close()
    reader.close()
    return seen


def test_a_read_never_shows_part_of_an_append_that_fails(tmp_path: pathlib.Path) -> None:
    """A read waits (briefly) for the writers' lock: the lines of an append still being
    written, or one that then fails and is cut back, are never shown."""
    assert _read_during_a_failing_import(tmp_path) == []


def test_broken_variant_a_read_without_the_lock_shows_a_failing_append(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: a read that never waits for the lock shows the first run of an
    import that then fails."""
    monkeypatch.setattr(_limits, "READ_LOCK_WAIT", 0.0)
    assert _read_during_a_failing_import(tmp_path) == ["m1"]
