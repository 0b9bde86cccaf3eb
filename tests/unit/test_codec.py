"""The on-disk format: record lines, their checksum and sequence, the header, and what a real
store writes (RFC 3339 UTC timestamps with Z, null pointers, omitted empty fields)."""

from __future__ import annotations

import datetime as _dt
import pathlib
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import given, strategies as st
from strategies import runs, utc_datetimes

from runstore import Run, Status, Store, _codec as codec, _fields
from runstore.model import ChangeType

NOW = _dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=_dt.UTC)


def _record(run: Run, seq: int = 1, durable: int = 0, **extra: Any) -> bytes:
    return codec.encode_record(seq, ChangeType.RUN_CREATED, NOW, durable, run, extra or None)


def _lines(path: pathlib.Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# -- runs as JSON -----------------------------------------------------------------------------


@given(runs())
def test_run_round_trips_through_json(run: Run) -> None:
    """run -> JSON object -> run gives the same run, field for field."""
    assert _fields.run_from_dict(_fields.run_to_json(run)) == run


@given(runs())
def test_record_line_round_trips(run: Run) -> None:
    """A sealed record line decodes, passes check_record and structures back to the run."""
    line = _record(run, seq=7, durable=3)
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    data = codec.decode_line(line[:-1])
    codec.check_record(data)
    assert data["seq"] == 7 and data["durable"] == 3 and data["change"] == "run_created"
    assert _fields.run_from_dict(data) == run


_EXTRA = st.dictionaries(st.text(min_size=1).filter(lambda k: k not in _fields._KNOWN_KEYS),
                         st.integers(-(2**63), 2**63 - 1) | st.text(), max_size=3)


@given(runs(), _EXTRA, st.integers(1, 2**40), st.integers(0, 2**40))
def test_record_line_is_one_object_in_field_order(run: Run, extra: dict[str, Any], seq: int,
                                                   durable: int) -> None:
    """A line is the meta fields, the run's fields in the record's order (empty optional ones
    left out), the unknown fields, then the crc: the same bytes whether its run fields were
    made beforehand (``record_fields``) or with the line."""
    line = codec.encode_record(seq, ChangeType.RUN_UPDATED, NOW, durable, run, extra)
    early = codec.encode_record(seq, ChangeType.RUN_UPDATED, NOW, durable, run,
                                fields=_fields.record_fields(run, extra))
    assert early == line
    expected: dict[str, Any] = {"seq": seq, "id": run.id, "status": run.status.value,
                                "change": "run_updated", "time": "2026-01-02T03:04:05.678901Z",
                                "durable": durable}
    expected.update(_fields.run_to_json(run))
    expected.update(extra)
    data = orjson.loads(line)
    crc = data.pop("crc")
    assert list(data.items()) == list(expected.items())
    assert crc == zlib.crc32(line[:line.rindex(b',"crc":')])


def test_timestamps_are_rfc3339_utc_with_z() -> None:
    """Timestamps are written as RFC 3339 UTC strings ending in Z."""
    run = Run("m1", "/t", "h", id="r1", started_at=NOW, ended_at=NOW, heartbeat_at=NOW)
    data = _fields.run_to_json(run)
    for name in ("started_at", "ended_at", "heartbeat_at"):
        assert data[name] == "2026-01-02T03:04:05.678901Z"


def test_unset_pointers_are_null() -> None:
    """Unset exit_code, started_at and ended_at are written as null, not left out."""
    data = _fields.run_to_json(Run("m1", "/t", "h", id="r1"))
    assert data["exit_code"] is None
    assert data["started_at"] is None
    assert data["ended_at"] is None


def test_empty_batch_id_and_plan_entry_are_omitted() -> None:
    """batch_id and plan_entry are left out when empty and written when set."""
    assert not {"batch_id", "plan_entry"} & set(_fields.run_to_json(Run("m1", "/t", "h")))
    data = _fields.run_to_json(Run("m1", "/t", "h", batch_id="b1", plan_entry="p/1"))
    assert (data["batch_id"], data["plan_entry"]) == ("b1", "p/1")


def test_status_is_written_as_its_string() -> None:
    """The status is the plain lower-case string."""
    assert _fields.run_to_json(Run("m1", "/t", "h", status=Status.TIMEOUT))["status"] == "timeout"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", "bogus"),
        ("exit_code", "1"),
        ("exit_code", 1.5),
        ("started_at", "yesterday"),
        ("started_at", "2026-01-01T00:00:00"),
        ("started_at", 1700000000),
        ("machine", 5),
        ("revision", "1"),
    ],
)
def test_malformed_fields_are_refused(field: str, value: Any) -> None:
    """A record with a wrongly typed field is a BadLine naming the field."""
    data = _fields.run_to_json(Run("m1", "/t", "h", id="r1"))
    data[field] = value
    with pytest.raises(_fields.BadLine, match=field):
        _fields.run_from_dict(data)


