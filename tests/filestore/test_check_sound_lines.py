"""``check`` takes a record line in the form this library writes without decoding it
(``_sound.SOUND_RECORD``); every other line is decoded and judged as before. Whatever a line
holds, the report must be the one the line-by-line decoding gives: each case below is a line
with a valid CRC-32 that only the decoding, or the seq and durable rules, can refuse."""

from __future__ import annotations

import datetime as _dt
import io
import pathlib
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings, strategies as st

import runstore
from runstore import Run, Status, Store, _codec as codec, _fields, _sound, cli, verify
from runstore._scan import scan


def _store(store_dir: pathlib.Path) -> pathlib.Path:
    with Store(store_dir, durable=False) as s:
        for i in range(6):
            run, _ = s.prepare_atomic(f"m{i}", "h", lambda i=i: Run(f"m{i}", "/t", "h"))
            s.start(run.id)
            s.finish(run.id, Status.COMPLETED, exit_code=0)
    return store_dir / "runs.jsonl"


def _edit(journal: pathlib.Path, line: int, change: Callable[[dict[str, Any]], bytes]) -> int:
    """Replace line ``line`` (0: the header) by ``change`` of its record (bytes, sealed);
    return how many bytes the line grew by."""
    lines = journal.read_bytes().splitlines(keepends=True)
    data = orjson.loads(lines[line])
    del data["crc"]
    old, lines[line] = lines[line], change(data)
    journal.write_bytes(b"".join(lines))
    return len(lines[line]) - len(old)


def _sealed(data: dict[str, Any]) -> bytes:
    return codec._seal(data)


def _with(**fields: Any) -> Callable[[dict[str, Any]], bytes]:
    return lambda data: _sealed({**data, **fields})


def _raw(old: bytes, new: bytes) -> Callable[[dict[str, Any]], bytes]:
    """A sealed line whose encoded bytes have ``old`` replaced by ``new``."""
    def change(data: dict[str, Any]) -> bytes:
        head = orjson.dumps(data)[:-1]
        assert old in head
        return codec._sealed(head.replace(old, new, 1))
    return change


_CASES: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "impossible date": _with(started_at="2026-02-30T00:00:00Z"),
    "year zero": _with(started_at="0000-01-01T00:00:00Z"),
    "hour 24": _with(ended_at="2026-01-01T24:00:00Z"),
    "minute 60": _with(started_at="2026-01-01T23:60:00.000001Z"),
    "leap second": _with(ended_at="2026-12-31T23:59:60Z"),
    "non-canonical time": _with(ended_at="2026-01-01 00:00:00"),
    "exit code a string": _with(exit_code="0"),
    "exit code a bool": _with(exit_code=True),
    "exit code past 64 bits": _raw(b'"exit_code":null',
                                   b'"exit_code":99999999999999999999'),
    "unknown status": _with(status="exploded"),
    "unknown change": _with(change="run_exploded"),
    "seq out of order": _with(seq=99),
    "durable past the line": _with(durable=1 << 40),
    "empty id": _with(id=""),
    "non-ASCII machine": _with(machine="m" + "\u00e9" * 6),
    "escaped machine": _with(machine='m"' + "q" * 10),
    "unknown field": _with(team="infra"),
    "leading zero": _raw(b'"revision":', b'"revision":0'),
    "invalid UTF-8": _raw(b'"machine":"m', b'"machine":"\xff'),
    "duplicate key": _raw(b'"machine":', b'"machine":"x","machine":'),
    "missing machine": lambda data: _sealed({k: v for k, v in data.items()
                                             if k != "machine"}),
}


#: the cases that are sound records (taken through the decoding all the same). Each grows its
#: line by more than a new checksum can shrink it (10 digits to 1): a shorter file than
#: ``runs.lock`` recorded at the clean close is reported as cut, whatever the line holds.
_SOUND = {"unknown field", "non-ASCII machine", "escaped machine", "duplicate key"}


def _decoding_only(chunk: bytes, chunk_at: int, cur: Any, *_: Any) -> tuple[int, Any]:
    return 0, scan(chunk, chunk_at, cur)


@pytest.mark.parametrize("case", list(_CASES))
def test_check_reports_what_decoding_reports(store_dir: pathlib.Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             case: str) -> None:
    journal = _store(store_dir)
    grown = _edit(journal, 4, _CASES[case])
    assert case not in _SOUND or grown >= 0
    report = runstore.check(store_dir)
    monkeypatch.setattr(verify, "_scan_sound", _decoding_only)
    decoded = runstore.check(store_dir)
    assert report == decoded
    assert report.ok == (case in _SOUND), report


