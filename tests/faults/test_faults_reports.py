"""A call reports what happened. ``prune()`` is one rewrite: a failure at any step (the
archive, the temp file's creation, write and fsync, the rename, the directory's fsync, the
reopening; ENOSPC, EIO, a read-only directory) leaves the store as it was or as pruned,
never half, and the error, the CLI's message and its exit code say which; the retry then
prunes what is left. A full disk that the journal's own growth filled is relieved by
``prune()`` and ``compact()``, which need room for the smaller file only. After a failed
sync, reads answer from what was synced before it and never show the unsynced lines; only
writes wait for the rewrite. ``StoreIOError`` says what its operation means (a failed read
or open changed nothing) in its text and in its ``kind``."""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import types
from collections.abc import Callable
from typing import Any

import pytest
from faults import FailingFS, run_for

import runstore.store as store_module
from runstore import (
    ChangeType,
    IOKind,
    OutputTargetError,
    Run,
    Status,
    Store,
    StoreIOError,
    _fsio as fsio,
    _interchange as interchange,
    _limits,
    _statedir,
    verify,
)
from runstore._fsio import FileSystem

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.usefixtures("clean_cli_env", "quiet_runstore_log")]

#: terminal runs in a grown store, how many a prune keeps, and so how many it removes
TERMINAL, KEEP = 20, 5
PRUNED = TERMINAL - KEEP


# -- helpers ---------------------------------------------------------------------------------


def _grow(state: pathlib.Path, terminal: int = TERMINAL, pad: int = 0) -> dict[str, Run]:
    """A store with ``terminal`` completed runs and two active ones; its runs by id."""
    with Store(state) as s:
        for i in range(terminal):
            s.create(run_for(f"t{i}", "h", status=Status.COMPLETED, error_msg="x" * pad))
        s.prepare_atomic("a1", "h", lambda: run_for("a1", "h"))
        s.prepare_atomic("a2", "h", lambda: run_for("a2", "h"))
        return {r.id: r for r in s.list()}


def _runs(state: pathlib.Path) -> dict[str, Run]:
    with Store(state) as s:
        return {r.id: r for r in s.list()}


def _pruned_state(before: dict[str, Run], keep: int = KEEP) -> dict[str, Run]:
    """The runs ``prune(keep_last=keep)`` leaves of ``before``."""
    terminal = [r for r in before.values() if r.is_terminal]
    gone = {r.id for r in terminal[:len(terminal) - keep]}
    return {i: r for i, r in before.items() if i not in gone}


def _temps(state: pathlib.Path) -> list[str]:
    return [p.name for p in state.iterdir() if p.name.startswith(_statedir.TMP_PREFIX)]


def _reported(exc: StoreIOError) -> str:
    """What a failed prune says became of the runs: "old" (nothing pruned) or "new"."""
    text = str(exc)
    if "nothing was pruned" in text or "changed nothing" in text:
        return "old"
    if f"the {PRUNED} runs were pruned" in text:
        return "new"
    return "unclear"


def _two_step_prune(self: Store, *, keep_last: int, archive: Any = None, **_: Any) -> int:
    """The prune this library had before: append the run_pruned lines, then compact."""
    def decide() -> tuple[int, list[tuple[ChangeType, Run]]]:
        terminal = [r for r in self._all_runs() if r.status.is_terminal]
        doomed = terminal[:max(len(terminal) - keep_last, 0)]
        if archive is not None:
            interchange.append_archive(os.fspath(archive), doomed, self._view.extras)
        return len(doomed), [(ChangeType.RUN_PRUNED, r) for r in doomed]

    removed = self._transact(decide)
    if removed:
        self.compact()
    return removed


