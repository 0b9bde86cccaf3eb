"""The file store's streamed commands against the ways they replaced: ``prune --archive`` in
memory that hardly grows with the store, ``export``, ``list --json``/``--jsonl`` and
``check`` without a ``Run`` per record (same bytes, same report), and ``list --limit N``
read from the end of the journal (same runs, a fraction of the file read). Each detection
has a broken variant that disables it and shows the failure it guards against."""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import orjson
import pytest
from backends import ROOT
from faults import history
from hypothesis import given, settings, strategies as st
from strategies import runs as any_runs

import runstore
from runstore import (
    CorruptStoreError,
    Run,
    Status,
    Store,
    _cli_context,
    _codec as codec,
    _fields,
    _interchange as interchange,
    _journal as journal,
    _runscan as runscan,
    verify,
)
from runstore._statedir import DATA_NAME
from runstore.model import ChangeType

pytestmark = pytest.mark.file_only

_BASE = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _finished(i: int, **fields: Any) -> Run:
    return Run(f"m{i % 7}", f"/srv/tests/suite-{i % 13}", f"{i % 31:020x}",
               status=Status.COMPLETED if i % 9 else Status.FAILED, exit_code=i % 2,
               started_at=_BASE + _dt.timedelta(seconds=i),
               ended_at=_BASE + _dt.timedelta(seconds=i + 5), batch_id=f"b{i // 1000}",
               logs_path=f"/srv/logs/{i}.log", id=f"20260101T000000.000000Z-{i:016x}",
               **fields)


def _import(state: pathlib.Path, n: int) -> None:
    """``n`` finished runs, imported in batches and compacted."""
    with Store(state, durable=False) as store:
        for k in range(0, n, 20000):
            store.import_runs([_finished(i) for i in range(k, min(n, k + 20000))])
        store.compact()


def _history(state: pathlib.Path) -> None:
    """A store whose view a fresh open reads from a compacted base and a long tail: base
    runs updated and pruned after it, runs created after it (one pruned, one id
    re-created after its prune), extra fields, a checkpoint, non-terminal runs."""
    with Store(state, durable=False) as store:
        store.import_runs([_finished(i) for i in range(300)])
        store.import_runs([{**_fields.run_to_json(_finished(i)), "ticket": f"T-{i}",
                            "labels": {"k": [i, None]}} for i in range(300, 320)])
        store.import_runs([Run(f"r{k}", "/t", "h", status=Status.RUNNING,
                               started_at=_BASE + _dt.timedelta(seconds=k),
                               id=f"20260101T000000.000000Z-r{k:03d}") for k in range(30)])
        store.compact()
        for k in range(0, 30, 2):  # base runs get a newer version after the base
            store.finish(f"20260101T000000.000000Z-r{k:03d}", Status.COMPLETED, exit_code=0)
        store.prune(keep_last=300)  # the oldest 20 go, after the base
        history(store, 1200, machines=11, prefix="n")  # after the base, past a checkpoint
        store.import_runs([_finished(5)])  # an id pruned after the base, created again


def _append_record(state: pathlib.Path, run_id: str | None = None, **fields: Any) -> None:
    """Append a sound line (right checksum, next seq) updating run ``run_id`` (default: the
    last one written) with ``fields`` as given: values this library would not write so."""
    path = state / DATA_NAME
    records = [codec.decode_line(line) for line in path.read_bytes().splitlines()[1:]
               if line.startswith(codec.RECORD_START)]
    run = next(r for r in reversed(records) if run_id in (None, r["id"]))
    data = {**{k: v for k, v in run.items() if k != "crc"}, "seq": records[-1]["seq"] + 1,
            "change": "run_updated", **fields}
    with open(path, "ab") as f:
        f.write(codec.reseal(data))


# -- prune --archive in bounded memory ----------------------------------------------------------

