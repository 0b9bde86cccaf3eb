"""Opening a compacted store from its header's summary: the base is checksummed, not parsed;
its non-terminal runs are read at once and every other run is indexed when first needed.
Whatever the path, a reopened store must answer exactly as the store that wrote it."""

from __future__ import annotations

import pathlib

import attrs
import orjson
import pytest
from faults import mixed

from runstore import ChangeType, CorruptStoreError, Run, Status, Store, _codec as codec


def _snapshot(s: Store) -> tuple[list[Run], list[Run], int, int]:
    return s.list(), s.active(), s.stats().runs, s.last_seq()


def _reopen(path: pathlib.Path) -> Store:
    return Store(path, durable=False)


def test_a_compacted_store_opens_from_its_summary_and_answers_the_same(
        store_dir: pathlib.Path) -> None:
    with Store(store_dir, durable=False) as s:
        mixed(s)
        s.compact()
        before = _snapshot(s)
        old_terminal = next(r for r in before[0] if r.is_terminal)
    with _reopen(store_dir) as s:
        assert s._view.lazy, "the summary path was not taken"
        assert s.active() == before[1]  # no indexing needed for the active runs
        assert s._view.lazy
        assert s.get(old_terminal.id) == old_terminal  # indexes the base
        assert not s._view.lazy
        assert _snapshot(s) == before


def test_changes_after_the_base_keep_order_and_counts(store_dir: pathlib.Path) -> None:
    with Store(store_dir, durable=False) as s:
        mixed(s, 20)
        s.compact()
    with _reopen(store_dir) as writer, _reopen(store_dir) as reader:
        assert reader._view.lazy
        first_active = writer.active()[0]
        writer.finish(first_active.id, Status.TIMEOUT)  # a base run changes after the base
        new, _ = writer.prepare_atomic("new-machine", "hn", lambda: Run("new-machine", "/t", "hn"))
        expected = writer.list()
        assert reader.active() == writer.active()  # caught up without indexing the base
        assert reader._view.lazy
        assert reader.stats().runs == len(expected) == 21
        assert reader.list() == expected
        assert reader.list()[-1].id == new.id  # new runs come after every base run
        assert reader.get(first_active.id).status is Status.TIMEOUT


def test_a_run_pruned_after_the_base_is_gone_once_the_base_is_indexed(
        store_dir: pathlib.Path) -> None:
    with Store(store_dir, durable=False) as s:
        mixed(s, 10)
        s.compact()
        victim = next(r for r in s.list() if r.is_terminal)
    with _reopen(store_dir) as writer, _reopen(store_dir) as reader:
        reader.last_seq()  # opened lazily, base not indexed
        assert reader._view.lazy
        # a tombstone without the compaction prune() does next (as after a crash between)
        writer._transact(lambda: (None, [(ChangeType.RUN_PRUNED, victim)]))
        assert reader.stats().runs == 9
        assert victim.id not in {r.id for r in reader.list()}


def test_ids_with_escapes_are_indexed_through_the_json_parser(store_dir: pathlib.Path) -> None:
    odd = ['quote"id', "back\\slash", "tab\tid", "ünïcode-id"]
    with Store(store_dir, durable=False) as s:
        s.import_runs([Run("m", "/t", "h", id=i, status=Status.COMPLETED) for i in odd])
        s.compact()
    with _reopen(store_dir) as s:
        assert s._view.lazy
        assert s.get('quote"id').id == 'quote"id'
        assert [r.id for r in s.list()] == odd


def test_unknown_fields_of_base_runs_survive_export(store_dir: pathlib.Path) -> None:
    with Store(store_dir, durable=False) as s:
        s.import_runs([{"id": "r1", "machine": "m", "test_dir": "/t", "test_dir_hash": "h",
                        "status": "completed", "team": "infra"}])
        s.compact()
    with _reopen(store_dir) as s:
        assert s._view.lazy
        out = pathlib.Path(store_dir.parent / "export.json")
        with out.open("wb") as fp:
            s.export(fp)
        assert orjson.loads(out.read_bytes())[0]["team"] == "infra"


