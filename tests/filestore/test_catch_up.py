"""Catching up with other processes' writes: a non-terminal run they wrote is structured only
when this process first reads it, and a malformed one is refused then, naming the run."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
from faults import checkpoints, full_reading, view

from runstore import (
    CorruptStoreError,
    InvalidTransitionError,
    PrepareOutcome,
    Run,
    RunNotFoundError,
    Status,
    Store,
    _codec as codec,
    _fields,
    _limits,
)


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


def test_a_history_longer_than_a_read_chunk_reopens_the_same(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is read about a megabyte at a time: lines across chunk ends, a line longer
    than a chunk and a torn last line are all handled as in one piece."""
    # a run this large is refused now, but a journal written before may hold one
    monkeypatch.setattr(_fields, "MAX_RECORD_BYTES", 4 << 20)
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
        assert journal.read_bytes().endswith(b"torn")  # reads leave it
        s.create(Run("later", "/t", "h", status=Status.COMPLETED))  # a write cuts it
    assert b"torn" not in journal.read_bytes()[-4096:]


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


# -- records held past the flock ------------------------------------------------------------
# A write that depends on one run or machine takes other processes' records about other runs
# into its view only after it has released the flock (``Store._hold``); by the time the call
# returns, the view is the one a full reading gives.


@pytest.fixture
def holds(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each catch-up held what it read (the records were about other runs)."""
    seen: list[bool] = []
    hold = Store._hold

    def spy(self: Store, records: list[tuple[int, dict[str, Any]]], about: str) -> bool:
        seen.append(hold(self, records, about))
        return seen[-1]

    monkeypatch.setattr(Store, "_hold", spy)
    return seen


def _fresh_view(store_dir: pathlib.Path) -> tuple[object, ...]:
    with Store(store_dir, durable=False) as fresh:
        return view(fresh)


def _others_work(other: Store, n: int = 0) -> list[Run]:
    """Another process's writes about runs on machines o``n`` and p``n``: one created and
    started, one created and finished."""
    a = other.prepare_atomic(f"o{n}", "h", lambda: Run(f"o{n}", "/t", "h"))[0]
    b = other.prepare_atomic(f"p{n}", "h", lambda: Run(f"p{n}", "/t", "h"))[0]
    other.start(a.id)
    other.finish(b.id, Status.FAILED, exit_code=3)
    return [a, b]


def test_records_about_other_runs_are_held_and_in_the_view_on_return(
        store_dir: pathlib.Path, holds: list[bool]) -> None:
    """start, finish and prepare_atomic hold the other process's records about other runs
    and machines, and return with a view (order, non-terminal runs, change feed, counts)
    equal to a fresh reading, their own lines after the held ones."""
    with Store(store_dir, durable=False) as me, Store(store_dir, durable=False) as other:
        mine = me.prepare_atomic("m0", "h", lambda: Run("m0", "/t", "h"))[0]
        _others_work(other, 1)
        me.start(mine.id)
        _others_work(other, 2)
        me.finish(mine.id, Status.COMPLETED, exit_code=0)
        _others_work(other, 3)
        again = me.prepare_atomic("m3", "h", lambda: Run("m3", "/t", "h"))[0]
        assert len(holds) >= 3 and all(holds)  # this and the other process's catch-ups
        assert me._held == []
        assert view(me) == _fresh_view(store_dir)
        assert [r.id for r in me.list()][-1] == again.id
        assert again.id > max(r.id for r in other.list() if r.id != again.id)


def test_a_record_about_the_run_itself_is_taken_in_before_deciding(
        store_dir: pathlib.Path, holds: list[bool]) -> None:
    """When the other process's lines include one about this call's run, nothing is held:
    the decision sees it (finishing a run the other one finished is refused or a no-op)."""
    with Store(store_dir, durable=False) as me, Store(store_dir, durable=False) as other:
        mine = me.prepare_atomic("m0", "h", lambda: Run("m0", "/t", "h"))[0]
        me.start(mine.id)
        _others_work(other, 1)
        other.finish(mine.id, Status.COMPLETED, exit_code=0)
        with pytest.raises(InvalidTransitionError):
            me.finish(mine.id, Status.FAILED)
        _others_work(other, 2)
        assert me.finish(mine.id, Status.COMPLETED).exit_code == 0  # the same: a no-op
        assert holds[-2:] == [False, True]
        assert view(me) == _fresh_view(store_dir)


def test_prepare_atomic_sees_a_run_created_elsewhere_on_its_machine(
        store_dir: pathlib.Path, holds: list[bool]) -> None:
    with Store(store_dir, durable=False) as me, Store(store_dir, durable=False) as other:
        me.last_seq()
        theirs = _others_work(other)[0]
        run, outcome = me.prepare_atomic("o0", "other-hash",
                                         lambda: Run("o0", "/t", "other-hash"))
        assert (run, outcome) == (other.get(theirs.id), PrepareOutcome.BUSY)
        assert holds == [False]


def test_a_new_id_sorts_after_an_id_held_from_elsewhere(
        store_dir: pathlib.Path, holds: list[bool]) -> None:
    """An imported id that sorts after any clock-made one, held: the id made next is still
    greater (ids increase in insertion order)."""
    with Store(store_dir, durable=False) as me, Store(store_dir, durable=False) as other:
        me.last_seq()
        other.import_runs([Run("m5", "/t", "h", id="zzzz-imported", status=Status.COMPLETED)])
        run = me.prepare_atomic("m1", "h", lambda: Run("m1", "/t", "h"))[0]
        assert holds == [True]
        assert run.id > "zzzz-imported"
        assert [r.id for r in me.list()] == ["zzzz-imported", run.id]


def test_held_records_are_taken_in_when_the_call_fails(
        store_dir: pathlib.Path, holds: list[bool]) -> None:
    """A write refused after holding (an unknown run) still returns the view complete."""
    with Store(store_dir, durable=False) as me, Store(store_dir, durable=False) as other:
        me.last_seq()
        _others_work(other)
        with pytest.raises(RunNotFoundError):
            me.start("no-such-run")
        assert holds == [True]
        assert me._held == []
        assert view(me) == _fresh_view(store_dir)


def test_a_checkpoint_written_while_records_are_held_counts_them(
        store_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
        holds: list[bool]) -> None:
    """Checkpoints written by a process that holds the other's records list every run:
    opening at each of them (the file cut after it) shows what a full reading shows."""
    monkeypatch.setattr(_limits, "CHECKPOINT_EVERY", 4)
    with Store(store_dir, durable=False) as me, Store(store_dir, durable=False) as other:
        for n in range(12):
            mine = me.prepare_atomic("m0", "h", lambda: Run("m0", "/t", "h"))[0]
            theirs = _others_work(other, n)[0]
            me.start(mine.id)
            if n % 3:
                other.finish(theirs.id, Status.COMPLETED)
            me.finish(mine.id, Status.COMPLETED)
    assert holds.count(True) >= 24
    data = (store_dir / "runs.jsonl").read_bytes()
    marks = checkpoints(store_dir / "runs.jsonl")
    assert len(marks) >= 10
    for at, line in marks:
        end = at + len(line)
        cut = tmp_path / f"cut-{end}"
        cut.mkdir()
        (cut / "runs.jsonl").write_bytes(data[:end])
        with Store(cut, durable=False) as s:
            assert s._view.opened_at is not None and s._view.opened_at[0] == at
            quick = view(s)
        with full_reading():
            slow = _fresh_view(cut)
        assert quick == slow, f"the checkpoint ending at byte {end}"
