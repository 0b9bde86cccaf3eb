"""Checkpoint lines: every ``CHECKPOINT_EVERY`` records a writer puts down what its view
holds (next seq, counts, greatest id, where the non-terminal runs are), so that opening reads
from the last checkpoint instead of every line since the last compaction. The view opened at
a checkpoint must be the view a full reading gives; a power loss must still be recovered at
opening (a checkpoint from an earlier boot is taken only when the unsynced lines before it
are sound); damage before a trusted checkpoint is reported when those lines are first read."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
from collections.abc import Iterator

import orjson
import pytest
from faults import ReadLog, checkpoints, full_reading, view

from runstore import (
    Run,
    Status,
    Store,
    _codec as codec,
    _limits,
    _owner as owner,
    verify,
)
from runstore.errors import CorruptStoreError

EVERY = 10


@pytest.fixture(autouse=True)
def often(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_limits, "CHECKPOINT_EVERY", EVERY)


@contextlib.contextmanager
def rebooted() -> Iterator[None]:
    """As after a reboot: the machine's boot id is another one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner, "boot_id", lambda: "a-later-boot")
        yield


def _work(store: Store, cycles: int, *, start: int = 0) -> list[str]:
    """Dispatcher cycles on 5 machines, every fourth run left running, one run updated
    long after its creation; the ids."""
    ids = []
    for i in range(start, start + cycles):
        machine = f"m{i % 5}"
        run, _ = store.prepare_atomic(machine, "h", lambda m=machine: Run(m, "/t", "h"))
        if run.status is Status.PENDING:
            store.start(run.id)
        if i % 4:
            store.finish(run.id, Status.COMPLETED, exit_code=0)
        ids.append(run.id)
    return ids


def _checkpoints(path: pathlib.Path) -> list[tuple[int, dict[str, object]]]:
    return [(offset, orjson.loads(line)) for offset, line in checkpoints(path)]


def test_a_checkpoint_goes_down_every_so_many_records(store_dir: pathlib.Path) -> None:
    """Before the first record after every EVERY records, saying the seq that follows it,
    the runs, the non-terminal runs' offsets and this boot; the file still checks clean."""
    with Store(store_dir, durable=False) as s:
        _work(s, 40)
        last = s.last_seq()
    marks = _checkpoints(store_dir / "runs.jsonl")
    assert len(marks) == (last - 1) // EVERY
    data = (store_dir / "runs.jsonl").read_bytes()
    for offset, mark in marks:
        nxt = orjson.loads(data[data.index(b"\n", offset) + 1:].split(b"\n", 1)[0])
        assert nxt["seq"] == mark["next_seq"]
        assert mark["boot"] == owner.boot_id()
        for at in mark["active"]:  # type: ignore[union-attr]
            line = orjson.loads(data[at:data.index(b"\n", at)])
            assert line["status"] in ("pending", "running")
    assert [m["next_seq"] for _, m in marks] == sorted(m["next_seq"] for _, m in marks)
    assert verify.check(store_dir).ok


def test_opening_reads_from_the_last_checkpoint_and_sees_the_same(
        store_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A store of a few thousand lines since its last compaction opens reading a few
    checkpoints' worth of it; what it shows (runs, order, non-terminal runs, change feed,
    counts) is what reading every line shows, and so are its compaction's bytes."""
    with Store(store_dir, durable=False) as s:
        _work(s, 300)
        s.compact()
        _work(s, 700, start=300)
    size = (store_dir / "runs.jsonl").stat().st_size
    fs = ReadLog()
    with Store(store_dir, durable=False, _fs=fs) as s:
        assert fs.read < size / 5
        assert s._view.opened_at is not None
        lazy = (s.active(), [s.active_by_machine(f"m{i}") for i in range(6)], s.last_seq())
        quick = view(s)
    with full_reading(), Store(store_dir, durable=False) as s:
        assert s._view.opened_at is None
        slow = view(s)
    assert quick == slow
    assert lazy == (quick[1], quick[7], quick[2])
    copies = []
    for name, reading in (("a", contextlib.nullcontext()), ("b", full_reading())):
        copy = tmp_path / name
        shutil.copytree(store_dir, copy)
        with reading, Store(copy, durable=False) as s:
            s.compact()
        copies.append((copy / "runs.jsonl").read_bytes())
    assert copies[0] == copies[1]


def test_writes_after_opening_at_a_checkpoint_are_the_same(store_dir: pathlib.Path,
                                                           tmp_path: pathlib.Path) -> None:
    """Two copies of a store, one opened at its checkpoint and one read in full, given the
    same work (new runs, finishing runs that were running at the checkpoint): the same runs
    and the same next checkpoints."""
    with Store(store_dir, durable=False) as s:
        _work(s, 97)
    results = []
    for name, reading in (("a", contextlib.nullcontext()), ("b", full_reading())):
        copy = tmp_path / name
        shutil.copytree(store_dir, copy)
        with reading, Store(copy, durable=False) as s:
            for run in s.active():
                s.finish(run.id, Status.FAILED, exit_code=3)
            _work(s, 33, start=97)
            results.append([(r.machine, r.status, r.exit_code, r.revision) for r in s.list()])
        results.append([{k: v for k, v in m.items() if k not in ("crc",)}
                        for _, m in _checkpoints(copy / "runs.jsonl")])
    assert results[0] == results[2]
    assert len(results[1]) == len(results[3])
    assert [m["runs"] for m in results[1]] == [m["runs"] for m in results[3]]  # type: ignore[index]


