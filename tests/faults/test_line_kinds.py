"""A journal line's kind (record or mark) is its first key, which no run data can forge, and
every field a run carries is stored and read back exactly or refused before anything is
written: kept fields (those ``import_runs`` keeps without knowing them) named like the
format's own fields, integers beyond 64 bits, non-finite floats, lone surrogates, NUL
characters, absurd nesting, and records larger than ``MAX_RECORD_BYTES``.

The broken variants put back what each detection replaced (a kind told by a key anywhere in
the line, no size limit) and show the run is then lost or the store unopenable.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import runstore
import runstore._scan
from runstore import (
    MAX_RECORD_BYTES,
    ChangeType,
    CorruptStoreError,
    InvalidRunError,
    Run,
    RunNotFoundError,
    RunStore,
    Status,
    Store,
    _codec as codec,
    _compaction as compaction,
    _fields,
    _scan,
)
from runstore._statedir import DATA_NAME
from runstore.verify import check

#: the names a kept field may not have
RESERVED = sorted(_fields.RESERVED_KEYS)


def _key_based(line: bytes, data: dict[str, Any], legacy: bool = False) -> bool:
    """The kind decision before format version 2: a line with a ``mark`` key anywhere at
    its top level is a mark."""
    return "mark" in data


def _record(run_id: str, /, **extra: Any) -> dict[str, Any]:
    """A finished run to import, with ``extra`` kept fields."""
    return {"id": run_id, "machine": "m9", "test_dir": "/t", "test_dir_hash": "h",
            "status": "completed", "exit_code": 0, "revision": 1, **extra}


def _exported(store: RunStore) -> dict[str, dict[str, Any]]:
    """Every run as ``export`` writes it, by id."""
    out = io.BytesIO()
    store.export(out)
    return {item["id"]: item for item in orjson.loads(out.getvalue())}


def _journal(state_dir: pathlib.Path | str) -> bytes:
    return (pathlib.Path(state_dir) / DATA_NAME).read_bytes()


def _store_with_a_mark_field(state_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store holding, after an ordinary run, a run whose record line carries a top-level
    ``mark`` key (its refusal switched off to write it); returns its id."""
    with Store(state_dir) as store:
        store.create(Run("m1", "/t", "h"))
        with monkeypatch.context() as patch:
            patch.setattr(_fields, "extra_problem", lambda extra: None)
            store.import_runs([_record("r-marked", mark="clean_close", note=1)])
    assert b'"mark":"clean_close"' in _journal(state_dir).splitlines()[2]
    return "r-marked"


# -- the kind of a line ------------------------------------------------------------------


