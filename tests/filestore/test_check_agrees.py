"""``check`` says ok only of a journal every other reader takes and whose export imports:
what it judges must be what they rely on. Three families, each edited by hand with every
checksum made to match, so that only the judgement itself can find them:

- the compacted base against the summary in its header (its CRC-32, run count, unfinished
  runs, greatest id), which opening the store trusts without reading the base;
- a change's time, which the change feed (``changes``, ``watch``) parses;
- the runs a write or an import refuses (an empty machine, an integer past 64 bits, a kept
  field with a reserved name): ``export`` writes them and ``import`` of that file fails.

Each has a broken variant that takes the judgement away and finds the store ok."""

from __future__ import annotations

import datetime as _dt
import pathlib
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import pytest

import runstore
from runstore import InvalidRunError, Run, Status, Store, _codec as codec, _fields, _limits, verify
from runstore._checkreplay import Replay

_BASE = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)


def _compacted(store_dir: pathlib.Path) -> pathlib.Path:
    """Four finished runs and two unfinished ones, compacted, then a run made after."""
    with Store(store_dir, durable=False) as s:
        s.import_runs([Run(f"m{i}", "/t", f"h{i}", id=f"r{i}", started_at=_BASE,
                           status=Status.RUNNING if i in (1, 4) else Status.COMPLETED,
                           exit_code=None if i in (1, 4) else 0) for i in range(6)])
        s.compact()
        s.create(Run("late", "/t", "h"))
    return store_dir / "runs.jsonl"


def _lines(journal: pathlib.Path) -> list[bytes]:
    return journal.read_bytes().splitlines(keepends=True)


def _resealed(line: bytes, **changes: Any) -> bytes:
    data = orjson.loads(line)
    del data["crc"]
    data.update(changes)
    return codec._seal(data)


def _raw(line: bytes, old: bytes, new: bytes) -> bytes:
    """``line`` with ``old`` replaced by ``new`` (what orjson would not write), resealed."""
    head = line[:line.rindex(b',"crc":')].replace(old, new, 1)
    return head + b',"crc":%d}\n' % zlib.crc32(head)


def _line_of(lines: list[bytes], run_id: str) -> int:
    return next(i for i, line in enumerate(lines) if b'"id":"%s"' % run_id.encode() in line)


def _edit_base(journal: pathlib.Path, run_id: str, *, header: bool = False,
               **changes: Any) -> None:
    """Change run ``run_id``'s base line, resealed; with ``header``, the header made to
    match the new base (its size and CRC-32, resealed) and the lines after the base
    dropped, with what the lock file vouches for (their offsets would have moved)."""
    lines = _lines(journal)
    i = _line_of(lines, run_id)
    old, lines[i] = lines[i], _resealed(lines[i], **changes)
    if header:
        head = orjson.loads(lines[0])
        size = head["base_bytes"] + len(lines[i]) - len(old)
        body = b"".join(lines[1:])[:size + head["history_bytes"]]
        lines = [_resealed(lines[0], base_crc=zlib.crc32(body), base_bytes=size), body]
        (journal.parent / "runs.lock").write_bytes(b"")
    journal.write_bytes(b"".join(lines))


def _edit_header(journal: pathlib.Path, **changes: Any) -> None:
    lines = _lines(journal)
    lines[0] = _resealed(lines[0], **changes)
    journal.write_bytes(b"".join(lines))


def _messages(store_dir: pathlib.Path) -> str:
    return "\n".join(p.message for p in runstore.check(store_dir).problems)


# -- the compacted base against its header's summary --------------------------------------

def test_a_base_line_edited_with_its_checksum_is_found(store_dir: pathlib.Path) -> None:
    journal = _compacted(store_dir)
    _edit_base(journal, "r2", exit_code=7_000_000_000)  # longer: no later offset moves back
    assert "does not match the CRC-32 its header records" in _messages(store_dir)
    with pytest.raises(runstore.CorruptStoreError), Store(store_dir) as s:
        s.list()  # what every reader of the whole base says


def test_a_retained_change_edited_with_its_checksum_is_found(store_dir: pathlib.Path) -> None:
    journal = _compacted(store_dir)
    lines = _lines(journal)
    history = [i for i, line in enumerate(lines) if b'"run_created"' in line][-2]
    lines[history] = _resealed(lines[history], machine="elsewhere")
    journal.write_bytes(b"".join(lines))
    assert "does not match the CRC-32 its header records" in _messages(store_dir)


