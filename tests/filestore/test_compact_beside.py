"""Automatic compaction beside the lock: the compacted copy is written and synced while other
processes go on writing; only copying what they appended meanwhile and the rename take the
lock. A compaction another process is running is left alone (its temp file too), and one that
cannot finish (the file was replaced, the lock is busy) is given up quietly and retried."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import functools
import logging
import os
import pathlib
import subprocess
import sys
from typing import Any

import orjson
import pytest
from faults import FailingFS, cycle, lock_held

from runstore import (
    ChangeType,
    Run,
    Status,
    Store,
    _codec as codec,
    _compaction as compaction,
    _fields,
    _journal as journal,
    _limits,
    _lock as lock,
    _statedir,
    _temps,
    verify,
)
from runstore._fsio import FileSystem
from runstore.errors import CorruptStoreError, UnsafeStoreError

_NOW = _dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=_dt.UTC)

_WRITER = """
import sys
from runstore import Run, Status, Store
s = Store(sys.argv[1], lock_timeout=5)
for i in range(5):
    run, _ = s.prepare_atomic(f"c{i}", "h", lambda i=i: Run(f"c{i}", "/t/c", "h"))
    s.start(run.id)
    s.finish(run.id, Status.COMPLETED)
    print(run.id)
s.close()
"""

@pytest.fixture
def often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Automatic compaction after a few dozen superseded lines."""
    monkeypatch.setattr(_limits, "COMPACT_MIN_SUPERSEDED", 8)
    monkeypatch.setattr(_limits, "RETAIN_CHANGES", 4)


def _lines(path: pathlib.Path) -> tuple[dict[str, Any], int, list[tuple[int, dict[str, Any]]]]:
    """The header, where the compacted base ends, and every record line with its offset."""
    data = path.read_bytes()
    nl = data.index(b"\n")
    header = orjson.loads(data[:nl])
    records, pos = [], nl + 1
    while pos < len(data):
        end = data.index(b"\n", pos)
        records.append((pos, orjson.loads(data[pos:end])))
        pos = end + 1
    return header, nl + 1 + header["base_bytes"] + header["history_bytes"], records


def _compacted_through(store_dir: pathlib.Path) -> int:
    through: int = _lines(store_dir / "runs.jsonl")[0]["compacted_through"]
    return through


def _hook_write_temp(monkeypatch: pytest.MonkeyPatch, after: Any) -> list[int]:
    """Call ``after()`` once, right after the first compacted copy is written and synced;
    the returned list counts the copies written."""
    original = journal.Journal.write_temp
    copies: list[int] = []

    def write_temp(self: journal.Journal, fd: int, chunks: Any) -> None:
        original(self, fd, chunks)
        copies.append(fd)
        if len(copies) == 1:
            after()

    monkeypatch.setattr(journal.Journal, "write_temp", write_temp)
    return copies