def test_other_processes_check_the_checkpoints_they_read(store_dir: pathlib.Path) -> None:
    """A checkpoint another writer appended is read like any line; one that names the wrong
    next seq is refused as damage in the file (it cannot be a torn write)."""
    with Store(store_dir, durable=False) as me, Store(store_dir, durable=False) as other:
        me.last_seq()
        _work(other, 20)
        assert me.list() == other.list()
    path = store_dir / "runs.jsonl"
    offset, mark = _checkpoints(path)[-1]
    data = path.read_bytes()
    end = data.index(b"\n", offset) + 1
    wrong = codec.encode_checkpoint(codec.Checkpoint(
        durable=mark["durable"], next_seq=mark["next_seq"] + 1,  # type: ignore[arg-type,operator]
        lines=mark["lines"], runs=mark["runs"], max_id=mark["max_id"],  # type: ignore[arg-type]
        active=tuple(mark["active"]), boot="not-this-boot"))  # type: ignore[arg-type]
    path.write_bytes(data[:offset] + wrong + data[end:])
    with pytest.raises(CorruptStoreError, match="a checkpoint says the next seq"):
        Store(store_dir, durable=False)


def _tear_before_last_checkpoint(path: pathlib.Path) -> int:
    """Zeros over the record just before the last checkpoint, its newline kept (as a power
    loss may leave unsynced bytes); its offset."""
    offset, _ = _checkpoints(path)[-1]
    data = path.read_bytes()
    before = data.rindex(b"\n", 0, offset - 1) + 1
    torn = data[:before] + b"\x00" * (offset - 1 - before) + data[offset - 1:]
    path.write_bytes(torn)
    return before


def test_after_a_reboot_unsynced_lines_before_a_checkpoint_are_checked(
        store_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A non-durable store whose last checkpoint follows a torn line (a power loss): opened
    after a reboot, it is recovered exactly as a full reading recovers it (ending at the
    torn line, which the next write cuts), not opened at the checkpoint past it."""
    with Store(store_dir, durable=False) as s:
        _work(s, 30)
        lock = (store_dir / "runs.lock").read_bytes()  # as it was before close() vouched
    with (store_dir / "runs.jsonl").open("r+b") as f:  # a power loss leaves no close mark
        data = f.read()
        f.truncate(data.rindex(b'{"mark":"clean_close"'))
    (store_dir / "runs.lock").write_bytes(lock)
    cut = _tear_before_last_checkpoint(store_dir / "runs.jsonl")
    copy = tmp_path / "copy"
    shutil.copytree(store_dir, copy)
    size = (store_dir / "runs.jsonl").stat().st_size
    with rebooted(), Store(store_dir, durable=False) as s:
        assert s._view.opened_at is None
        recovered = s.list()
        assert s.stats().torn_tail_offset == cut
    assert (store_dir / "runs.jsonl").stat().st_size == size  # reads cut nothing
    with rebooted(), full_reading(), Store(copy, durable=False) as s:
        assert s.list() == recovered


def test_in_the_same_boot_a_checkpoint_is_taken_without_rereading(
        store_dir: pathlib.Path) -> None:
    """Unsynced bytes cannot have been lost while the machine has not restarted, so the
    same boot takes its checkpoint without reading the unsynced lines before it."""
    with Store(store_dir, durable=False) as s:
        _work(s, 1000)
    size = (store_dir / "runs.jsonl").stat().st_size
    fs = ReadLog()
    with Store(store_dir, durable=False, _fs=fs) as s:
        assert s._view.opened_at is not None
        assert fs.read < size / 5
    fs = ReadLog()
    with rebooted(), Store(store_dir, durable=False, _fs=fs) as s:
        assert s._view.opened_at is not None  # taken, after reading the unsynced lines
        assert fs.read > size / 2


def test_damage_before_a_trusted_checkpoint_is_reported_when_first_read(
        store_dir: pathlib.Path) -> None:
    """A damaged synced line before the checkpoint opening began at (a disk fault, not a
    crash): opening answers from the checkpoint; the first query that reads that line
    raises ``CorruptStoreError`` naming it, and the file is left as it was."""
    with Store(store_dir) as s:  # durable: every line is synced before the next
        _work(s, 40)
        s.close()
    path = store_dir / "runs.jsonl"
    offset, _ = _checkpoints(path)[-1]
    data = bytearray(path.read_bytes())
    victim = data.index(b'"test_dir":"/t"')  # the first run's creation: superseded
    assert victim < offset
    data[victim + 13] ^= 0x01
    path.write_bytes(bytes(data))
    with Store(store_dir) as s:
        assert s._view.opened_at is not None
        assert s.last_seq() > 0
        with pytest.raises(CorruptStoreError) as err:
            s.list()
    line_start = bytes(data).rindex(b"\n", 0, victim) + 1
    assert err.value.offset == line_start
    assert path.read_bytes() == bytes(data)


def test_a_torn_checkpoint_at_the_end_is_passed_over(store_dir: pathlib.Path) -> None:
    """The last checkpoint cut off by a crash: opening starts at the one before it and
    finds the torn tail as always."""
    with Store(store_dir, durable=False) as s:
        _work(s, 30)
        lock = (store_dir / "runs.lock").read_bytes()  # as a crash before close() leaves it
        s.close()
    path = store_dir / "runs.jsonl"
    offset, _ = _checkpoints(path)[-1]
    data = path.read_bytes()
    path.write_bytes(data[:offset + 30])
    (store_dir / "runs.lock").write_bytes(lock)
    with Store(store_dir, durable=False) as s:
        assert s._view.opened_at is not None
        assert len(s.list()) > 0
        assert s.stats().torn_tail_offset == offset
    assert path.stat().st_size == offset + 30  # reads cut nothing
    assert verify.check(store_dir).ok