def test_sound_lines_are_read_without_decoding(store_dir: pathlib.Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    journal = _store(store_dir)
    records = [line for line in journal.read_bytes().splitlines()[1:]
               if line.startswith(codec.RECORD_START)]
    assert all(_sound.SOUND_RECORD.fullmatch(line) for line in records)
    calls = []
    decode = codec.decode_line

    def counted(line: bytes) -> dict[str, Any]:
        if line.startswith(codec.RECORD_START):
            calls.append(line)
        return decode(line)

    monkeypatch.setattr(codec, "decode_line", counted)
    report = runstore.check(store_dir)
    assert report.ok and report.records == len(records) and not calls


def test_check_reports_what_decoding_reports_broken_variant(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Taking the timestamps' shape for a date lets an impossible date through."""
    journal = _store(store_dir)
    _edit(journal, 4, _CASES["impossible date"])
    monkeypatch.setattr(_sound, "sound_dates", lambda values: True)
    assert runstore.check(store_dir).ok


_TIMESTAMP = st.builds(
    lambda year, month, day, hour, minute, second, micro: (
        b"%04d-%02d-%02dT%02d:%02d:%02d%sZ" % (year, month, day, hour, minute, second,
                                              b".%06d" % micro if micro else b"")),
    st.sampled_from([0, 1, 1900, 2000, 2024, 2026, 2100, 9999]) | st.integers(0, 9999),
    st.integers(0, 99), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99),
    st.integers(0, 99), st.integers(0, 999999))


def _is_date(value: bytes) -> bool:
    try:
        _dt.datetime.fromisoformat(value.decode())
    except ValueError:
        return False
    return True


@settings(max_examples=2000, deadline=None)
@given(st.lists(_TIMESTAMP | st.none(), max_size=3))
def test_sound_dates_judges_as_fromisoformat(values: list[bytes | None]) -> None:
    """Every canonical timestamp (any digits) is a date for ``sound_dates`` exactly when
    ``datetime.fromisoformat`` takes it."""
    for value in values:
        assert value is None or _fields.CANONICAL_TIME.fullmatch(value.decode())
    assert _sound.sound_dates(tuple(values)) == all(v is None or _is_date(v) for v in values)


def test_check_reports_an_impossible_time_broken_variant(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Judging a timestamp's day alone lets an hour of 24 through ``check``."""
    def days_only(values: tuple[bytes | None, ...]) -> bool:
        return all(v is None or _is_date(v[:10] + b"T00:00:00Z") for v in values)

    journal = _store(store_dir)
    _edit(journal, 4, _CASES["hour 24"])
    assert not runstore.check(store_dir).ok
    monkeypatch.setattr(_sound, "sound_dates", days_only)
    assert runstore.check(store_dir).ok


# -- export: the run made from a sound line's bytes ------------------------------------------

def _odd_store(store_dir: pathlib.Path) -> None:
    """A compacted base of runs in every form: escapes, non-ASCII, kept fields, empty and
    filled optional fields, nulls, negative and large exit codes, a run still running."""
    runs: list[Run | dict[str, Any]] = [
        Run("m", "/t", "h", id="plain", status=Status.COMPLETED, exit_code=0,
            started_at=_dt.datetime(2026, 1, 1, tzinfo=_dt.UTC),
            ended_at=_dt.datetime(2026, 1, 1, 0, 0, 1, 5, tzinfo=_dt.UTC)),
        Run("m", "/t", "h", id='quote"d', status=Status.FAILED, exit_code=-1),
        Run("mé", "/t", "h", id="non-ascii", status=Status.TIMEOUT, batch_id="b"),
        Run("m", "/t\tx", "h", id="tab", status=Status.INTERRUPTED, exit_code=1 << 62),
        Run("m", "/t", "h", id="plan", status=Status.COMPLETED, plan_entry="e",
            owner_host="host", owner_pid=0, owner_start="s",
            heartbeat_at=_dt.datetime(2026, 2, 1, tzinfo=_dt.UTC)),
        {"id": "kept", "machine": "m", "test_dir": "/t", "test_dir_hash": "h",
         "status": "completed", "team": "infra"},
        Run("n", "/t", "h", id="pending"),
        Run("r", "/t", "h", id="running", status=Status.RUNNING,
            started_at=_dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)),
        Run("m\x7f", "/t", "h\x7f", id="del\x7f", status=Status.COMPLETED, exit_code=3,
            started_at=_dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)),
    ]
    with Store(store_dir, durable=False) as s:
        s.import_runs(runs)  # type: ignore[arg-type]
        s.compact()


