"""Prune without an id index: a store opened from its base's summary prunes from the
offsets of its runs' latest versions (``View.latest_offsets``), never indexing their ids,
and must choose, keep and archive exactly what the indexed view does, with the base's
checksum checked the same way."""

from __future__ import annotations

import pathlib

import pytest
from faults import mixed

from runstore import ChangeType, CorruptStoreError, Run, Status, Store


def _with_tail(store_dir: pathlib.Path) -> None:
    """A compacted base of 30 runs, then after it: a base run finished, a base run pruned
    (its tombstone alone), a new run, and a new run pruned."""
    with Store(store_dir, durable=False) as s:
        mixed(s, 30)
        s.compact()
        runs = s.list()
    with Store(store_dir, durable=False) as s:
        pending = next(r for r in runs if not r.is_terminal)
        s.finish(pending.id, Status.TIMEOUT)
        victim = next(r for r in runs if r.is_terminal)
        s._transact(lambda: (None, [(ChangeType.RUN_PRUNED, victim)]))
        for name in ("late", "later"):
            run, _ = s.prepare_atomic(name, "h", lambda n=name: Run(n, "/t", "h"))
            s.start(run.id)
            s.finish(run.id, Status.COMPLETED)
        last = s.list()[-1]
        s._transact(lambda: (None, [(ChangeType.RUN_PRUNED, last)]))


def test_offsets_of_a_lazy_view_are_the_indexed_views(store_dir: pathlib.Path) -> None:
    _with_tail(store_dir)
    with Store(store_dir, durable=False) as s:
        s.last_seq()
        assert s._view.lazy and s._view.index  # opened from the summary, a tail after it
        offsets = s._view.latest_offsets(s._journal)
        assert s._view.lazy, "the ids were indexed"
        s._ensure_index()
        assert list(offsets) == list(s._view.index.values())


def _machines(s: Store) -> tuple[list[str], list[str], int]:
    return [r.machine for r in s.list()], [r.machine for r in s.active()], s.stats().runs


@pytest.mark.parametrize("keep", [0, 5, 15])
def test_prune_of_a_lazy_store_keeps_what_an_indexed_one_keeps(
        tmp_path: pathlib.Path, keep: int) -> None:
    results = []
    for lazy in (True, False):
        where = tmp_path / f"{lazy}"
        _with_tail(where)
        with Store(where, durable=False) as s:
            if not lazy:
                s._ensure_index()
            archive = tmp_path / f"{lazy}.jsonl"
            count = s.prune(keep_last=keep, archive=archive)
            after = _machines(s)
            changes = [(c.type, c.run.machine) for c in s.changes(0)][-count:]
        with Store(where, durable=False) as s:  # what the file says agrees with the view
            assert _machines(s) == after
        results.append((count, after, changes, archive.read_bytes().count(b"\n")))
    assert results[0] == results[1]
    count, (kept, active, runs), changes, archived = results[0]
    assert count == archived > 0
    assert set(active) <= set(kept) and runs == len(kept)
    assert len([r for r in kept if r not in active]) == keep
    assert {c for c, _ in changes} == {ChangeType.RUN_PRUNED}


def _damage_a_finished_base_line(store_dir: pathlib.Path) -> bytes:
    with Store(store_dir, durable=False) as s:
        mixed(s, 10)
        s.compact()
        assert s.list()[3].is_terminal  # line 4 of the base
    journal = store_dir / "runs.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    offset = sum(map(len, lines[:4]))
    data = bytearray(journal.read_bytes())
    data[offset + 30] ^= 0x01
    journal.write_bytes(bytes(data))
    return bytes(data)


def test_prune_refuses_a_damaged_base_and_leaves_it(store_dir: pathlib.Path) -> None:
    """The damaged line is one prune keeps, copied without being parsed: only the base's
    checksum finds it."""
    before = _damage_a_finished_base_line(store_dir)
    with Store(store_dir, durable=False) as s, pytest.raises(CorruptStoreError,
                                                             match="checksum mismatch"):
        s.prune(keep_last=5)
    assert (store_dir / "runs.jsonl").read_bytes() == before


def test_prune_refuses_a_damaged_base_broken_variant(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the base's checksum check the damaged line is rewritten into a new file,
    under a checksum that now vouches for it."""
    before = _damage_a_finished_base_line(store_dir)
    monkeypatch.setattr("runstore._view.refuse_damaged_base", lambda header, j: None)
    with Store(store_dir, durable=False) as s:
        assert s.prune(keep_last=5) == 1
    assert (store_dir / "runs.jsonl").read_bytes() != before