@pytest.mark.timeout(120)
def test_other_processes_write_while_the_compacted_copy_is_written(
        store_dir: pathlib.Path, often: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process takes the lock and writes five runs while the compaction writes its
    copy; those runs end up after the new file's base, re-marked durable up to the base, and
    every run is there for this process, a fresh one and ``check``."""
    Store(store_dir).close()
    theirs: list[str] = []

    def other_process_writes() -> None:
        out = subprocess.run([sys.executable, "-c", _WRITER, str(store_dir)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr  # it got the lock in time (lock_timeout=5)
        theirs.extend(out.stdout.split())

    copies = _hook_write_temp(monkeypatch, other_process_writes)
    with Store(store_dir) as s:
        ours: list[str] = []
        while not copies:
            ours.append(cycle(s, f"m{len(ours) % 3}"))
        assert len(ours) < 30 and len(theirs) == 5
        header, base_end, records = _lines(store_dir / "runs.jsonl")
        assert header["compacted_through"] > 0
        tail = [(offset, d) for offset, d in records if d["id"] in theirs]
        assert tail and all(offset >= base_end for offset, _ in tail)
        assert all(d["durable"] >= base_end for _, d in tail)
        assert {r.id for r in s.list()} == {*ours, *theirs}
        assert all(s.get(rid).status is Status.COMPLETED for rid in theirs)
        cycle(s, "m0")  # the view points into the new file: writing on works
    with Store(store_dir) as fresh:
        assert len(fresh.list()) == len(ours) + len(theirs) + 1
    assert verify.check(store_dir).ok
    assert not (store_dir / _statedir.COMPACTING_NAME).exists()


def test_a_compaction_another_process_is_running_is_left_alone(
        store_dir: pathlib.Path, often: None) -> None:
    """While another open file description holds the compaction temp file's flock, writes
    neither compact nor remove that file (opening the store neither); once it is free, the
    next write removes it as stale and compaction resumes."""
    Store(store_dir).close()
    temp = store_dir / _statedir.COMPACTING_NAME
    fd = os.open(temp, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with Store(store_dir) as s:
            for i in range(30):
                cycle(s, f"m{i % 3}")
        with Store(store_dir) as s:
            assert len(s.list()) == 30
        assert temp.exists()
        assert _compacted_through(store_dir) == 0
    finally:
        os.close(fd)
    with Store(store_dir) as s:
        assert temp.exists()  # opening reads: it removes nothing
        for i in range(30):
            cycle(s, f"m{i % 3}")
            assert not temp.exists() or i > 0
        assert len(s.list()) == 60
    assert _compacted_through(store_dir) > 0


def test_compaction_gives_up_when_the_file_is_replaced_meanwhile(
        store_dir: pathlib.Path, often: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit compaction elsewhere replaces the file while the copy is written: the
    copy is dropped (no error, no temp file left) and the store reads on from the new file."""
    Store(store_dir).close()
    other = Store(store_dir)
    copies = _hook_write_temp(monkeypatch, other.compact)
    try:
        with Store(store_dir) as s:
            ids = [cycle(s, f"m{i % 3}") for i in range(30)]
            assert len(copies) >= 2  # ours, then the other's
            assert not (store_dir / _statedir.COMPACTING_NAME).exists()
            assert [r.id for r in s.list()] == ids
    finally:
        other.close()
    with Store(store_dir) as fresh:
        assert [r.id for r in fresh.list()] == ids
    assert verify.check(store_dir).ok


@pytest.mark.timeout(60)
def test_compaction_gives_up_when_the_lock_stays_busy(
        store_dir: pathlib.Path, often: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is held elsewhere past ``lock_timeout`` when the copy is ready: the call that
    compacted returns normally (its own change was written before), the copy is dropped, and
    a later write compacts."""
    Store(store_dir).close()
    holding = contextlib.ExitStack()
    copies = _hook_write_temp(monkeypatch, lambda: holding.enter_context(lock_held(store_dir)))
    with Store(store_dir, lock_timeout=0.3) as s, holding:
        calls = 0
        while not copies:  # one call at a time: the one that compacts returns normally
            machine = f"m{calls % 3}"
            run, _ = s.prepare_atomic(machine, "h", functools.partial(Run, machine, "/t", "h"))
            for status in (Status.RUNNING, Status.COMPLETED):
                calls += 1
                if copies:
                    break
                if status is Status.RUNNING:
                    s.start(run.id)
                else:
                    s.finish(run.id, status)
        assert calls < 60
        assert not (store_dir / _statedir.COMPACTING_NAME).exists()
        assert _compacted_through(store_dir) == 0
        holding.close()
    with Store(store_dir) as s:
        before = len(s.list())
        for i in range(30):
            cycle(s, f"n{i % 3}")
        assert len(s.list()) == before + 30
    assert _compacted_through(store_dir) > 0


def test_restamp_changes_only_the_durable_mark() -> None:
    """The mark is found by its quoted key, never inside a string value; the line stays
    sound and decodes to the same record."""
    run = Run("m1", '/t/"durable":7', "h")
    line = codec.encode_record(3, ChangeType.RUN_CREATED, _NOW, 120, run)[:-1]
    again = codec.restamp(line, 4096)
    data, before = codec.decode_line(again[:-1]), codec.decode_line(line)
    assert data["durable"] == 4096 and data["test_dir"] == '/t/"durable":7'
    assert {k: v for k, v in data.items() if k not in ("durable", "crc")} == \
        {k: v for k, v in before.items() if k not in ("durable", "crc")}
    with pytest.raises(_fields.BadLine):
        codec.restamp(b'{"seq":1,"crc":5}', 9)


def test_reseal_tail_maps_records_and_drops_marks() -> None:
    """Records follow the new base with its durable mark; clean-close marks are dropped; a
    line that no longer passes is corruption, named by its offset in the old file."""
    run = Run("m1", "/t", "h")
    a = codec.encode_record(7, ChangeType.RUN_CREATED, _NOW, 500, run)
    mark = codec.encode_mark(600)
    b = codec.encode_record(8, ChangeType.RUN_UPDATED, _NOW, 500, run)
    tail, moves = compaction.reseal_tail(a + mark + b, 1000, 200, 200, "/x/runs.jsonl")
    assert list(moves) == [1000, 1000 + len(a) + len(mark)]
    first = moves[1000] - 200
    second = moves[1000 + len(a) + len(mark)] - 200
    assert first == 0 and tail.count(b"\n") == 2
    assert [codec.decode_line(line)["durable"] for line in tail.splitlines()] == [200, 200]
    assert codec.decode_line(tail[second:-1])["seq"] == 8
    with pytest.raises(CorruptStoreError, match="changed while compacting"):
        compaction.reseal_tail(b'{"seq":1}\n', 1000, 200, 200, "/x/runs.jsonl")


def test_a_temp_file_removed_under_the_claim_is_not_used(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the claim's open and its flock, a cleanup removed the temp file: the claim
    sees that the name is no longer its file and backs off (RELIABILITY: lock-file deletion)."""
    Store(store_dir).close()
    j = journal.Journal(str(store_dir), FileSystem())
    real = lock.try_flock

    def removed_first(fd: int) -> bool:
        os.unlink(store_dir / _statedir.COMPACTING_NAME)
        return real(fd)

    monkeypatch.setattr(_temps, "try_flock", removed_first)
    try:
        assert j.claim_compaction_temp() is None
        monkeypatch.setattr(_temps, "try_flock", real)
        fd = j.claim_compaction_temp()
        assert fd is not None
        j.abandon_temp(_statedir.COMPACTING_NAME, fd)
    finally:
        j.close()
    assert not (store_dir / _statedir.COMPACTING_NAME).exists()


def test_a_symlink_planted_as_the_temp_file_is_refused(
        store_dir: pathlib.Path, tmp_path: pathlib.Path, often: None) -> None:
    """A symlink at the temp file's name is never followed: the write that would compact
    raises UnsafeStoreError naming it (its own change is stored), the target is untouched."""
    Store(store_dir).close()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, store_dir / _statedir.COMPACTING_NAME)
    with Store(store_dir) as s, pytest.raises(UnsafeStoreError, match="symbolic link") as info:
        for i in range(30):
            cycle(s, f"m{i % 3}")
    assert _statedir.COMPACTING_NAME in str(info.value)
    assert victim.read_text() == "precious"
    os.unlink(store_dir / _statedir.COMPACTING_NAME)
    with Store(store_dir) as s:
        assert len(s.list()) >= 5


def test_an_io_error_while_compacting_fails_no_write(
        store_dir: pathlib.Path, often: None, caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC while syncing the compacted copy: the write that found compaction due returns
    (its change is stored), the failure is logged naming the file, no temp file is left, and
    compaction is tried again a few hundred lines later."""
    Store(store_dir).close()
    fs = FailingFS("fsync", 1, errno.ENOSPC)  # not durable: compaction makes the only fsyncs
    with (caplog.at_level(logging.WARNING, logger="runstore"),
          Store(store_dir, durable=False, _fs=fs) as s):
        ids = [cycle(s, f"m{i % 3}") for i in range(120)]
        assert fs.failed == 1
        assert [r.id for r in s.list()] == ids
    assert f"automatic compaction of {store_dir / 'runs.jsonl'} failed" in caplog.text
    assert "No space left on device" in caplog.text
    assert not (store_dir / _statedir.COMPACTING_NAME).exists()
    assert _compacted_through(store_dir) > 0  # tried again, and done
    with Store(store_dir) as fresh:
        assert [r.id for r in fresh.list()] == ids
    assert verify.check(store_dir).ok


class _ClaimMeanwhile(FileSystem):
    """Right before the compaction's temp file is renamed over the journal or removed (and,
    with the old order, after it was closed), another process tries to claim that temp
    file, as a compaction starting elsewhere at that moment would: it must find it taken.
    ``lost`` counts claims whose file was then taken from under them."""

    def __init__(self, state_dir: pathlib.Path) -> None:
        self.other = journal.Journal(str(state_dir), FileSystem())
        self.claims: list[int | None] = []
        self.lost = 0

    def _claim(self) -> int | None:
        fd = self.other.claim_compaction_temp()  # empties the file when it gets it
        self.claims.append(fd)
        return fd

    def replace(self, src: str, dst: str, dir_fd: int) -> None:
        fd = self._claim() if src == _statedir.COMPACTING_NAME else None
        super().replace(src, dst, dir_fd)
        if fd is not None:
            os.close(fd)

    def unlink(self, name: str, dir_fd: int) -> None:
        fd = self._claim() if name == _statedir.COMPACTING_NAME else None
        super().unlink(name, dir_fd)
        if fd is not None:
            self.lost += os.fstat(fd).st_nlink == 0  # the other's claim was removed
            os.close(fd)


def test_a_compaction_starting_elsewhere_cannot_empty_the_copy_being_installed(
        store_dir: pathlib.Path, often: None) -> None:
    """Regression (the SIGKILL loop found it in CI: a store opened to an empty journal): the
    temp file was closed, so its flock released, before the rename; a compaction starting in
    another process in between claimed it and emptied it, and the rename put an empty
    journal in place. It is now closed after the rename."""
    Store(store_dir).close()
    fs = _ClaimMeanwhile(store_dir)
    with Store(store_dir, durable=False, _fs=fs) as s:
        ids = [cycle(s, f"m{i % 3}") for i in range(60)]
    assert fs.claims and all(fd is None for fd in fs.claims)
    assert _compacted_through(store_dir) > 0
    with Store(store_dir) as fresh:
        assert [r.id for r in fresh.list()] == ids
    assert verify.check(store_dir).ok


def test_a_compaction_given_up_cannot_remove_a_copy_another_one_claimed(
        store_dir: pathlib.Path, often: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction that gives up (the file was replaced meanwhile) removes its temp file
    while it still holds it, then closes it: a compaction starting elsewhere cannot have
    claimed that name in between (it would have lost its copy, or a third one's would have
    been renamed over the journal half written)."""
    Store(store_dir).close()
    other = Store(store_dir)
    copies = _hook_write_temp(monkeypatch, other.compact)
    fs = _ClaimMeanwhile(store_dir)
    try:
        with Store(store_dir, _fs=fs) as s:
            ids = [cycle(s, f"m{i % 3}") for i in range(30)]
            assert len(copies) >= 2
    finally:
        other.close()
    assert fs.claims and all(fd is None for fd in fs.claims)
    assert fs.lost == 0
    with Store(store_dir) as fresh:
        assert [r.id for r in fresh.list()] == ids