def test_a_record_with_a_mark_key_is_a_record_in_every_reader(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Open, catch-up, changes, check, compaction and export all read it as the run;
    check reports the field, which a write or an import refuses."""
    run_id = _store_with_a_mark_field(store_dir, monkeypatch)
    report = check(store_dir)
    assert report.records == 2 and report.last_seq == 2
    assert [p.line for p in report.problems] == [3]
    assert "field 'mark'" in report.problems[0].message and "import" in report.problems[0].message
    with Store(store_dir) as store, Store(store_dir) as other:
        assert store.get(run_id).status is Status.COMPLETED  # open
        assert [c.run.id for c in store.changes()][1] == run_id  # the change feed
        assert store.last_seq() == 2
        created = other.create(Run("m3", "/t", "h"))  # its seq is not handed out again
        assert store.get(created.id).machine == "m3"  # catch-up
        assert store.last_seq() == 3
        assert _exported(store)[run_id]["mark"] == "clean_close"
        store.compact()
        assert other.get(run_id).revision == 1  # reloaded after the compaction
    with Store(store_dir) as store:
        assert _exported(store)[run_id]["note"] == 1
        assert len(store.list()) == 3
    after = check(store_dir).problems  # its latest version and its retained change
    assert after and all("field 'mark'" in p.message for p in after)


def test_broken_variant_a_kind_told_by_any_key_loses_the_run(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the key-based decision back, the run is gone after a reopen, its seq is handed
    out again, and check sees nothing wrong: what the first-key decision prevents."""
    run_id = _store_with_a_mark_field(store_dir, monkeypatch)
    monkeypatch.setattr(codec, "is_mark", _key_based)
    with Store(store_dir) as store:
        with pytest.raises(RunNotFoundError):
            store.get(run_id)
        assert store.last_seq() == 1
        store.create(Run("m2", "/t", "h"))  # takes seq 2, the lost run's
    seqs = [orjson.loads(line).get("seq") for line in _journal(store_dir).splitlines()[1:]]
    assert seqs.count(2) == 2
    assert check(store_dir).ok


def test_a_line_beginning_with_another_key_is_refused_untouched(
        store_dir: pathlib.Path) -> None:
    """A sound line whose first key is neither ``seq`` nor ``mark`` was not written by
    runstore: opening raises CorruptStoreError and leaves the file as it was."""
    with Store(store_dir) as store:
        store.create(Run("m1", "/t", "h"))
    lines = _journal(store_dir).splitlines(keepends=True)
    data = codec.decode_line(lines[1][:-1])
    reordered = {"id": data.pop("id"), **data}  # the same record, another first key
    path = store_dir / DATA_NAME
    path.write_bytes(b"".join([lines[0], codec.reseal(reordered), *lines[2:]]))
    before = path.read_bytes()
    with pytest.raises(CorruptStoreError, match="neither a record nor a mark line"):
        Store(store_dir)
    assert path.read_bytes() == before
    assert not check(store_dir).ok


def _version_1_store(state_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A journal as runstore wrote it before format version 2: a run imported with a
    ``mark`` field read back as a mark line, and its seq handed out again to the next run
    a later process created. Returns the lost run's id."""
    with monkeypatch.context() as patch:
        patch.setattr(codec, "FORMAT_VERSION", 1)
        patch.setattr(_fields, "extra_problem", lambda extra: None)
        with Store(state_dir) as store:
            store.create(Run("m1", "/t", "h"))
            store.import_runs([_record("r-lost", mark="x")])
        with Store(state_dir) as store:
            store.create(Run("m2", "/t", "h"))
    assert orjson.loads(_journal(state_dir).splitlines()[0])["version"] == 1
    return "r-lost"


def test_a_version_1_journal_opens_as_version_1_read_it(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its lines are read as before (the lost run stays lost, the seq it shares is no
    error); check reports the lost run; a compaction writes version 2."""
    run_id = _version_1_store(store_dir, monkeypatch)
    report = check(store_dir)
    assert [p.line for p in report.problems] == [3]
    assert run_id in report.problems[0].message and "mark" in report.problems[0].message
    with Store(store_dir) as store:
        assert [r.machine for r in store.list()] == ["m1", "m2"]
        assert store.last_seq() == 2
        with pytest.raises(RunNotFoundError):
            store.get(run_id)
        store.compact()
        store.create(Run("m3", "/t", "h"))
    assert orjson.loads(_journal(store_dir).splitlines()[0])["version"] == 2
    assert check(store_dir).ok
    with Store(store_dir) as store:
        assert store.last_seq() == 3


def test_a_version_1_lost_run_can_be_imported_back(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check's remedy works: the line without its meta fields and ``mark`` imports."""
    run_id = _version_1_store(store_dir, monkeypatch)
    problem = check(store_dir).problems[0]
    line = orjson.loads(_journal(store_dir).splitlines()[problem.line - 1])
    for name in ("seq", "change", "time", "durable", "crc", "mark"):
        del line[name]
    with Store(store_dir) as store:
        assert store.import_runs([line]) == 1
        assert store.get(run_id).status is Status.COMPLETED


# -- kept fields --------------------------------------------------------------------------


@pytest.mark.parametrize("name", RESERVED)
def test_each_reserved_name_is_refused_as_a_kept_field(
        store_dir: pathlib.Path, name: str) -> None:
    """``import_runs`` refuses a kept field named like the format's own, naming it, and
    writes nothing (it was dropped silently, or lost the run, before)."""
    with Store(store_dir) as store:
        store.create(Run("m1", "/t", "h"))
        before = _journal(store_dir)
        with pytest.raises(InvalidRunError, match=f"field '{name}'.*reserved"):
            store.import_runs([_record("r1", **{name: 5})])
        assert _journal(store_dir) == before
        with pytest.raises(RunNotFoundError):
            store.get("r1")


@pytest.mark.parametrize("name", RESERVED)
def test_a_reserved_name_inside_a_kept_field_round_trips(
        store_dir: pathlib.Path, name: str) -> None:
    """Only the top level is the format's: nested, the names are data like any other."""
    extra = {"info": {name: 1, "list": [{name: "x"}]}}
    with Store(store_dir) as store:
        store.import_runs([_record("r1", **extra)])
    with Store(store_dir) as store:
        assert _exported(store)["r1"]["info"] == extra["info"]
    assert check(store_dir).ok


@pytest.mark.parametrize(("value", "problem"), [
    (1 << 64, "does not fit in 64 bits"),
    (-(1 << 63) - 1, "does not fit in 64 bits"),
    (math.inf, "not a finite number"),
    (math.nan, "not a finite number"),
    ("a\ud800b", "lone surrogate"),
    ("a\x00b", "NUL"),
    ((1, 2), "tuple is not a JSON value"),
    ({1: "x"}, "not a string"),
    ({"k\udfff": 1}, "lone surrogate"),
    ([[[[1]]]], None),  # within the depth limit
])
def test_kept_values_that_cannot_round_trip_are_refused(
        store_dir: pathlib.Path, value: Any, problem: str | None) -> None:
    """Each is refused naming the field, nothing written; a value that can, round-trips."""
    with Store(store_dir) as store:
        before = _journal(store_dir)
        if problem is None:
            store.import_runs([_record("r1", deep={"x": value})])
            assert _exported(store)["r1"]["deep"] == {"x": value}
            return
        with pytest.raises(InvalidRunError, match=f"field 'deep'.*{problem}"):
            store.import_runs([_record("r1", deep={"x": value})])
        assert _journal(store_dir) == before


def test_nesting_deeper_than_the_limit_is_refused(store_dir: pathlib.Path) -> None:
    """MAX_FIELD_DEPTH levels of lists are kept; one more is refused naming the field."""
    def nested(levels: int) -> Any:
        value: Any = 1
        for _ in range(levels):
            value = [value]
        return value

    with Store(store_dir) as store:
        store.import_runs([_record("r1", deep=nested(_fields.MAX_FIELD_DEPTH))])
        with pytest.raises(InvalidRunError, match=r"field 'deep'.*nested deeper"):
            store.import_runs([_record("r2", deep=nested(_fields.MAX_FIELD_DEPTH + 1))])
    with Store(store_dir) as store:
        assert _exported(store)["r1"]["deep"] == nested(_fields.MAX_FIELD_DEPTH)


def test_a_long_integer_in_an_import_file_is_refused_not_rounded(
        store_dir: pathlib.Path) -> None:
    """orjson reads an integer beyond 64 bits as a float; an import file holding one is
    refused naming the field instead of storing a rounded number."""
    text = json.dumps([_record("r1", big=1 << 64, fits=(1 << 64) - 1)])
    with Store(store_dir) as store:
        with pytest.raises(InvalidRunError, match=r"field 'big'.*64 bits"):
            store.import_runs(io.StringIO(text))
        store.import_runs(io.StringIO(text.replace(str(1 << 64), "7")))
        assert _exported(store)["r1"]["fits"] == (1 << 64) - 1


_SPECIAL = st.sampled_from(["\ud800", "\udfff", "\x00", "é", "\n", '"', "\\"])
_TEXT = st.text(alphabet=st.characters() | _SPECIAL, max_size=8)


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(_TEXT | st.sampled_from(RESERVED),
                                                         inner, max_size=3)


#: any JSON value, and what is not quite one (integers beyond 64 bits, NaN, surrogates)
_JSON = st.recursive(
    st.none() | st.booleans() | _TEXT
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True),
    _nested, max_leaves=12)
_EXTRAS = st.dictionaries(
    (_TEXT | st.sampled_from(RESERVED)).filter(lambda k: k not in _fields.RUN_FIELDS),
    _JSON, max_size=4)


def _storable(value: Any, depth: int = 0) -> bool:
    """What a journal line and PostgreSQL's jsonb both hold exactly (the test's oracle)."""
    if isinstance(value, str):
        return "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return -(1 << 63) <= value < 1 << 64
    if isinstance(value, float):
        return math.isfinite(value)
    if depth > _fields.MAX_FIELD_DEPTH:
        return False
    if isinstance(value, list):
        return all(_storable(v, depth + 1) for v in value)
    return all(_storable(k) and _storable(v, depth + 1) for k, v in value.items())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=_EXTRAS)
def test_kept_fields_round_trip_exactly_or_are_refused(extra: dict[str, Any]) -> None:
    """Import -> reopen (another process's view too) -> export, and again after a
    compaction, gives the same fields; or InvalidRunError names a field and the store is
    unchanged."""
    state_dir = tempfile.mkdtemp()
    try:
        with Store(state_dir) as store:
            store.create(Run("m1", "/t", "h"))
            before = _journal(state_dir)
            try:
                store.import_runs([_record("r1", **extra)])
            except InvalidRunError as exc:
                assert not _storable(extra) or _fields.RESERVED_KEYS & extra.keys(), exc
                assert any(f"field {key!r}" in str(exc) for key in extra), exc
                assert _journal(state_dir) == before
                return
            assert not _fields.RESERVED_KEYS & extra.keys() and _storable(extra)
        with Store(state_dir) as store, Store(state_dir) as other:
            got = _exported(store)["r1"]
            assert {k: got[k] for k in extra} == extra
            store.compact()
            got = _exported(other)["r1"]  # catches up with the compaction
            assert {k: got[k] for k in extra} == extra
        assert check(state_dir).ok
    finally:
        shutil.rmtree(state_dir)


# -- the record size limit ----------------------------------------------------------------


def _padded(run_id: str, size: int) -> dict[str, Any]:
    """A record to import whose size as stored is exactly ``size`` bytes."""
    bare = _fields.run_from_dict(_record(run_id))
    base = len(_fields.record_fields(bare, {"pad": ""})) + len(_fields.json_string(run_id))
    return _record(run_id, pad="x" * (size - base))


def test_max_record_bytes_is_exported_and_one_mebibyte() -> None:
    """The limit is public, documented, and well under a torn tail's limit."""
    assert runstore.MAX_RECORD_BYTES == 1 << 20
    assert "MAX_RECORD_BYTES" in runstore.__all__ and "MAX_RECORD_BYTES" in runstore.__doc__
    assert MAX_RECORD_BYTES + 4096 < _scan.TORN_TAIL_LIMIT


@pytest.mark.contract
def test_a_record_at_the_limit_is_stored_one_byte_more_is_refused(
        open_store: Callable[..., RunStore]) -> None:
    """Both backends, one check: exactly MAX_RECORD_BYTES imports, one more is refused
    naming the run and its size, and nothing is imported."""
    store = open_store()
    assert store.import_runs([_padded("r-max", MAX_RECORD_BYTES)]) == 1
    with pytest.raises(InvalidRunError, match=f"'r-over'.*{MAX_RECORD_BYTES + 1} bytes"):
        store.import_runs([_record("r-ok"), _padded("r-over", MAX_RECORD_BYTES + 1)])
    assert [r.id for r in store.list()] == ["r-max"]
    assert len(_exported(open_store())["r-max"]["pad"]) > MAX_RECORD_BYTES - 200


@pytest.mark.contract
def test_writes_that_would_exceed_the_limit_are_refused_unchanged(
        open_store: Callable[..., RunStore]) -> None:
    """create, prepare_atomic, update and finish refuse a record over the limit, naming the
    run's machine and size; the stored run is unchanged and the store reopens."""
    store = open_store()
    huge = "x" * MAX_RECORD_BYTES
    with pytest.raises(InvalidRunError, match=r"machine 'm1'\) is \d+ bytes"):
        store.create(Run("m1", huge, "h"))
    with pytest.raises(InvalidRunError, match="largest field is 'test_dir'"):
        store.prepare_atomic("m1", "h", lambda: Run("m1", huge, "h"))
    run, _ = store.prepare_atomic("m1", "h", lambda: Run("m1", "/t", "h"))
    store.start(run.id)
    with pytest.raises(InvalidRunError, match="largest field is 'error_msg'"):
        store.finish(run.id, Status.FAILED, error_msg=huge)
    with pytest.raises(InvalidRunError, match=str(run.id)):
        store.update(attrs.evolve(store.get(run.id), error_msg=huge))
    assert store.get(run.id).status is Status.RUNNING
    assert [r.id for r in open_store().list()] == [run.id]


def _tear_last_record(state_dir: pathlib.Path) -> None:
    """Cut the last record line short of its last bytes, as a crash during its write
    leaves it: the whole rest of the line is then a torn tail."""
    path = state_dir / DATA_NAME
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 20)