class Disk(FileSystem):
    """A disk that fills up: with ``full`` an append to the journal fails with ENOSPC and
    writes nothing; a temp file (a rewrite) may take ``room`` bytes in all (None: no limit),
    then a write stops short and the next fails with ENOSPC; with ``syncs_fail`` every
    fdatasync of the journal fails with ENOSPC (its pages could not be allocated)."""

    def __init__(self) -> None:
        self.full = False
        self.room: int | None = None
        self.syncs_fail = False
        self.refused = 0
        self._names: dict[int, str] = {}

    def _enospc(self) -> None:
        self.refused += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open(self, name: str, flags: int, mode: int, dir_fd: int) -> int:
        fd = super().open(name, flags, mode, dir_fd)
        self._names[fd] = name
        return fd

    def close(self, fd: int) -> None:
        self._names.pop(fd, None)
        super().close(fd)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        name = self._names.get(fd, "")
        if name == _statedir.DATA_NAME and self.full:
            self._enospc()
        if name.startswith(_statedir.TMP_PREFIX) and self.room is not None:
            if self.room <= 0:
                self._enospc()
            n = super().write(fd, bytes(data[:self.room]))
            self.room -= n
            return n
        return super().write(fd, data)

    def fdatasync(self, fd: int) -> None:
        if self.syncs_fail and self._names.get(fd) == _statedir.DATA_NAME:
            self._enospc()
        super().fdatasync(fd)


def _archive_os(**failing: Callable[..., Any]) -> types.SimpleNamespace:
    """``os`` as ``runstore._interchange`` sees it, with some calls replaced."""
    proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    for name, call in failing.items():
        setattr(proxy, name, call)
    return proxy


def _fail(err: int) -> Callable[..., Any]:
    def call(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))
    return call


# -- prune fails at each step: old or new, never half ------------------------------------------

#: (kind of call, which one) that fails, and what the store must then be
STEPS = {
    "temp create": ("open", 1, "old"),
    "temp write": ("write", 1, "old"),
    "temp fsync": ("fsync", 1, "old"),
    "rename": ("replace", 1, "old"),
    "dir fsync": ("fsync", 2, "new"),
    "reopen": ("open", 2, "new"),
}
ERRNOS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO, "EROFS": errno.EROFS}


def _prune_failing(state: pathlib.Path, step: str, err: int,
                   archive: pathlib.Path | None = None,
                   nth: int | None = None) -> tuple[StoreIOError, Store, FailingFS]:
    kind, default, _ = STEPS[step]
    fs = FailingFS(kind, default if nth is None else nth, err)
    fs.armed = False
    s = Store(state, _fs=fs)
    fs.armed = True
    try:
        with pytest.raises(StoreIOError) as info:
            s.prune(keep_last=KEEP, archive=archive)
    finally:
        fs.armed = False
    assert fs.failed == 1
    return info.value, s, fs


@pytest.mark.parametrize("err", ERRNOS.values(), ids=ERRNOS.keys())
@pytest.mark.parametrize("step", STEPS)
def test_a_failed_prune_leaves_the_store_old_or_new_and_says_which(
        tmp_path: pathlib.Path, step: str, err: int) -> None:
    """Each step failing: the store is as before or as pruned, what the error says."""
    state = tmp_path / "s"
    before = _grow(state)
    journal_bytes = (state / "runs.jsonl").read_bytes()
    exc, s, _ = _prune_failing(state, step, err)
    want = STEPS[step][2]
    assert exc.errno == err
    assert _reported(exc) == want, str(exc)
    assert _runs(state) == (before if want == "old" else _pruned_state(before))
    if want == "old":
        assert (state / "runs.jsonl").read_bytes() == journal_bytes
        assert f"({PRUNED} runs were to be removed" in str(exc)
    assert _temps(state) == []
    assert verify.check(state).ok
    assert s.prune(keep_last=KEEP) == (PRUNED if want == "old" else 0)  # the retry
    s.close()
    assert _runs(state) == _pruned_state(before)
    assert verify.check(state).ok