def _lines(path: pathlib.Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _rewrite_header(journal: pathlib.Path, change: dict[str, object], drop: tuple[str, ...] = ()
                    ) -> None:
    """Change header fields keeping the header's length (every offset in the file stays
    valid): a field the reader ignores pads it."""
    lines = _lines(journal)
    header = codec.decode_line(lines[0][:-1])
    for key in drop:
        header.pop(key)
    header.update(change)
    header["store_id"] = "x"  # shorter than the real one: room for the padding
    pad, target = 0, len(lines[0])
    for attempt in range(20):  # the crc's digit count may move with the padding: settle it
        header["pad"] = "p" * pad
        new = codec.reseal(header)
        if len(new) == target:
            break
        pad = max(0, pad + target - len(new))
        header["attempt"] = attempt  # another crc, when its digits keep the lengths apart
    assert len(new) == len(lines[0])
    journal.write_bytes(new + b"".join(lines[1:]))


def _flip_bit(journal: pathlib.Path, line: int, at: int = 30) -> int:
    """Flip one bit ``at`` bytes into ``line`` (0 is the header); return the line's offset."""
    offset = sum(map(len, _lines(journal)[:line]))
    data = bytearray(journal.read_bytes())
    data[offset + at] ^= 0x01
    journal.write_bytes(bytes(data))
    return offset


def test_damage_in_a_finished_run_of_the_base_is_refused_when_the_base_is_read(
        store_dir: pathlib.Path) -> None:
    """Opening reads only the non-terminal runs; the first query that reads the base checks
    its CRC-32 and names the damaged line; a compaction never rewrites past it."""
    with Store(store_dir, durable=False) as s:
        mixed(s, 10)
        s.compact()
        assert s.list()[3].is_terminal  # line 4 of the base
    journal = store_dir / "runs.jsonl"
    offset = _flip_bit(journal, 4)
    before = journal.read_bytes()
    with _reopen(store_dir) as s:
        assert len(s.active()) == 4  # no need to read the damaged line
        for query in (s.list, s.compact, s.stats):
            with pytest.raises(CorruptStoreError) as err:
                query()
            assert err.value.offset == offset
            assert "checksum mismatch" in str(err.value)
    assert journal.read_bytes() == before  # untouched


def test_damage_in_a_non_terminal_run_of_the_base_is_refused_at_open(
        store_dir: pathlib.Path) -> None:
    with Store(store_dir, durable=False) as s:
        mixed(s, 10)
        s.compact()
        assert s.list()[1].status is Status.PENDING  # line 2 of the base
    journal = store_dir / "runs.jsonl"
    offset = _flip_bit(journal, 2)
    with pytest.raises(CorruptStoreError) as err:
        _reopen(store_dir)
    assert err.value.offset == offset


def test_reordered_base_lines_fail_the_base_checksum(store_dir: pathlib.Path) -> None:
    """Every line still passes its own checksum; the base's CRC-32 catches the swap."""
    with Store(store_dir, durable=False) as s:
        mixed(s, 10)
        s.compact()
    journal = store_dir / "runs.jsonl"
    lines = _lines(journal)
    # two adjacent terminal lines: only their own offsets move (the non-terminal runs the
    # header points at stay where they were), whatever their lengths
    finished = {i for i in range(1, 11)
                if orjson.loads(lines[i])["status"] in ("completed", "failed")}
    a = min(i for i in finished if i + 1 in finished)
    lines[a], lines[a + 1] = lines[a + 1], lines[a]
    journal.write_bytes(b"".join(lines))
    with _reopen(store_dir) as s, pytest.raises(CorruptStoreError, match="does not match"):
        s.list()


@pytest.mark.parametrize("summary", [None, {"base_lines": "many"}, {"active": [1, "x"]}],
                         ids=["absent", "bad-count", "bad-offsets"])
def test_a_header_without_a_usable_summary_is_read_line_by_line(
        store_dir: pathlib.Path, summary: dict[str, object] | None) -> None:
    with Store(store_dir, durable=False) as s:
        mixed(s, 15)
        s.compact()
        before = _snapshot(s)
    _rewrite_header(store_dir / "runs.jsonl", summary or {},
                    drop=("base_lines", "base_crc", "max_id", "active"))
    with _reopen(store_dir) as s:
        assert not s._view.lazy
        assert _snapshot(s) == before


def test_a_summary_that_disagrees_with_the_bytes_falls_back_to_parsing(
        store_dir: pathlib.Path) -> None:
    """A summary naming a finished run as active is not trusted: the base is parsed."""
    with Store(store_dir, durable=False) as s:
        mixed(s, 10)
        s.compact()
        before = _snapshot(s)
    journal = store_dir / "runs.jsonl"
    assert orjson.loads(_lines(journal)[1])["status"] == "completed"
    _rewrite_header(journal, {"active": [0]})  # the first base line is a finished run
    with _reopen(store_dir) as s:
        assert not s._view.lazy
        assert _snapshot(s) == before


def test_writes_after_a_lazy_open_compact_correctly(store_dir: pathlib.Path) -> None:
    """Compacting a store opened lazily indexes the base first and keeps every run."""
    with Store(store_dir, durable=False) as s:
        mixed(s, 30)
        s.compact()
    with _reopen(store_dir) as s:
        for run in s.active():
            s.finish(run.id, Status.INTERRUPTED)
        expected = s.list()
    with _reopen(store_dir) as s:
        assert s._view.lazy
        s.compact()
        assert s.list() == expected
    with _reopen(store_dir) as s:
        assert s._view.lazy and s.list() == expected
        assert all(r.is_terminal for r in s.list())
        assert attrs.asdict(s.stats())["runs"] == 30


def test_reopening_finds_the_retained_history_where_compaction_put_it(
        store_dir: pathlib.Path) -> None:
    """The offsets of the retained changes, as the compacting process knows them, are what a
    process opening the compacted file finds (they serve ``changes()`` after a reopen)."""
    with Store(store_dir, durable=False) as s:
        mixed(s, 30)
        s.compact()
        written = list(s._view.recent)
        with _reopen(store_dir) as again:
            assert list(again._view.recent) == written
            assert [c.seq for c in again.changes(0)] == [c.seq for c in s.changes(0)]