@pytest.mark.parametrize(("change", "expected"), [
    ({"active": []}, "runs ['r1', 'r4'] are unfinished but not listed"),
    ({"base_lines": 5}, "holds 6 runs where its header says 5"),
    ({"max_id": "r0"}, "greatest run id 'r0' sorts before run 'r5'"),
])
def test_a_forged_summary_is_found(store_dir: pathlib.Path, change: dict[str, Any],
                                   expected: str) -> None:
    """The header resealed with a summary that does not describe its base."""
    journal = _compacted(store_dir)
    _edit_header(journal, **change)
    assert expected in _messages(store_dir)


def test_a_run_made_unfinished_in_base_and_summary_alike_is_found(
        store_dir: pathlib.Path) -> None:
    """A finished run edited back to running, every checksum matched: the summary does not
    list it, so a process opening the store would take it for finished and prune it."""
    journal = _compacted(store_dir)
    _edit_base(journal, "r3", header=True, status="running")
    found = _messages(store_dir)
    assert "are unfinished but not listed" in found and "'r3'" in found


def test_an_intact_base_is_ok(store_dir: pathlib.Path) -> None:
    _compacted(store_dir)
    assert runstore.check(store_dir).ok


def test_a_forged_summary_broken_variant(store_dir: pathlib.Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the comparison with the summary, each forgery passes."""
    monkeypatch.setattr(Replay, "base_problems", lambda self, summary: [])
    journal = _compacted(store_dir)
    _edit_base(journal, "r3", header=True, status="running")
    _edit_header(journal, base_lines=5, max_id="r0")
    assert runstore.check(store_dir).ok


# -- a change's time ------------------------------------------------------------------------

def _edit_last(store_dir: pathlib.Path, change: Callable[[bytes], bytes]) -> None:
    """Change the last record line of a store never compacted (and forget what the lock
    file vouches for, so that a shorter line is not also a cut file)."""
    with Store(store_dir, durable=False) as s:
        for i in range(3):
            run = s.create(Run(f"m{i}", "/t", "h"))
            s.start(run.id)
    journal = store_dir / "runs.jsonl"
    lines = [line for line in _lines(journal) if not line.startswith(b'{"mark":')]
    lines[-1] = change(lines[-1])
    journal.write_bytes(b"".join(lines))
    (store_dir / "runs.lock").write_bytes(b"")


@pytest.mark.parametrize("time", ["X026-01-01T00:00:00Z", "2026-02-30T00:00:00Z", "", 5,
                                  "2020-01-01T00:00:00", "0001-01-01T00:00:00+01:00"])
def test_a_change_time_that_is_no_date_is_found(store_dir: pathlib.Path, time: Any) -> None:
    """Not a date, no UTC offset, or before the year 1 in UTC: check names it, the change
    feed refuses it, and reaping (which reads a run's last change time) goes on."""
    _edit_last(store_dir, lambda line: _resealed(line, time=time))
    assert "the change time" in _messages(store_dir)
    with Store(store_dir) as s:
        with pytest.raises(runstore.CorruptStoreError):
            list(s.changes())  # what the change feed says of it
        s.reap(stale_after=_dt.timedelta(days=36500), dry_run=True)


def test_a_change_time_broken_variant(store_dir: pathlib.Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Judging the records without their change time passes the line."""
    _edit_last(store_dir, lambda line: _resealed(line, time="2026-02-30T00:00:00Z"))
    real = verify._unwritten
    monkeypatch.setattr(verify, "_unwritten", lambda data: real({**data, "time": _BASE
                                                                 .isoformat()}))
    monkeypatch.setattr(verify._sound, "sound_dates", lambda values: True)
    assert runstore.check(store_dir).ok


# -- runs a write or an import refuses ------------------------------------------------------

_UNWRITTEN: dict[str, Callable[[bytes], bytes]] = {
    "empty machine": lambda line: _resealed(line, machine=""),
    "empty hash": lambda line: _resealed(line, test_dir_hash=""),
    "exit code past 64 bits": lambda line: _resealed(line, exit_code=(1 << 64) - 1),
    "revision past 64 bits": lambda line: _resealed(line, revision=1 << 63),
    "kept field named mark": lambda line: _resealed(line, mark=1),
    "kept field nested too deep": lambda line: _resealed(line, team=_nested(
        _fields.MAX_FIELD_DEPTH + 1)),
    "exit code past 64 bits, written by hand": lambda line: _raw(
        line, b'"exit_code":null', b'"exit_code":18446744073709551615'),
}


def _nested(depth: int) -> Any:
    return [] if depth == 1 else [_nested(depth - 1)]


def _imports(store_dir: pathlib.Path, tmp_path: pathlib.Path) -> bool:
    """Whether the store's export imports into a new store."""
    with Store(store_dir) as s:
        s.export(tmp_path / "export.json")
    try:
        with Store(tmp_path / "copy") as copy, open(tmp_path / "export.json", "rb") as f:
            copy.import_runs(f)
    except InvalidRunError:
        return False
    return True


@pytest.mark.parametrize("case", list(_UNWRITTEN))
def test_check_is_ok_only_when_the_export_imports(store_dir: pathlib.Path,
                                                  tmp_path: pathlib.Path, case: str) -> None:
    _edit_last(store_dir, _UNWRITTEN[case])
    report = runstore.check(store_dir)
    assert not report.ok and "import of it is refused" in report.problems[0].message
    assert not _imports(store_dir, tmp_path)


def test_an_untouched_store_checks_ok_and_imports(store_dir: pathlib.Path,
                                                 tmp_path: pathlib.Path) -> None:
    _edit_last(store_dir, lambda line: line)
    assert runstore.check(store_dir).ok and _imports(store_dir, tmp_path)


def test_runs_a_write_refuses_broken_variant(store_dir: pathlib.Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Judging the records only as a read takes them passes an empty machine."""
    _edit_last(store_dir, _UNWRITTEN["empty machine"])
    monkeypatch.setattr(verify._validate, "run", lambda run: run)
    assert runstore.check(store_dir).ok


# -- a checkpoint line against the lines before it ----------------------------------------

def _checkpointed(store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A store written with a checkpoint every 4 records, across a compaction: runs made,
    started, finished, pruned, some left running."""
    monkeypatch.setattr(_limits, "CHECKPOINT_EVERY", 4)
    with Store(store_dir, durable=False) as s:
        for i in range(6):
            run = s.create(Run(f"m{i}", "/t", "h"))
            s.start(run.id)
            if i % 2:
                s.finish(run.id, Status.COMPLETED, exit_code=0)
        s.compact()
        for i in range(6, 12):
            run = s.create(Run(f"m{i}", "/t", "h"))
            if i % 3 == 0:
                s.finish(run.id, Status.FAILED)
        s.prune(keep_last=1)
        for i in range(12, 20):
            s.start(s.create(Run(f"m{i}", "/t", "h")).id)
    return store_dir / "runs.jsonl"


def _edit_checkpoint(journal: pathlib.Path, **changes: Any) -> None:
    """The last checkpoint line, resealed with ``changes``."""
    lines = _lines(journal)
    i = max(i for i, line in enumerate(lines) if line.startswith(codec.CHECKPOINT_START))
    data = orjson.loads(lines[i])
    lines[i] = _resealed(lines[i], **{k: v(data[k]) for k, v in changes.items()})
    journal.write_bytes(b"".join(lines))
    (journal.parent / "runs.lock").write_bytes(b"")  # its length may have changed


def test_a_store_with_checkpoints_checks_ok(store_dir: pathlib.Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    journal = _checkpointed(store_dir, monkeypatch)
    assert sum(line.startswith(codec.CHECKPOINT_START) for line in _lines(journal)) >= 3
    assert runstore.check(store_dir).ok


@pytest.mark.parametrize(("change", "expected"), [
    ({"active": lambda a: a[1:]}, "are unfinished but not listed"),
    ({"active": lambda a: [*a, 1]}, "offsets 1 are listed but hold no unfinished run"),
    ({"active": lambda a: a[::-1]}, "they are listed out of order"),
    ({"active": lambda a: [*a, a[0]]}, "the unfinished runs where they are not"),
    ({"runs": lambda n: n + 1}, "runs where there are"),
    ({"lines": lambda n: n - 1}, "record lines before it where there are"),
    ({"max_id": lambda m: ""}, "new run ids could sort before existing ones"),
])
def test_a_forged_checkpoint_is_found(store_dir: pathlib.Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      change: dict[str, Callable[[Any], Any]],
                                      expected: str) -> None:
    """A checkpoint resealed to describe other lines than those before it: a process
    opening the store there would take it at its word."""
    journal = _checkpointed(store_dir, monkeypatch)
    _edit_checkpoint(journal, **change)
    found = _messages(store_dir)
    assert "a checkpoint line says" in found and expected in found


def test_a_forged_checkpoint_broken_variant(store_dir: pathlib.Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the comparison, a checkpoint that lists a run twice passes (longer: no
    later offset moves back)."""
    journal = _checkpointed(store_dir, monkeypatch)
    _edit_checkpoint(journal, active=lambda a: [*a, a[0]])
    monkeypatch.setattr(Replay, "checkpoint", lambda self, offset, point, summary: None)
    assert runstore.check(store_dir).ok
