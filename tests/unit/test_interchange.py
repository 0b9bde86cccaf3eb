"""The formats both backends share: the import parser and the durable prune archive."""

from __future__ import annotations

import io
import os
import pathlib
import stat

import attrs
import orjson
import pytest
from hypothesis import given
from strategies import runs

from runstore import InvalidRunError, Run, Status, _fields
from runstore._interchange import append_archive, archive_lines, parse_import


def _record(run_id: str, **extra: object) -> dict[str, object]:
    return {**_fields.run_to_dict(Run("m1", "/t", "h", id=run_id, revision=1)), **extra}


# -- parse_import ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_bytes", [False, True])
def test_parse_import_reads_a_json_array(as_bytes: bool) -> None:
    """A JSON array document (text or bytes) gives its runs in order."""
    blob = orjson.dumps([_record("r1"), _record("r2")])
    source = io.BytesIO(blob) if as_bytes else io.StringIO(blob.decode())
    imported, extras = parse_import(source)
    assert [r.id for r in imported] == ["r1", "r2"]
    assert extras == {}


def test_parse_import_reads_json_lines_skipping_blank_ones() -> None:
    """JSON lines, blank lines ignored, give their runs in order."""
    blob = b"\n".join(orjson.dumps(_record(i)) for i in ("r1", "r2")) + b"\n\n"
    imported, _ = parse_import(io.BytesIO(b"\n" + blob))
    assert [r.id for r in imported] == ["r1", "r2"]


def test_parse_import_keeps_unknown_fields_by_id() -> None:
    """Fields a run does not know are returned per run id, to be written back unchanged."""
    _, extras = parse_import([_record("r1", ticket="T-1"), _record("r2")])
    assert extras == {"r1": {"ticket": "T-1"}}


def test_parse_import_accepts_runs_and_raises_revision_to_one() -> None:
    """Run objects are taken as they are, with a revision of at least 1."""
    imported, _ = parse_import([Run("m1", "/t", "h", id="r1", status=Status.FAILED)])
    assert imported[0].revision == 1
    assert imported[0].status is Status.FAILED


@given(runs())
def test_parse_import_round_trips_archive_lines(run: Run) -> None:
    """What archive_lines writes, parse_import reads back (revision at least 1)."""
    imported, extras = parse_import(io.BytesIO(archive_lines([run], {run.id: {"x": 1}})))
    assert imported == [attrs.evolve(run, revision=max(run.revision, 1))]
    assert extras == {run.id: {"x": 1}}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (io.StringIO("[{"), "the import is not JSON or JSON lines"),
        (io.StringIO("not json\n{}\n"), "the import is not JSON or JSON lines"),
        ([7], "record 1 is not a run object: 7"),
        ([_record("r1"), {"id": "r2"}], r"record 2 \('r2'\)"),
        ([_record("r1"), _record("r1")], "record 2: run 'r1' appears twice"),
        ([Run("m1", "/t", "h", id="")], "record 1: id must be a non-empty string"),
        ([Run("", "/t", "h", id="r1")], "record 1: machine must be a non-empty string"),
    ],
)
def test_parse_import_refuses_bad_records(source: object, message: str) -> None:
    """A bad document or record is an InvalidRunError naming it; nothing is imported."""
    with pytest.raises(InvalidRunError, match=message) as info:
        parse_import(source)  # type: ignore[arg-type]  # bad input is the point
    assert str(info.value).endswith("nothing was imported")


# -- archive --------------------------------------------------------------------------------


def test_archive_lines_merges_extras_without_overriding_fields() -> None:
    """Each run is one JSON line; its extras are added but never replace a run field."""
    run = Run("m1", "/t", "h", id="r1", revision=2)
    lines = archive_lines([run], {"r1": {"ticket": "T-1", "machine": "other"}}).splitlines()
    assert len(lines) == 1
    data = orjson.loads(lines[0])
    assert data["ticket"] == "T-1" and data["machine"] == "m1" and data["id"] == "r1"


def test_append_archive_creates_a_private_file_and_appends(tmp_path: pathlib.Path) -> None:
    """The archive is created mode 0600 and later calls append to it."""
    path = tmp_path / "archive.jsonl"
    append_archive(str(path), [Run("m1", "/t", "h", id="r1", revision=1)], {})
    append_archive(str(path), [Run("m1", "/t", "h", id="r2", revision=1)], {})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [orjson.loads(x)["id"] for x in path.read_bytes().splitlines()] == ["r1", "r2"]


def test_append_archive_follows_a_symlink(tmp_path: pathlib.Path) -> None:
    """A symlink at the archive path is followed: the file it points to is appended to,
    and the link stays a link to it."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b'{"id":"older"}\n')
    link = tmp_path / "archive.jsonl"
    os.symlink(target, link)
    append_archive(str(link), [Run("m1", "/t", "h", id="r1", revision=1)], {})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert [orjson.loads(x)["id"] for x in target.read_bytes().splitlines()] == ["older", "r1"]
