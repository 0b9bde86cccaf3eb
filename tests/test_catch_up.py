"""Catching up with other processes' writes: a non-terminal run they wrote is structured only
when this process first reads it, and a malformed one is refused then, naming the run."""

from __future__ import annotations

import pathlib

import pytest

from runstore import CorruptStoreError, Run, Status, Store, codec


def _append_record(journal: pathlib.Path, **fields: object) -> None:
    """Append a record another writer made: the last record, changed, with the next seq."""
    lines = journal.read_bytes().splitlines()
    last = next(codec.decode_line(line) for line in reversed(lines) if b'"seq"' in line)
    last.update(seq=last["seq"] + 1, **fields)
    with journal.open("ab") as f:
        f.write(codec.reseal(last))


def test_runs_written_elsewhere_are_read_when_needed(store_dir: pathlib.Path) -> None:
    with Store(store_dir, durable=False) as me, Store(store_dir, durable=False) as other:
        me.last_seq()
        made = [other.prepare_atomic(f"m{i}", "h", lambda i=i: Run(f"m{i}", "/t", "h"))[0]
                for i in range(3)]
        other.start(made[0].id)
        other.finish(made[1].id, Status.FAILED)
        assert me.active_by_machine("m0") == other.get(made[0].id)
        assert me.active() == other.active()
        assert me.get(made[1].id).status is Status.FAILED


def test_a_malformed_run_written_elsewhere_is_refused_when_read(store_dir: pathlib.Path) -> None:
    with Store(store_dir, durable=False) as me:
        me.prepare_atomic("m1", "h", lambda: Run("m1", "/t", "h"))
        _append_record(store_dir / "runs.jsonl", id="bad-run", machine="m9",
                       status="pending", change="run_created", test_dir=5)
        assert me.last_seq() == 2  # caught up: the record is sound as a journal line
        with pytest.raises(CorruptStoreError, match="run 'bad-run' has a malformed field"):
            me.active_by_machine("m9")
        with pytest.raises(CorruptStoreError, match="bad-run"):
            me.compact()  # never rewritten into a new base unread


def test_a_history_longer_than_a_read_chunk_reopens_the_same(store_dir: pathlib.Path) -> None:
    """The file is read about a megabyte at a time: lines across chunk ends, a line longer
    than a chunk and a torn last line are all handled as in one piece."""
    with Store(store_dir, durable=False) as s:
        for i in range(2500):  # ~1.2 MB of history, never compacted
            s.create(Run(f"m{i % 7}", "/t", f"h{i}", status=Status.COMPLETED))
        big = s.create(Run("big", "/t", "h", status=Status.FAILED, error_msg="x" * (3 << 20)))
        s.create(Run("after", "/t", "h", status=Status.COMPLETED))
        expected = s.list()
    journal = store_dir / "runs.jsonl"
    assert journal.stat().st_size > 3 << 20
    with journal.open("ab") as f:
        f.write(b'{"seq":99999,"id":"torn')  # a write cut short by a crash
    with Store(store_dir, durable=False) as s:
        assert s.list() == expected
        assert s.get(big.id).error_msg == "x" * (3 << 20)
    assert not journal.read_bytes().endswith(b"torn")


def test_get_sees_a_change_made_elsewhere_then_compacted(tmp_path: pathlib.Path) -> None:
    """``get`` answers from the view without the lock only while the journal is unchanged;
    a change made and compacted by another store (a new file, the old one unlinked) is
    seen, as is a plain append."""
    with Store(tmp_path, durable=False) as a, Store(tmp_path, durable=False) as b:
        run = a.start(a.create(Run(machine="m", test_dir="/t", test_dir_hash="h")).id)
        assert b.get(run.id) == run
        beat = b.heartbeat(run.id)
        assert a.get(run.id) == beat  # appended: the file grew
        done = b.finish(run.id, Status.COMPLETED, exit_code=0)
        b.compact()
        assert a.get(run.id) == done  # replaced: a's file is unlinked
        assert a.get(run.id) == done  # and now current again