def test_a_torn_record_at_the_limit_is_recovered(store_dir: pathlib.Path) -> None:
    """The largest record a store holds, torn, is a torn tail: reopening drops it."""
    store = Store(store_dir, durable=False)  # never closed: no clean-close mark, a crash
    store.create(Run("m1", "/t", "h"))
    store.import_runs([_padded("r-max", MAX_RECORD_BYTES)])
    _tear_last_record(store_dir)
    with Store(store_dir) as store:
        assert [r.machine for r in store.list()] == ["m1"]


def test_broken_variant_without_the_limit_a_torn_record_makes_the_store_unopenable(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scaled down (a torn tail of at most 2 MiB), with the size check taken away: a 3 MiB
    record is stored, and once torn the store no longer opens. With the check it is
    refused."""
    monkeypatch.setattr(_scan, "TORN_TAIL_LIMIT", 2 << 20)
    record = _padded("r-big", 3 << 20)
    store = Store(store_dir, durable=False)  # never closed: no clean-close mark, a crash
    store.create(Run("m1", "/t", "h"))
    with pytest.raises(InvalidRunError):
        store.import_runs([record])
    monkeypatch.setattr(_fields, "checked_fields",
                        lambda run, extra=None, fields=None:
                        _fields.record_fields(run, extra) if fields is None else fields)
    store.import_runs([record])
    _tear_last_record(store_dir)
    with pytest.raises(CorruptStoreError, match="too much to be a torn write"):
        Store(store_dir)


def test_the_limit_leaves_earlier_large_records_readable(store_dir: pathlib.Path) -> None:
    """A store holding a record over the limit (written before it existed) still opens,
    compacts and exports it: the limit is checked on writes only."""
    record = _padded("r-big", MAX_RECORD_BYTES + 10)
    with Store(store_dir) as store, pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fields, "MAX_RECORD_BYTES", 1 << 30)
        store.import_runs([record])
    with Store(store_dir) as store:
        store.compact()
        assert _exported(store)["r-big"]["pad"] == record["pad"]
    assert os.path.getsize(store_dir / DATA_NAME) > MAX_RECORD_BYTES


def test_a_run_field_that_cannot_be_written_is_refused_naming_it(
        store_dir: pathlib.Path) -> None:
    """A lone surrogate in a run's own field is InvalidRunError naming the field, not an
    encoder error from inside the write; nothing is written."""
    with Store(store_dir) as store:
        before = _journal(store_dir)
        with pytest.raises(InvalidRunError, match="test_dir must not contain lone surrogates"):
            store.create(Run("m1", "/t\ud800", "h"))
        with pytest.raises(InvalidRunError, match=r"record 1: .*error_msg must not contain lone"):
            store.import_runs([Run("m1", "/t", "h", id="r1", status=Status.FAILED,
                                   error_msg="\udfff")])
        assert _journal(store_dir) == before
        assert store.list() == []


def test_a_compaction_beside_the_lock_drops_a_version_1_shadowed_line() -> None:
    """Lines another process appended during a compaction are copied as the view read them:
    from a version 1 journal, a record line carrying a ``mark`` key is dropped like a mark
    (the view never had it, and its seq was handed out again); from a version 2 one it is a
    record and is kept."""
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    shadowed = codec.encode_record(5, ChangeType.RUN_CREATED, now, 0,
                                   Run("m1", "/t", "h", id="r-lost"), {"mark": "x"})
    plain = codec.encode_record(5, ChangeType.RUN_CREATED, now, 0,
                                Run("m2", "/t", "h", id="r-kept"))
    lines = shadowed + plain + codec.encode_mark(0)
    tail, moves = compaction.reseal_tail(lines, 1000, 500, 500, "runs.jsonl", legacy=True)
    assert list(moves) == [1000 + len(shadowed)] and b"r-kept" in tail
    assert b"r-lost" not in tail
    tail, moves = compaction.reseal_tail(lines, 1000, 500, 500, "runs.jsonl")
    assert list(moves) == [1000, 1000 + len(shadowed)] and b"r-lost" in tail


@pytest.mark.contract
def test_kept_fields_at_the_edges_round_trip_on_every_backend(
        open_store: Callable[..., RunStore]) -> None:
    """Both backends keep the same fields exactly (reserved names nested, the widest
    integers, tiny and huge floats, any text), and refuse a NUL the same way before
    writing anything (PostgreSQL's jsonb would fail on it)."""
    extra = {"": "empty name", "nested": {"mark": {"seq": [1, {"crc": None}]}},
             "widest": [-(1 << 63), (1 << 64) - 1],
             "floats": [5e-324, 1e20, 1.7976931348623157e308, 0.1, -2.5],
             "text": "é\n\"\\\u2028\U0001f600", "flag": False}
    store = open_store()
    store.import_runs([_record("r1", **extra)])
    with pytest.raises(InvalidRunError, match=r"field 'bad'.*NUL"):
        store.import_runs([_record("r2", bad=["a\x00"])])
    got = _exported(open_store())["r1"]
    assert {k: got[k] for k in extra} == extra
    assert [r.id for r in store.list()] == ["r1"]


# -- no single append too long to be cut as a torn write -----------------------------------


def test_no_append_can_be_longer_than_a_torn_tail_may_be() -> None:
    """The bounds that keep every torn append cuttable: a run, and an import written in one
    append, are far below the length past which a damaged tail is taken for corruption."""
    import runstore._journal
    import runstore.store

    limit = runstore._scan.TORN_TAIL_LIMIT
    assert limit > runstore.MAX_RECORD_BYTES * 4
    assert limit > runstore._limits.SMALL_IMPORT_BYTES + 2 * runstore.MAX_RECORD_BYTES


def _big_runs(count: int, size: int) -> list[Run]:
    return [Run(f"m{i}", "/t", "h", id=f"20260101T000000.000000Z-{i:016x}",
                status=Status.COMPLETED, error_msg="x" * size) for i in range(count)]


def _appended_in_one_write(store_dir: pathlib.Path, runs: list[Run]) -> bool:
    """Whether importing ``runs`` appended to the journal (same file) rather than staging
    them in a temp file renamed over it (a new file)."""
    with Store(store_dir) as store:
        before = os.stat(store_dir / DATA_NAME).st_ino
        assert store.import_runs(runs) == len(runs)
        after = os.stat(store_dir / DATA_NAME).st_ino
        assert [r.id for r in store.list()] == [r.id for r in runs]
    return before == after


def test_an_import_larger_than_one_append_may_be_is_staged(store_dir: pathlib.Path) -> None:
    """24 runs of about 900 KB (about 21 MB in all, under the record count for one append)
    are staged and renamed in, never written as one append a crash could tear past what
    recovery may cut; 4 such runs are one append."""
    assert _appended_in_one_write(store_dir / "small", _big_runs(4, 900_000))
    assert not _appended_in_one_write(store_dir / "large", _big_runs(24, 900_000))


def test_broken_variant_without_the_byte_bound_a_large_import_is_one_append(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: counting records alone, the same 21 MB import is one append."""
    import runstore.store

    monkeypatch.setattr(runstore._limits, "SMALL_IMPORT_BYTES", 1 << 40)
    assert _appended_in_one_write(store_dir, _big_runs(24, 900_000))