#: a child prunes the oldest half into an archive, then prints its own peak (VmHWM, KiB):
#: ``ru_maxrss`` would count the pytest process it was forked from
_PRUNE = """
import sys
from runstore import Store, cli, store
if sys.argv[1] == "hold":  # as prune did: every terminal run held through the rewrite
    doomed = store.Store._doomed
    def holding(self, *args):
        self._held_runs = [r for r in self._all_runs() if r.status.is_terminal]
        return doomed(self, *args)
    store.Store._doomed = holding
code = cli.main(sys.argv[2:])
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(peak, code)
"""
#: the most the peak may grow from the small store to the five times larger one (1 KiB a
#: run more): the id index the rewrite needs grows (some 700 bytes a run, 11 MiB), the
#: runs are never all held (as they were: some 1.5 KB a run, 23 MiB)
_PRUNE_GROWTH_KIB = 16 * 1024


def _prune_peaks(tmp_path: pathlib.Path, variant: str) -> list[int]:
    peaks = []
    for n in (4000, 20000):
        state = tmp_path / f"{variant}-{n}"
        _import(state, n)
        out = subprocess.run([sys.executable, "-c", _PRUNE, variant, "--state-dir",
                              str(state), "prune", "--keep-last", str(n // 2), "--archive",
                              str(tmp_path / f"{variant}-{n}.jsonl")],
                             env=_env(), capture_output=True, text=True, check=True)
        peak, code = out.stdout.splitlines()[-1].split()
        assert code == "0"
        peaks.append(int(peak))
        with Store(state) as store:
            assert len(store.list()) == n - n // 2
    print(f"[streaming figures] prune --archive ({variant}): 4,000 runs {peaks[0]:,} KiB, "
          f"20,000 runs {peaks[1]:,} KiB")
    return peaks


def test_prune_archive_memory_hardly_grows(tmp_path: pathlib.Path) -> None:
    """The peak of `prune --keep-last N/2 --archive` grows far less than the runs it
    prunes would take: they are archived as they are read, the rewrite gets their ids."""
    small, large = _prune_peaks(tmp_path, "stream")
    assert large - small < _PRUNE_GROWTH_KIB, (small, large)


def test_prune_archive_memory_broken_variant(tmp_path: pathlib.Path) -> None:
    """Proof the measurement can fail: holding every terminal run through the prune, as
    it was done, grows the peak past the bound."""
    small, large = _prune_peaks(tmp_path, "hold")
    assert large - small >= _PRUNE_GROWTH_KIB, (small, large)


def _malformed_early(tmp_path: pathlib.Path) -> pathlib.Path:
    """6,000 runs, the eleventh with a malformed field: more than the retained history
    holds come before it in a prune of all."""
    state = tmp_path / "s"
    _import(state, 6000)
    _append_record(state, _finished(10).id, exit_code="1")
    return state


def test_prune_refuses_a_malformed_run(tmp_path: pathlib.Path) -> None:
    """A run that cannot be read stops the prune before anything changes, as it did when
    every run was read into a list first."""
    state = _malformed_early(tmp_path)
    before = (state / DATA_NAME).read_bytes()
    with Store(state) as store, pytest.raises(CorruptStoreError, match="exit_code"):
        store.prune(keep_last=0)
    assert (state / DATA_NAME).read_bytes() == before


def test_prune_malformed_broken_variant(tmp_path: pathlib.Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof the refusal is needed: vouching for every record prunes the malformed run
    with the rest, unseen."""
    state = _malformed_early(tmp_path)
    monkeypatch.setattr(_fields, "fields_sound", lambda data: True)
    with Store(state) as store:
        assert store.prune(keep_last=0) == 6000


@pytest.mark.parametrize("keep", [0, 150, 1000, 10**6])
def test_prune_archive_writes_what_it_did(tmp_path: pathlib.Path, keep: int) -> None:
    """The archive holds each pruned run as the whole-list prune wrote it (its extra fields
    included), the store the rest; the change feed has one run_pruned change each."""
    state, archive = tmp_path / "s", tmp_path / "a.jsonl"
    _history(state)
    with Store(state) as store:
        before = store.list()
        terminal = [r for r in before if r.status.is_terminal]
        doomed = terminal[:max(len(terminal) - keep, 0)]
        extras = {r.id: store._view.extras.get(r.id, {}) for r in doomed}
        seq = store.last_seq()
        assert store.prune(keep_last=keep, archive=archive) == len(doomed)
        gone = {r.id for r in doomed}
        assert store.list() == [r for r in before if r.id not in gone]
        pruned = [c.run.id for c in store.changes(seq)]
        assert pruned == [r.id for r in doomed]
    if doomed:
        assert archive.read_bytes() == interchange.archive_lines(doomed, extras)
        if any(extras.values()):
            assert b'"ticket":"T-' in archive.read_bytes()
    else:
        assert not archive.exists()
    with Store(state) as again:
        assert again.list() == [r for r in before if r.id not in gone]
    assert verify.check(state).ok


def test_prune_older_than_streams_the_same_choice(tmp_path: pathlib.Path) -> None:
    """--older-than picks, run by run, what retention.doomed picks from the whole list."""
    state = tmp_path / "s"
    _history(state)
    with Store(state) as store:
        now = _dt.datetime.now(_dt.UTC)
        older_than = now - (_BASE + _dt.timedelta(seconds=150.5))  # not on a second
        terminal = [r for r in store.list() if r.status.is_terminal]
        want = [r.id for r in terminal if r.ended_at is not None
                and r.ended_at < now - older_than]
        assert 0 < len(want) < len(terminal)
        seq = store.last_seq()
        assert store.prune(older_than=older_than, dry_run=True) == len(want)
        assert store.prune(older_than=older_than) == len(want)
        assert [c.run.id for c in store.changes(seq)] == want


# -- export, list --json and check without a Run per record ------------------------------------

def _list_json_before(store: Store, mode: str) -> str:
    """What `list --json`/`--jsonl` printed when each record went through its Run."""
    items = [_cli_context._dumps(_fields.run_to_json(run)) for run in store.iter_runs()]
    if mode == "--json":
        return "[\n" + ",\n".join(items) + "\n]\n" if items else "[]\n"
    return "".join(item + "\n" for item in items)


def _odd_store(state: pathlib.Path) -> None:
    """A store with history, then records this library would not write so: a timestamp
    with "+00:00" and one with an explicit zero fraction (both valid), a kept field."""
    _history(state)
    _append_record(state, started_at="2026-01-01T00:00:07+00:00", ticket="X")
    _append_record(state, ended_at="2026-01-01T00:00:09.000000Z", batch_id="")


def _outputs_match(state: pathlib.Path, run_cli: Any) -> None:
    with Store(state) as store:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_fields, "_sound_values", lambda data: None)  # each through its Run
            fresh = io.BytesIO()
            interchange.write_export(fresh, store._iter_export())
            before = {mode: _list_json_before(store, mode) for mode in ("--json", "--jsonl")}
            table = run_cli("--state-dir", str(state), "list")
        streamed = io.BytesIO()
        store.export(streamed)
        assert streamed.getvalue() == fresh.getvalue()
        for mode in ("--json", "--jsonl"):
            code, out, _ = run_cli("--state-dir", str(state), "list", mode)
            assert (code, out) == (0, before[mode]), mode
        code, out, _ = run_cli("--state-dir", str(state), "list")
        assert (code, _no_ages(out)) == (0, _no_ages(table[1]))


def _no_ages(table: str) -> list[list[str]]:
    """The rows of a list table without STARTED and DURATION (they count from now)."""
    return [line.split()[:4] + line.split()[-1:] for line in table.splitlines()]


def test_export_and_list_json_are_as_through_each_run(tmp_path: pathlib.Path, run_cli: Any,
                                                      clean_cli_env: None) -> None:
    """export and list --json/--jsonl write, byte for byte, what they wrote when every
    record was made a Run and back, odd records included."""
    state = tmp_path / "s"
    _odd_store(state)
    _outputs_match(state, run_cli)


def test_export_odd_records_broken_variant(tmp_path: pathlib.Path, run_cli: Any,
                                           clean_cli_env: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof the comparison can fail: taking any timestamp string as written (not only
    the form this library writes) passes "+00:00" through where a Run writes "Z"."""
    state = tmp_path / "s"
    _odd_store(state)
    monkeypatch.setattr(_fields, "CANONICAL_TIME", _AnyText())
    with pytest.raises(AssertionError):
        _outputs_match(state, run_cli)


class _AnyText:
    def fullmatch(self, text: str) -> bool:
        return True


@settings(max_examples=200, deadline=None)
@given(run=any_runs(), extra=st.dictionaries(st.sampled_from(["ticket", "n", "tags"]),
                                             st.none() | st.integers(-5, 5) | st.text()))
def test_exported_dict_is_run_to_dict(run: Run, extra: dict[str, Any]) -> None:
    """For any run as a journal line holds it, the record's fields give what its Run
    gives (export's object and list --json's)."""
    data = codec.decode_line(codec.encode_record(1, ChangeType.RUN_UPDATED, _BASE, 0,
                                                 run, extra)[:-1])
    want = _fields.run_to_dict(run)
    for key, value in extra.items():
        want.setdefault(key, value)
    got = _fields.exported_dict(data)
    assert got is not None
    assert codec.dumps(got) == codec.dumps(want)
    bare = _fields.exported_dict(data, extras=False)
    assert bare is not None and orjson.loads(codec.dumps(bare)) == _fields.run_to_json(run)
    assert _fields.fields_sound(data)
    assert _fields.run_from_dict(data) == run


def _malformed_store(state: pathlib.Path) -> None:
    _history(state)
    _append_record(state, exit_code="1")  # a string where an integer goes


def test_check_reports_as_through_each_run(tmp_path: pathlib.Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """check's report is the one it made structuring every record: a malformed field is
    found (run_from_dict's message), the rest is the same."""
    state = tmp_path / "s"
    _malformed_store(state)
    report = verify.check(state)
    assert not report.ok and "exit_code" in report.problems[0].message
    monkeypatch.setattr(_fields, "_sound_values", lambda data: None)  # each through its Run
    assert verify.check(state) == report


def test_check_malformed_field_broken_variant(tmp_path: pathlib.Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof the check of fields matters: vouching for every decoded record misses it."""
    state = tmp_path / "s"
    _malformed_store(state)
    monkeypatch.setattr(verify, "_unwritten", lambda data: None)
    assert verify.check(state).ok


# -- list --limit from the end ------------------------------------------------------------------

_FILTERS: list[dict[str, Any]] = [{}, {"machine": "n3"}, {"status": "running"},
                                  {"machine": "m2", "status": ["completed", "failed"]},
                                  {"batch_id": "b0"}, {"machine": "nowhere"}]


def _limits_match(state: pathlib.Path, store: Store) -> None:
    """``store._runs(limit=N)`` and ``_iter_json`` are the last N of what another handle
    lists, with each filter."""
    with Store(state) as reference:
        for filters in _FILTERS:
            every = reference.list(**filters)
            for n in (1, 3, 50, 400, 5000):
                assert list(store._runs(limit=n, **filters)) == every[-n:], (filters, n)
                assert list(store._iter_json(limit=n, **filters)) == [
                    _fields.run_to_json(r) for r in every[-n:]], (filters, n)


def test_limit_is_the_last_of_the_list(tmp_path: pathlib.Path) -> None:
    """The last N runs (filtered) read from the end are the list's last N: opened from
    the compacted base (runs updated, pruned and created after it, past a checkpoint),
    with every run indexed, and right after a compaction."""
    state = tmp_path / "s"
    _history(state)
    with Store(state) as store:  # opened from the base's summary and a checkpoint
        assert store._view.lazy and store._view.opened_at is not None
        _limits_match(state, store)
        assert store._view.lazy
    with Store(state) as store:
        store.list()  # every run indexed
        assert not store._view.lazy
        _limits_match(state, store)
    with Store(state) as store:
        store.compact()
    with Store(state) as store:
        assert store._view.lazy and store._view.opened_at is None
        _limits_match(state, store)


def test_limit_broken_variant(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof the comparison can fail: not telling the runs created after the base from
    the base's own runs updated after it puts them in the wrong place."""
    state = tmp_path / "s"
    _history(state)
    monkeypatch.setattr(runscan, "_created_after_base", lambda *args: set())
    with Store(state) as store, pytest.raises(AssertionError):
        _limits_match(state, store)


def _bytes_read(state: pathlib.Path, monkeypatch: pytest.MonkeyPatch, n: int) -> int:
    read = 0
    pread = journal.Journal.pread

    def counting(self: journal.Journal, fd: int, size: int, offset: int) -> bytes:
        nonlocal read
        chunk = pread(self, fd, size, offset)
        read += len(chunk)
        return chunk

    with Store(state) as store:
        monkeypatch.setattr(journal.Journal, "pread", counting)
        assert [r.id for r in store._runs(limit=n)] == [
            _finished(i).id for i in range(20000 - n, 20000)]
        monkeypatch.undo()
    return read


def test_limit_reads_a_fraction_of_the_file(tmp_path: pathlib.Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--limit 5 on 20,000 runs reads about a megabyte, not the file."""
    state = tmp_path / "s"
    _import(state, 20000)
    size = (state / DATA_NAME).stat().st_size
    assert _bytes_read(state, monkeypatch, 5) < min(size // 4, 2 << 20)


def test_limit_reads_broken_variant(tmp_path: pathlib.Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof the count can fail: keeping the last N of a forward read reads it all."""
    state = tmp_path / "s"
    _import(state, 20000)
    size = (state / DATA_NAME).stat().st_size

    def forward(journal: Any, fd: int, snap: Any, n: int, keep: Any) -> list[Any]:
        return [item for item in runscan.records(journal, fd, snap) if keep(item[1])][-n:]

    monkeypatch.setattr(runscan, "last_records", forward)
    assert _bytes_read(state, monkeypatch, 5) >= size // 2


def test_limit_on_the_command_line(tmp_path: pathlib.Path, run_cli: Any,
                                   clean_cli_env: None) -> None:
    """`list --limit N` (table, --json, --jsonl, with filters) prints the last N rows of
    the full listing; with --since too."""
    state = tmp_path / "s"
    _history(state)
    for extra in ([], ["--machine", "n4"], ["--status", "running"]):
        code, full, _ = run_cli("--state-dir", str(state), "list", "--jsonl", *extra)
        code, out, _ = run_cli("--state-dir", str(state), "list", "--jsonl", "--limit", "7",
                               *extra)
        assert code == 0 and out.splitlines() == full.splitlines()[-7:]
        code, out, _ = run_cli("--state-dir", str(state), "list", "--json", "--limit", "7",
                               *extra)
        assert json.loads(out) == [json.loads(line) for line in full.splitlines()[-7:]]
        code, table, _ = run_cli("--state-dir", str(state), "list", *extra)
        code, out, _ = run_cli("--state-dir", str(state), "list", "--limit", "7", *extra)
        ids = [line.split()[0] for line in table.splitlines()[1:]]
        assert [line.split()[0] for line in out.splitlines()[1:]] == ids[-7:]
    code, out, _ = run_cli("--state-dir", str(state), "list", "--jsonl", "--limit", "3",
                           "--since", "2026-01-01T00:00:00Z")
    assert code == 0 and len(out.splitlines()) == 3


# -- check reads a megabyte at a time -----------------------------------------------------------

def _largest_read(state: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """The most bytes one read of ``check`` asked for, and that its report is sound."""
    largest = 0
    check_bytes = verify._check_bytes

    def watched(buf: bytes, path: str, vouch: Any = None, source: Any = None) -> Any:
        read, size = source

        def reading(offset: int, n: int) -> bytes:
            nonlocal largest
            largest = max(largest, n)
            return read(offset, n)

        return check_bytes(buf, path, vouch, (reading, size))

    monkeypatch.setattr(verify, "_check_bytes", watched)
    assert runstore.check(state).ok
    return largest


def test_check_reads_the_header_line_not_the_file(tmp_path: pathlib.Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """check's reads stay within a megabyte on a file of several: its peak does not grow
    with the file (it read up to 64 MiB at once to find the header's end)."""
    state = tmp_path / "s"
    _import(state, 20000)
    assert (state / DATA_NAME).stat().st_size > 4 << 20
    assert _largest_read(state, monkeypatch) <= 1 << 20


def test_check_reads_broken_variant(tmp_path: pathlib.Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof the measurement can fail: reading the header as it was read takes the file."""
    state = tmp_path / "s"
    _import(state, 20000)
    monkeypatch.setattr(verify, "first_line", lambda read, limit: read(0, limit))
    assert _largest_read(state, monkeypatch) >= (state / DATA_NAME).stat().st_size