def test_a_two_step_prune_is_caught_half_done(tmp_path: pathlib.Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: appending run_pruned lines before compacting leaves the runs gone
    while the error says nothing changed, and the retry prunes 0."""
    monkeypatch.setattr(Store, "prune", _two_step_prune)
    state = tmp_path / "s"
    before = _grow(state)
    exc, s, _ = _prune_failing(state, "temp write", errno.ENOSPC, nth=2)  # after the append
    assert _reported(exc) == "old"
    assert _runs(state) == _pruned_state(before)  # ... but it is new: half a prune
    assert s.prune(keep_last=KEEP) == 0
    s.close()


def test_the_retry_reports_the_count_and_feeds_every_pruned_run(tmp_path: pathlib.Path) -> None:
    """After a failed prune the retry returns the full count and the change feed shows one
    run_pruned change per pruned run, as a prune that did not fail."""
    state = tmp_path / "s"
    before = _grow(state)
    _, s, _ = _prune_failing(state, "temp fsync", errno.EIO)
    seq = s.last_seq()
    assert s.prune(keep_last=KEEP) == PRUNED
    pruned = [c for c in s.changes(seq) if c.type is ChangeType.RUN_PRUNED]
    assert sorted(c.run.id for c in pruned) == sorted(set(before) - set(_pruned_state(before)))
    assert [c.seq for c in pruned] == list(range(seq + 1, seq + 1 + PRUNED))
    s.close()
    with Store(state) as fresh:  # and from the file, reopened
        assert [c.run.id for c in fresh.changes(seq)] == [c.run.id for c in pruned]


class _ReadOnlyDir(FileSystem):
    """A state directory mounted read-only after the store was opened: creating, renaming
    and removing names fail with EROFS."""

    def __init__(self) -> None:
        self.on = False

    def open(self, name: str, flags: int, mode: int, dir_fd: int) -> int:
        if self.on and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return super().open(name, flags, mode, dir_fd)

    def replace(self, src: str, dst: str, dir_fd: int) -> None:
        if self.on:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        super().replace(src, dst, dir_fd)


def test_a_prune_in_a_read_only_directory_prunes_nothing(tmp_path: pathlib.Path) -> None:
    """A read-only state directory: the prune fails saying nothing was pruned and why; once
    it is writable again the retry prunes all of them."""
    state = tmp_path / "s"
    before = _grow(state)
    fs = _ReadOnlyDir()
    with Store(state, _fs=fs) as s:
        fs.on = True
        with pytest.raises(StoreIOError) as info:
            s.prune(keep_last=KEEP)
        assert info.value.errno == errno.EROFS and info.value.kind is IOKind.REWRITE
        assert "Read-only file system" in str(info.value)
        assert _reported(info.value) == "old"
        assert len(s.list()) == len(before)
        fs.on = False
        assert s.prune(keep_last=KEEP) == PRUNED
    assert _runs(state) == _pruned_state(before)


# -- with an archive -------------------------------------------------------------------------


def _archived_ids(path: pathlib.Path) -> list[str]:
    import orjson
    return [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()]


ARCHIVE_FAILURES = {
    "write ENOSPC": {"write": _fail(errno.ENOSPC)},
    "fsync EIO": {"fsync": _fail(errno.EIO)},
    "fsync ENOSPC": {"fsync": _fail(errno.ENOSPC)},
}


@pytest.mark.parametrize("failure", ARCHIVE_FAILURES)
def test_a_failed_archive_prunes_nothing_and_leaves_the_archive_as_it_was(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """The archive's write or fsync fails: nothing pruned, the archive as before (what was
    written is cut off), the error names the archive; the retry archives each run once."""
    state, archive = tmp_path / "s", tmp_path / "archive.jsonl"
    before = _grow(state)
    archive.write_bytes(b'{"id":"older"}\n')
    with Store(state) as s:
        proxy = _archive_os(**ARCHIVE_FAILURES[failure])
        monkeypatch.setattr(interchange, "os", proxy)
        monkeypatch.setattr(interchange, "sync_file", proxy.fsync)  # the archive's sync
        with pytest.raises(StoreIOError) as info:
            s.prune(keep_last=KEEP, archive=archive)
        monkeypatch.setattr(interchange, "os", os)
        monkeypatch.setattr(interchange, "sync_file", fsio.sync_file)
        exc = info.value
        assert exc.kind is IOKind.ARCHIVE and exc.path == str(archive)
        assert _reported(exc) == "old" and str(archive) in str(exc)
        assert archive.read_bytes() == b'{"id":"older"}\n'
        assert len(s.list()) == len(before)
        assert s.prune(keep_last=KEEP, archive=archive) == PRUNED
    assert _archived_ids(archive)[1:] == sorted(set(before) - set(_pruned_state(before)))


def test_an_archive_path_that_is_a_directory_prunes_nothing(tmp_path: pathlib.Path) -> None:
    """The archive is a directory: refused before anything is pruned, the error says so."""
    state, archive = tmp_path / "s", tmp_path / "archive"
    before = _grow(state)
    archive.mkdir()
    with Store(state) as s, pytest.raises(OutputTargetError) as info:
        s.prune(keep_last=KEEP, archive=archive)
    assert "it is a directory" in str(info.value) and "nothing was written" in str(info.value)
    assert _runs(state) == before and os.listdir(archive) == []


@pytest.mark.parametrize("step", STEPS)
def test_a_failed_rewrite_leaves_the_archive_as_the_store(tmp_path: pathlib.Path,
                                                          step: str) -> None:
    """The archive was written, then the rewrite failed: when nothing was pruned the archive
    is cut back to what it held, else it keeps the pruned runs; either way the retry leaves
    each pruned run in it once."""
    state, archive = tmp_path / "s", tmp_path / "archive.jsonl"
    before = _grow(state)
    archive.write_bytes(b'{"id":"older"}\n')
    exc, s, _ = _prune_failing(state, step, errno.ENOSPC, archive)
    gone = sorted(set(before) - set(_pruned_state(before)))
    if STEPS[step][2] == "old":
        assert _reported(exc) == "old" and "so is the archive" in str(exc)
        assert archive.read_bytes() == b'{"id":"older"}\n'
        assert s.prune(keep_last=KEEP, archive=archive) == PRUNED
    else:
        assert _reported(exc) == "new"
        assert _archived_ids(archive) == ["older", *gone]
        assert s.prune(keep_last=KEEP, archive=archive) == 0
    s.close()
    assert _archived_ids(archive) == ["older", *gone]


def test_an_archive_left_long_is_caught(tmp_path: pathlib.Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: without the cut back the archive keeps the runs after a failed
    rewrite (the retry archives them twice); when the cut back itself fails, the error
    says the archive holds them."""
    state, archive = tmp_path / "s", tmp_path / "archive.jsonl"
    _grow(state)
    monkeypatch.setattr(interchange, "cut_archive", lambda path, size: True)
    _, s, _ = _prune_failing(state, "temp write", errno.ENOSPC, archive)
    assert len(_archived_ids(archive)) == PRUNED  # left long
    monkeypatch.setattr(interchange, "cut_archive", lambda path, size: False)
    fs = FailingFS("write", 1, errno.ENOSPC)
    s.close()
    with Store(state, _fs=fs) as s2:
        with pytest.raises(StoreIOError) as info:
            s2.prune(keep_last=KEEP, archive=archive)
        fs.armed = False
    assert "the archive holds them too: a retry appends them again" in str(info.value)