def test_missing_required_field_is_refused() -> None:
    """A record without machine is a BadLine."""
    data = _fields.run_to_json(Run("m1", "/t", "h", id="r1"))
    del data["machine"]
    with pytest.raises(_fields.BadLine):
        _fields.run_from_dict(data)


# -- the checksum ---------------------------------------------------------------------------


def test_crc_is_crc32_of_the_bytes_before_it() -> None:
    """The crc field is the CRC-32 of the line's bytes before ',"crc":'."""
    line = _record(Run("m1", "/t", "h", id="r1"))[:-1]
    head, _, tail = line.rpartition(b',"crc":')
    assert int(tail[:-1]) == zlib.crc32(head)


@given(runs(), st.data())
def test_any_single_byte_change_is_detected(run: Run, data: st.DataObject) -> None:
    """Changing any one byte of a record line makes it a BadLine (torn, flipped, garbage)."""
    line = bytearray(_record(run)[:-1])
    pos = data.draw(st.integers(min_value=0, max_value=len(line) - 1), label="pos")
    new = data.draw(st.integers(min_value=0, max_value=255).filter(lambda b: b != line[pos]))
    line[pos] = new
    with pytest.raises(_fields.BadLine):
        codec.decode_line(bytes(line))


@given(runs(), st.data())
def test_any_truncation_is_detected(run: Run, data: st.DataObject) -> None:
    """Every proper prefix of a record line is a BadLine."""
    line = _record(run)[:-1]
    cut = data.draw(st.integers(min_value=0, max_value=len(line) - 1), label="cut")
    with pytest.raises(_fields.BadLine):
        codec.decode_line(line[:cut])


@pytest.mark.parametrize(
    "line", [b"", b"\x00" * 40, b"{}", b"not json at all", b'{"a":1,"crc":x}', b"[1,2,3]"])
def test_lines_not_written_by_runstore_are_refused(line: bytes) -> None:
    """Empty, zero-filled or foreign lines are BadLines."""
    with pytest.raises(_fields.BadLine):
        codec.decode_line(line)


# -- record meta fields ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("seq", 0), ("seq", -1), ("seq", "1"), ("seq", True), ("durable", -1), ("durable", None),
     ("id", ""), ("id", 3), ("status", "bogus"), ("change", "run_exploded")],
)
def test_check_record_refuses_bad_meta_fields(key: str, value: Any) -> None:
    """check_record refuses a bad seq, durable mark, id, status or change type."""
    data = codec.decode_line(_record(Run("m1", "/t", "h", id="r1"))[:-1])
    data[key] = value
    with pytest.raises(_fields.BadLine):
        codec.check_record(data)


def test_unknown_fields_are_kept_on_reencoding() -> None:
    """Fields runstore does not know come back from extra_fields and survive a rewrite."""
    line = _record(Run("m1", "/t", "h", id="r1"), x_future={"k": [1, 2]}, x_flag=True)
    data = codec.decode_line(line[:-1])
    assert _fields.extra_fields(data) == {"x_future": {"k": [1, 2]}, "x_flag": True}
    again = codec.decode_line(codec.reseal(data)[:-1])
    assert again == data