def _export(store_dir: pathlib.Path) -> bytes:
    out = io.BytesIO()
    with Store(store_dir, durable=False) as s:
        s.export(out)
    return out.getvalue()


def test_export_of_sound_lines_is_the_decoded_export(store_dir: pathlib.Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _odd_store(store_dir)
    made = _export(store_dir)
    monkeypatch.setattr(_sound, "sound_export", lambda line: None)
    assert made == _export(store_dir)
    assert len(orjson.loads(made)) == 9


def _impossible_date_line(store_dir: pathlib.Path) -> bytes:
    """The base line of run "plain", started on 30 February, with a valid checksum."""
    _odd_store(store_dir)
    lines = (store_dir / "runs.jsonl").read_bytes().splitlines()
    record = orjson.loads(next(line for line in lines if b'"id":"plain"' in line))
    del record["crc"]
    record["started_at"] = "2026-02-30T00:00:00Z"
    return codec._seal(record)[:-1]


def test_an_impossible_date_is_left_to_the_decoding(store_dir: pathlib.Path) -> None:
    """``sound_export`` declines the line; the decoding then refuses it, naming the field."""
    line = _impossible_date_line(store_dir)
    assert _sound.SOUND_RECORD.fullmatch(line) is not None  # it has a timestamp's shape
    assert _sound.sound_export(line) is None
    with pytest.raises(codec.BadLine, match="started_at"):
        _fields.run_from_dict(codec.decode_line(line))


def test_an_impossible_date_is_left_to_the_decoding_broken_variant(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Taking the timestamps' shape for a date exports the impossible date."""
    line = _impossible_date_line(store_dir)
    monkeypatch.setattr(_sound, "sound_dates", lambda values: True)
    found = _sound.sound_export(line)
    assert found is not None and b"2026-02-30" in found[1]


@pytest.mark.parametrize("mode", ["--json", "--jsonl", "--table", "--color"])
def test_list_of_sound_lines_is_the_decoded_one(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], mode: str) -> None:
    """``list`` prints the same whether it reads the base's sound lines from their bytes
    (``sound_export``, ``sound_row``) or decodes every line; a DEL in a field is escaped."""
    _odd_store(store_dir)
    argv = ["--state-dir", str(store_dir), "list", *([mode] if mode.startswith("--j") else [])]
    if mode == "--color":
        argv[:0] = ["--color", "always"]
    assert cli.main(argv) == 0
    made = capsys.readouterr().out
    monkeypatch.setattr(_sound, "sound_export", lambda line: None)
    monkeypatch.setattr(_sound, "sound_row", lambda line: None)
    assert cli.main(argv) == 0
    assert made == capsys.readouterr().out
    assert "m\u00e9" in made and "kept" in made and "team" not in made
    assert "\x7f" not in made
    if mode in ("--table", "--color"):
        assert "m\\x7f" in made and "del\\x7f" in made
        assert ("\x1b[" in made) == (mode == "--color")


def test_list_of_sound_lines_is_the_decoded_one_broken_variant(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Reading a string's quotes with its characters shows them in the table."""
    _odd_store(store_dir)
    argv = ["--state-dir", str(store_dir), "list"]
    assert cli.main(argv) == 0
    made = capsys.readouterr().out
    real = _sound.sound_row

    def quoted(line: bytes) -> tuple[str, _sound.SoundRow] | None:
        found = real(line)
        if found is None:
            return None
        row = found[1]
        return found[0], (row[0], f'"{row[1]}"', *row[2:])

    monkeypatch.setattr(_sound, "sound_row", quoted)
    assert cli.main(argv) == 0
    assert made != capsys.readouterr().out


def test_prune_archive_of_sound_lines_is_the_decoded_one(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archives = []
    for decoded in (False, True):
        if decoded:
            monkeypatch.setattr(_sound, "sound_export", lambda line: None)
        where = tmp_path / f"store-{decoded}"
        _odd_store(where)
        with Store(where, durable=False) as s:
            assert s.prune(keep_last=0, archive=tmp_path / f"{decoded}.jsonl") == 7
            tail = [(c.type, c.run) for c in s.changes(0)][-6:]
        archives.append(((tmp_path / f"{decoded}.jsonl").read_bytes(), tail))
    assert archives[0] == archives[1]
    assert b"team" in archives[0][0]  # the kept field, from the decoded record