# -- a full disk is relieved -----------------------------------------------------------------


def _short_history(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compactions retain 16 changes: a grown store's history is longer than that, as the
    history of a store that filled a disk is (and none runs by itself)."""
    monkeypatch.setattr(_limits, "RETAIN_CHANGES", 16)
    monkeypatch.setattr(_limits, "COMPACT_MIN_SUPERSEDED", 10**9)


def _journal_size(state: pathlib.Path) -> int:
    return (state / "runs.jsonl").stat().st_size


def _superseded(state: pathlib.Path, beats: int) -> None:
    """Heartbeats on the active runs: lines that a compaction drops."""
    with Store(state, durable=False) as s:
        active = s.active()
        for i in range(beats):
            s.heartbeat(active[i % len(active)].id)


def test_prune_relieves_a_full_disk(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
                                    ) -> None:
    """The journal's growth filled the disk (appends fail with ENOSPC): prune succeeds with
    room for the smaller file only, the file shrinks, and then the store writes again."""
    state = tmp_path / "s"
    before = _grow(state, 200, pad=200)
    _short_history(monkeypatch)
    disk = Disk()
    with Store(state, _fs=disk) as s:
        disk.full = True
        with pytest.raises(StoreIOError) as info:
            s.create(run_for("new", "h", status=Status.COMPLETED))
        assert info.value.errno == errno.ENOSPC and info.value.kind is IOKind.WRITE
        size = _journal_size(state)
        disk.room = size // 4  # room for the pruned file, not for the whole one
        assert s.prune(keep_last=10) == 190
        assert _journal_size(state) < size // 4
        feed = list(s.changes(s.stats().oldest_seq - 1))  # the last 16 of the 190 kept
        assert [c.seq for c in feed] == list(range(s.last_seq() - 15, s.last_seq() + 1))
        assert {c.type for c in feed} == {ChangeType.RUN_PRUNED}
        assert verify.check(state).ok
        disk.full, disk.room = False, None  # the space the old file held is free again
        s.create(run_for("new", "h", status=Status.COMPLETED))
    assert len(_runs(state)) == len(before) - 190 + 1


def test_a_two_step_prune_cannot_relieve_a_full_disk(tmp_path: pathlib.Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: a prune that appends before compacting fails on the full disk."""
    monkeypatch.setattr(Store, "prune", _two_step_prune)
    state = tmp_path / "s"
    _grow(state, 200, pad=200)
    disk = Disk()
    with Store(state, _fs=disk) as s:
        disk.full, disk.room = True, _journal_size(state)
        with pytest.raises(StoreIOError) as info:
            s.prune(keep_last=10)
        assert info.value.errno == errno.ENOSPC
        disk.full = False


def test_compact_relieves_a_full_disk(tmp_path: pathlib.Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Superseded lines filled the disk: compact succeeds with room for the compacted file
    only, and closing the store after it needs no room either (nothing left to mark)."""
    state = tmp_path / "s"
    before = _grow(state, 5)
    _superseded(state, 3000)
    _short_history(monkeypatch)
    disk = Disk()
    s = Store(state, _fs=disk)
    s.heartbeat(s.active()[0].id)  # a write of this store's, not yet marked in the file
    disk.full = True
    size = _journal_size(state)
    disk.room = size // 4
    s.compact()
    assert _journal_size(state) < size // 4
    s.close()
    assert disk.refused == 0
    assert _runs(state).keys() == before.keys()


def test_a_close_that_marks_after_compacting_is_caught(tmp_path: pathlib.Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: a close that still appends its mark after the compaction fails on
    the full disk."""
    real = Store._compact

    def compact_and_forget(self: Store, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        self._unmarked_writes = True

    monkeypatch.setattr(Store, "_compact", compact_and_forget)
    state = tmp_path / "s"
    _grow(state, 5)
    disk = Disk()
    s = Store(state, _fs=disk)
    s.heartbeat(s.active()[0].id)
    disk.full = True
    s.compact()
    with pytest.raises(StoreIOError):
        s.close()
    assert disk.refused == 1


def test_too_little_room_for_the_smaller_file_prunes_nothing(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Room for less than the pruned file: the prune fails cleanly (nothing pruned, no temp
    file left), and succeeds once there is room."""
    state = tmp_path / "s"
    before = _grow(state, 200, pad=200)
    _short_history(monkeypatch)
    journal_bytes = (state / "runs.jsonl").read_bytes()
    disk = Disk()
    with Store(state, _fs=disk) as s:
        disk.full, disk.room = True, 100
        with pytest.raises(StoreIOError) as info:
            s.prune(keep_last=10)
        assert info.value.errno == errno.ENOSPC and _reported(info.value) == "old"
        assert "190 runs were to be removed" in str(info.value)
        assert (state / "runs.jsonl").read_bytes() == journal_bytes
        assert _temps(state) == []
        disk.room = None
        assert s.prune(keep_last=10) == 190
    assert len(_runs(state)) == len(before) - 190


# -- reads after a failed sync -----------------------------------------------------------------


def _failed_sync(state: pathlib.Path) -> tuple[Store, Disk, Run, dict[str, Run], int]:
    """A store whose sync of a finish() failed on a full disk (no room for a rewrite
    either): (store, disk, the run as before the finish, the runs before, last seq)."""
    before = _grow(state)
    disk = Disk()
    s = Store(state, _fs=disk)
    run = next(r for r in before.values() if not r.is_terminal)
    seq = s.last_seq()
    disk.syncs_fail, disk.room = True, 0
    with pytest.raises(StoreIOError) as info:
        s.finish(run.id, Status.FAILED)
    assert info.value.kind is IOKind.SYNC and info.value.errno == errno.ENOSPC
    return s, disk, run, before, seq


def _reads(s: Store, run: Run, seq: int) -> dict[str, Any]:
    return {"get": s.get(run.id), "list": {r.id: r for r in s.list()},
            "active": [r.id for r in s.active()], "by machine": s.active_by_machine(run.machine),
            "last seq": s.last_seq(), "changes": list(s.changes(seq)),
            "stats": (s.stats().runs, s.stats().last_seq)}


def test_reads_after_a_failed_sync_answer_from_what_was_synced(tmp_path: pathlib.Path) -> None:
    """Every read answers, from the state before the change whose sync failed: that change
    is not shown, on a disk with no room for the rewrite."""
    s, disk, run, before, seq = _failed_sync(tmp_path / "s")
    expected = {"get": run, "list": before,
                "active": [r.id for r in before.values() if not r.is_terminal],
                "by machine": run, "last seq": seq, "changes": [],
                "stats": (len(before), seq)}
    assert _reads(s, run, seq) == expected
    with pytest.raises(StoreIOError) as info:  # a write waits for the rewrite, which fails
        s.heartbeat(run.id)
    assert info.value.kind is IOKind.REWRITE
    assert _reads(s, run, seq) == expected  # and reads still answer
    disk.syncs_fail, disk.room = False, None
    s.close()


def test_reads_after_a_failed_sync_do_not_trust_the_file(tmp_path: pathlib.Path) -> None:
    """The unsynced line is in the file (another reader sees it), yet this store's reads
    leave it out, even once a sync would succeed again: a retried sync proves nothing."""
    s, disk, run, _, seq = _failed_sync(tmp_path / "s")
    disk.syncs_fail = False  # syncs work again, the rewrite still has no room
    with Store(tmp_path / "s") as other:
        assert other.get(run.id).status is Status.FAILED  # in the file, not acknowledged
    assert s.get(run.id) == run and s.last_seq() == seq
    disk.room = None
    s.close()


def test_the_rewrite_leaves_out_the_unsynced_change(tmp_path: pathlib.Path) -> None:
    """Once there is room, the next write rewrites the file first, without the change whose
    sync failed (nothing was written after it): the store stays as reads showed it."""
    state = tmp_path / "s"
    s, disk, run, _, seq = _failed_sync(state)
    inode = (state / "runs.jsonl").stat().st_ino
    disk.syncs_fail, disk.room = False, None
    beat = s.heartbeat(run.id)
    assert (state / "runs.jsonl").stat().st_ino != inode  # rewritten, not synced again
    assert beat.status is Status.PENDING and beat.revision == run.revision + 1
    assert [c.seq for c in s.changes(seq)] == [seq + 1]
    s.close()
    assert _runs(state)[run.id] == beat
    assert verify.check(state).ok


def test_the_rewrite_keeps_an_unsynced_change_another_writer_followed(
        tmp_path: pathlib.Path) -> None:
    """Another store wrote after the unsynced line: the rewrite keeps both (a change may
    depend on it), and reads then show them."""
    state = tmp_path / "s"
    s, disk, run, _, _ = _failed_sync(state)
    with Store(state) as other:
        created = other.create(run_for("other", "h", status=Status.COMPLETED))
    assert s.get(run.id) == run and created.id not in {r.id for r in s.list()}
    disk.syncs_fail, disk.room = False, None
    s.create(run_for("mine", "h", status=Status.COMPLETED))
    assert s.get(run.id).status is Status.FAILED and s.get(created.id) == created
    s.close()
    assert verify.check(state).ok


def test_reads_that_rewrite_after_a_failed_sync_are_caught(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: reads that catch up and rewrite, as writes do, fail on the full
    disk."""
    monkeypatch.setattr(Store, "_answer_intact", lambda self: False)
    s, disk, run, _, _ = _failed_sync(tmp_path / "s")
    with pytest.raises(StoreIOError):
        s.get(run.id)
    disk.syncs_fail, disk.room = False, None
    s.close()


def test_reads_that_trust_the_unsynced_lines_are_caught(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: taking the bytes whose sync failed as synced shows the change."""
    real = Store._keep_intact

    def trusting(self: Store, start: int = -1, end: int = -1) -> None:
        self._synced = max(self._synced, end)
        real(self, start, end)

    monkeypatch.setattr(Store, "_keep_intact", trusting)
    s, disk, run, _, seq = _failed_sync(tmp_path / "s")
    assert s.get(run.id).status is Status.FAILED
    assert s.last_seq() == seq + 1
    disk.syncs_fail, disk.room = False, None
    s.close()


def _rewrites_after_a_failed_directory_sync(state: pathlib.Path) -> bool:
    """Whether, after a compaction whose directory fsync failed, the next write rewrites
    the file (a new inode) rather than trusting a later sync."""
    _grow(state)
    fs = FailingFS("fsync", 2, errno.EIO)
    with Store(state, _fs=fs) as s:
        with pytest.raises(StoreIOError) as info:
            s.compact()
        assert info.value.kind is IOKind.SYNC_DIR
        inode = (state / "runs.jsonl").stat().st_ino
        s.heartbeat(s.active()[0].id)
        return (state / "runs.jsonl").stat().st_ino != inode


def test_a_failed_directory_sync_forces_the_rewrite(tmp_path: pathlib.Path) -> None:
    """The handling branches on ``kind``: after a failed directory sync the next write
    rewrites the file though syncs now succeed."""
    assert _rewrites_after_a_failed_directory_sync(tmp_path / "s")


def test_a_failed_directory_sync_without_the_rewrite_is_caught(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: with no kind calling for the rewrite the file is not rewritten."""
    monkeypatch.setattr(_limits, "RESYNC_KINDS", frozenset())
    assert not _rewrites_after_a_failed_directory_sync(tmp_path / "s")


# -- what each StoreIOError says ---------------------------------------------------------------


class _ReadFails(FileSystem):
    """Reads of ``size`` bytes fail with EIO while ``on`` (a run's line is read in 2,048)."""

    def __init__(self, size: int = 2048) -> None:
        self.on = False
        self.size = size

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if self.on and size == self.size:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().pread(fd, size, offset)


def _read_error(state: pathlib.Path) -> StoreIOError:
    fs = _ReadFails()
    with Store(state, _fs=fs) as s:
        done = next(r for r in s.list() if r.is_terminal)
        fs.on = True
        with pytest.raises(StoreIOError) as info:
            s.get(done.id)
        fs.on = False
    return info.value


def _failing_call(kind: str, nth: int, call: Callable[[Store], Any]) -> Callable[[pathlib.Path],
                                                                                 StoreIOError]:
    def run(state: pathlib.Path) -> StoreIOError:
        fs = FailingFS(kind, nth, errno.EIO)
        fs.armed = kind == "open"
        try:
            s = Store(state, _fs=fs)
        except StoreIOError as exc:
            return exc
        fs.armed = True
        with pytest.raises(StoreIOError) as info:
            call(s)
        fs.armed = False
        s.close()
        return info.value
    return run


def _write(s: Store) -> None:
    s.create(run_for("w", "h", status=Status.COMPLETED))


#: operation -> (how to make it fail, its kind, its action, words it must say, words it must not)
OPERATIONS: dict[str, tuple[Callable[[pathlib.Path], StoreIOError], IOKind, str, str, str]] = {
    "read": (_read_error, IOKind.READ, "reading", "nothing was changed", "acknowledged"),
    "open": (_failing_call("open", 1, _write), IOKind.OPEN, "opening", "nothing was changed",
             "acknowledged"),
    "append": (_failing_call("write", 1, _write), IOKind.WRITE, "appending to",
               "not acknowledged and may or may not be in the file", "nothing was changed"),
    "sync": (_failing_call("fdatasync", 1, _write), IOKind.SYNC, "syncing",
             "not known to be durable", "nothing was changed"),
    "rewrite": (_failing_call("write", 1, lambda s: s.compact()), IOKind.REWRITE, "rewriting",
                "the journal is as it was", "may or may not"),
    "sync dir": (_failing_call("fsync", 2, lambda s: s.compact()), IOKind.SYNC_DIR,
                 "syncing the directory", "a power loss may bring back the one before it",
                 "nothing was changed"),
}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_store_io_error_says_what_its_operation_means(tmp_path: pathlib.Path,
                                                       operation: str) -> None:
    """A failed read, open, append, sync, rewrite or directory sync: ``kind``, ``action``
    and a sentence fitting it, naming the file and the cause; picklable with all of it."""
    make, kind, action, says, never = OPERATIONS[operation]
    state = tmp_path / "s"
    _grow(state)
    exc = make(state)
    assert exc.kind is kind and exc.action == action
    text = str(exc)
    assert text.startswith(f"{action} {exc.path} failed (Input/output error); ")
    assert says in text and never not in text
    assert exc.errno == errno.EIO and isinstance(exc, OSError)
    again = pickle.loads(pickle.dumps(exc))
    assert (type(again), again.kind, again.action, again.path, str(again)) == (
        StoreIOError, kind, action, exc.path, text)


def test_a_store_io_error_made_the_old_way_keeps_its_meaning() -> None:
    """``StoreIOError(path, action, cause)`` without a kind still means a failed write."""
    exc = StoreIOError("/s/runs.jsonl", "syncing", OSError(errno.EIO, "Input/output error"))
    assert exc.kind is IOKind.WRITE and "not acknowledged" in str(exc)
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)


# -- the CLI -----------------------------------------------------------------------------------


Cli = Callable[..., tuple[int, str, str]]


def _cli_with(monkeypatch: pytest.MonkeyPatch, fs: FileSystem) -> None:
    monkeypatch.setattr(store_module, "DEFAULT_FS", fs)


def test_cli_prune_failure_says_nothing_was_pruned_and_the_retry_counts(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, run_cli: Cli) -> None:
    """`prune` whose rewrite fails: exit 1, one line saying nothing was pruned and why,
    nothing on stdout; the retry prints the full count."""
    state = tmp_path / "s"
    before = _grow(state)
    _cli_with(monkeypatch, FailingFS("write", 1, errno.ENOSPC))
    code, out, err = run_cli("--state-dir", str(state), "prune", "--keep-last", str(KEEP))
    assert (code, out) == (1, "")
    assert err.startswith("runstore: error: rewriting ")
    assert "(No space left on device); nothing was pruned (15 runs were to be removed" in err
    assert err.count("\n") == 1
    assert _runs(state) == before
    _cli_with(monkeypatch, FileSystem())
    assert run_cli("--state-dir", str(state), "prune", "--keep-last", str(KEEP)) == (
        0, f"pruned {PRUNED} runs\n", "")


def test_cli_prune_whose_directory_sync_fails_says_the_runs_were_pruned(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, run_cli: Cli) -> None:
    """`prune` whose directory fsync fails: exit 1, saying the runs were pruned but may come
    back after a power loss; `compact` then makes it durable."""
    state = tmp_path / "s"
    before = _grow(state)
    _cli_with(monkeypatch, FailingFS("fsync", 2, errno.EIO))
    code, out, err = run_cli("--state-dir", str(state), "prune", "--keep-last", str(KEEP))
    assert (code, out) == (1, "")
    assert f"the {PRUNED} runs were pruned, but a power loss may bring them back" in err
    assert "run `compact` once the disk is healthy" in err
    _cli_with(monkeypatch, FileSystem())
    assert _runs(state) == _pruned_state(before)
    assert run_cli("--state-dir", str(state), "compact")[0] == 0


@pytest.fixture
def terminal_only(tmp_path: pathlib.Path) -> tuple[pathlib.Path, Run, Run]:
    """A store with a completed run and a pending one: (its directory, the two runs)."""
    state = tmp_path / "s"
    with Store(state) as s:
        done = s.create(run_for("t", "h", status=Status.COMPLETED))
        active = s.create(run_for("a", "h"))
    return state, done, active


#: operation -> (the failing file system, the command, its action, words it must say)
CLI_CASES: dict[str, tuple[Callable[[], FileSystem], str, str, str]] = {
    "read": (lambda: _on(_ReadFails()), "show {done}", "reading ", "nothing was changed"),
    "open": (lambda: FailingFS("open", 1, errno.EIO), "list", "opening ",
             "nothing was changed"),
    "append": (lambda: FailingFS("write", 1, errno.EIO), "mark {active} failed",
               "appending to ", "the change was not acknowledged"),
    "sync": (lambda: FailingFS("fdatasync", 1, errno.EIO), "mark {active} failed",
             "syncing ", "not known to be durable"),
    "rewrite": (lambda: FailingFS("write", 1, errno.EIO), "compact", "rewriting ",
                "the journal is as it was"),
}


def _on(fs: _ReadFails) -> _ReadFails:
    fs.on = True
    return fs


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_io_errors_say_what_their_operation_means(
        terminal_only: tuple[pathlib.Path, Run, Run], monkeypatch: pytest.MonkeyPatch,
        run_cli: Cli, case: str) -> None:
    """The CLI's one line for a failed read, open, append, sync or rewrite fits it, and the
    exit code is 1."""
    state, done, active = terminal_only
    make, command, action, says = CLI_CASES[case]
    _cli_with(monkeypatch, make())
    code, out, err = run_cli("--state-dir", str(state),
                             *command.format(done=done.id, active=active.id).split())
    assert code == 1 and out == ""
    assert err.startswith(f"runstore: error: {action}") and says in err
    if case in ("read", "open"):
        assert "acknowledged" not in err