@given(utc_datetimes)
def test_change_time_is_utc_with_z(moment: _dt.datetime) -> None:
    """The change time of a record is RFC 3339 UTC with Z."""
    line = codec.encode_record(1, ChangeType.HEARTBEAT, moment, 0, Run("m", "/t", "h", id="r"))
    text = codec.decode_line(line[:-1])["time"]
    assert text.endswith("Z")
    assert _dt.datetime.fromisoformat(text) == moment


# -- the file a store writes ----------------------------------------------------------------


@pytest.fixture
def written(store_dir: pathlib.Path) -> list[dict[str, Any]]:
    """The decoded lines of a store after a create, a prepare, a start and a finish."""
    with Store(store_dir) as s:
        a = s.create(Run("m1", "/tests/a", "h-a", batch_id="b1", plan_entry="p/1"))
        b, _ = s.prepare_atomic("m2", "h-b", lambda: Run("m2", "/tests/b", "h-b"))
        s.start(b.id)
        s.finish(b.id, Status.FAILED, exit_code=3, error_code="E", error_msg="boom")
        assert a.id < b.id
    return _lines(store_dir / "runs.jsonl")


def test_file_starts_with_a_versioned_header(written: list[dict[str, Any]]) -> None:
    """The first line names the format and its version (and carries a crc)."""
    header = written[0]
    assert header["format"] == codec.FORMAT_NAME == "runstore-journal"
    assert header["version"] == codec.FORMAT_VERSION == 2
    assert "crc" in header and "seq" not in header


def test_every_line_carries_a_valid_crc(store_dir: pathlib.Path,
                                        written: list[dict[str, Any]]) -> None:
    """Every line of the file, header included, passes the checksum check."""
    raw = (store_dir / "runs.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    for line in raw.splitlines():
        codec.decode_line(line)


def test_record_seqs_are_gap_free_from_one(written: list[dict[str, Any]]) -> None:
    """Each record line is one run version with seq 1, 2, 3, ... in file order."""
    records = [d for d in written if "seq" in d]
    assert [d["seq"] for d in records] == list(range(1, len(records) + 1)) == [1, 2, 3, 4]
    assert [d["change"] for d in records] == [
        "run_created", "run_created", "run_started", "run_finished"]
    assert [d["revision"] for d in records] == [1, 1, 2, 3]


def test_file_timestamps_are_utc_with_z(written: list[dict[str, Any]]) -> None:
    """started_at, ended_at and the change time are RFC 3339 UTC strings ending in Z."""
    finished = next(d for d in written if d.get("change") == "run_finished")
    for name in ("started_at", "ended_at", "time"):
        assert isinstance(finished[name], str) and finished[name].endswith("Z"), name
        assert _dt.datetime.fromisoformat(finished[name]).utcoffset() == _dt.timedelta(0)
    assert finished["exit_code"] == 3 and finished["error_msg"] == "boom"


def test_file_has_null_pointers_and_omits_empty_batch(written: list[dict[str, Any]]) -> None:
    """Unset pointers are null; batch_id and plan_entry appear only when set."""
    first, second = [d for d in written if d.get("change") == "run_created"]
    assert first["exit_code"] is None and first["started_at"] is None
    assert first["ended_at"] is None
    assert (first["batch_id"], first["plan_entry"]) == ("b1", "p/1")
    assert "batch_id" not in second and "plan_entry" not in second


def test_store_writes_other_offsets_as_utc(store_dir: pathlib.Path) -> None:
    """A datetime given in +02:00 is stored and returned as the same instant in UTC."""
    moment = _dt.datetime(2026, 1, 1, 14, 0, tzinfo=_dt.timezone(_dt.timedelta(hours=2)))
    with Store(store_dir) as s:
        run = s.create(Run("m1", "/t", "h", status=Status.FAILED, ended_at=moment))
        assert run.ended_at == moment and run.ended_at.utcoffset() == _dt.timedelta(0)
        assert s.get(run.id) == run
    record = next(d for d in _lines(store_dir / "runs.jsonl") if "seq" in d)
    assert record["ended_at"] == "2026-01-01T12:00:00Z"
