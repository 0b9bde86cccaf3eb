"""Streaming ``import_runs``, ``runstore import`` and ``migrate``: a few thousand runs come out
equal to what went in, on both backends and in every direction; a failure in the middle (a
bad record at the end, an I/O error, a conflict found late) leaves the target as it was
(the file byte for byte, the same table rows); a second migrate imports nothing; and the
memory a migrate needs does not grow in proportion to the runs.

Each detection test has a broken variant that disables what it tests (an import that
commits as it reads, a conflict check that skips) and shows the failure then happens.
"""

from __future__ import annotations

import errno
import io
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import pytest

from runstore import InvalidRunError, Run, RunStore, Status, Store, StoreIOError, _fields
from runstore.migrate import MigrationConflictError, migrate
from tests.backends import ROOT, Backend, fresh_table
from tests.faults import FailingFS, figure, sized, snapshot_dir

#: more than ``store.SMALL_IMPORT``: the staged path of the file store
N = 5000


def records(n: int = N, *, prefix: str = "20260101T000000") -> list[dict[str, Any]]:
    """``n`` run records as an export writes them: mostly finished runs on 40 machines,
    every 500th one running on a machine of its own, some with fields runstore does not
    know."""
    out = []
    for i in range(n):
        active = i % 500 == 7
        record: dict[str, Any] = {
            "id": f"{prefix}.{i:06d}Z-{i:016x}", "machine": f"solo{i}" if active else f"m{i % 40}",
            "test_dir": f"/tests/t{i % 13}", "test_dir_hash": f"sha256:{i:012x}",
            "status": "running" if active else ("failed" if i % 7 == 0 else "completed"),
            "exit_code": None if active else i % 3, "started_at": "2026-01-01T00:00:00Z",
            "ended_at": None if active else "2026-01-01T00:05:00.250000Z",
            "revision": 1 + i % 4, "batch_id": f"b{i % 9}" if i % 2 else "",
        }
        if i % 11 == 0:
            record["ticket"] = {"key": f"T-{i}", "labels": ["a", "b"]}
        out.append(record)
    return out


def normal(items: Iterable[dict[str, Any]]) -> list[bytes]:
    """Records as canonical JSON with their unknown fields, sorted: what must survive."""
    out = []
    for item in items:
        data = {**_fields.run_to_json(_fields.run_from_dict(item)), **_fields.extra_fields(item)}
        data["revision"] = max(data["revision"], 1)
        out.append(orjson.dumps(data, option=orjson.OPT_SORT_KEYS))
    return sorted(out)


def exported(store: RunStore) -> list[bytes]:
    buf = io.BytesIO()
    store.export(buf)
    return normal(orjson.loads(buf.getvalue()))


def snapshot(backend: Backend) -> Any:
    """Everything a failed import must leave as it was: every file of the state directory
    (bytes), or every row of the store's tables and its sequence."""
    if backend.kind == "file":
        return snapshot_dir(backend.location)
    import psycopg

    t = backend.table
    with psycopg.connect(backend.location) as conn:
        return [conn.execute(query).fetchall() for query in (
            f"SELECT * FROM {t} ORDER BY inserted",  # a test table name
            f"SELECT * FROM {t}_changes ORDER BY seq",
            f"SELECT * FROM {t}_feed",
            f"SELECT last_value FROM {t}_seq")]


@pytest.fixture(params=["file", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_backend(request: pytest.FixtureRequest, kind: str, path: pathlib.Path) -> Backend:
    if kind == "file":
        return Backend("file", str(path))
    return Backend("postgres", request.getfixturevalue("pg_dsn"), fresh_table())


@pytest.fixture
def target(request: pytest.FixtureRequest, kind: str, tmp_path: pathlib.Path) -> Backend:
    return make_backend(request, kind, tmp_path / "target")


def fill(backend: Backend, items: list[dict[str, Any]]) -> None:
    with backend.open() as store:
        assert store.import_runs(items) == len(items)


# -- equal to the source -----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["array", "indented", "lines"])
def test_import_of_thousands_equals_the_input(target: Backend, tmp_path: pathlib.Path,
                                              form: str) -> None:
    """A JSON array (as export writes it, or indented) or JSON lines of 5,000 runs read
    from a file come back from export field for field, unknown fields included."""
    items = records()
    blob = {"array": orjson.dumps(items),
            "indented": orjson.dumps(items, option=orjson.OPT_INDENT_2),
            "lines": b"\n".join(orjson.dumps(r) for r in items) + b"\n"}[form]
    path = tmp_path / "in.json"
    path.write_bytes(blob)
    with target.open() as store, open(path, "rb") as fp:
        assert store.import_runs(fp) == N
        assert exported(store) == normal(items)
        assert len(store.active()) == N // 500


def test_cli_import_of_thousands(run_cli: Callable[..., tuple[int, str, str]],
                                 tmp_path: pathlib.Path) -> None:
    """``runstore import FILE`` takes the staged path, and a new process reads every run."""
    path = tmp_path / "in.json"
    path.write_bytes(orjson.dumps(records()))
    code, out, err = run_cli("--state-dir", str(tmp_path / "s"), "import", str(path))
    assert (code, err) == (0, "") and f"imported {N:,} runs" in out.replace(" 5000 ", " 5,000 ")
    with Store(tmp_path / "s") as store:
        assert exported(store) == normal(records())


def test_a_staged_import_is_taken_in_by_the_view_and_other_processes(
        tmp_path: pathlib.Path) -> None:
    """After a staged import the same handle and a handle opened before it see every run,
    go on writing (a checkpoint follows), and check finds the file healthy."""
    from runstore.verify import check

    with Store(tmp_path) as early, Store(tmp_path) as store:
        early.create(Run("m0", "/t", "h"))
        store.import_runs(records()[1:])  # m0's run is active: record 0 is not
        assert store.stats().runs == N and early.stats().runs == N
        run = early.get(records()[7]["id"])
        assert early.finish(run.id, Status.COMPLETED).status is Status.COMPLETED
        assert store.get(run.id).status is Status.COMPLETED
        store.create(Run("m99", "/t", "h"))
    assert check(tmp_path).ok
    with Store(tmp_path) as again:
        assert again.stats().runs == N + 1


def source_store(request: pytest.FixtureRequest, kind: str, path: pathlib.Path) -> Backend:
    """A source of 5,000 runs; a file one compacted (opened from its summary) and then
    changed: a run finished, a run pruned, a run created after the base."""
    backend = make_backend(request, kind, path)
    fill(backend, records())
    with backend.open() as store:
        store.compact()
        store.finish(records()[7]["id"], Status.FAILED, exit_code=9)
        store.create(Run("late", "/t", "h"))
    return backend


@pytest.mark.parametrize("direction", ["file->postgres", "postgres->file", "file->file",
                                       "postgres->postgres"])
def test_migrate_equals_the_source_and_a_second_run_imports_nothing(
        request: pytest.FixtureRequest, tmp_path: pathlib.Path, direction: str) -> None:
    """migrate copies every run (unknown fields too) in each direction, verifies it, and a
    second migrate copies nothing and leaves the target exactly as it was."""
    a, b = direction.split("->")
    source = source_store(request, a, tmp_path / "source")
    target = make_backend(request, b, tmp_path / "target")
    with source.open() as src, target.open() as dst:
        report = migrate(src, dst)
        assert (report.source_runs, report.copied, report.verified) == (N + 1, N + 1, N + 1)
        assert exported(dst) == exported(src)
    before = snapshot(target)
    with source.open() as src, target.open() as dst:
        again = migrate(src, dst)
    assert (again.copied, again.skipped, again.checksum) == (0, N + 1, report.checksum)
    assert snapshot(target) == before


# -- a failure in the middle leaves the target as it was -----------------------------------------


def bad_at_the_end() -> list[dict[str, Any]]:
    return [*records(), {**records(1, prefix="20270101T000000")[0], "status": "skipped"}]


def test_a_bad_record_at_the_end_leaves_the_target_unchanged(target: Backend) -> None:
    """Record 5,001 has an unknown status: refused naming it, and nothing of the 5,000
    before it is stored (no temp file is left either)."""
    fill(target, records(3, prefix="20250101T000000"))
    before = snapshot(target)
    with target.open() as store, pytest.raises(InvalidRunError, match=f"record {N + 1}"):
        store.import_runs(io.BytesIO(orjson.dumps(bad_at_the_end())))
    assert snapshot(target) == before


def _import_committing_as_it_reads(store: Any, records: Iterable[Any],
                                   on_conflict: Any = None) -> int:
    """The broken import: commits every 1,000 records as they are read."""
    count, batch = 0, []
    for n, run, extra in records:
        batch.append((n, run, extra))
        if len(batch) == 1000:
            count += _real_import[store.__class__](store, batch, on_conflict)
            batch = []
    return count + _real_import[store.__class__](store, batch, on_conflict)


_real_import: dict[type, Callable[..., int]] = {}


def break_atomicity(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    if kind == "file":
        cls: type = Store
    else:
        from runstore.postgres import PostgresStore

        cls = PostgresStore
    _real_import[cls] = cls._import_runs  # type: ignore[attr-defined]
    monkeypatch.setattr(cls, "_import_runs", _import_committing_as_it_reads)


def test_broken_variant_an_import_that_commits_as_it_reads_changes_the_target(
        target: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the test above can fail: with batches committed as they are read, the
    bad last record is still refused but 5,000 runs are already stored."""
    fill(target, records(3, prefix="20250101T000000"))
    before = snapshot(target)
    break_atomicity(monkeypatch, target.kind)
    with target.open() as store, pytest.raises(InvalidRunError, match=f"record {N + 1}"):
        store.import_runs(io.BytesIO(orjson.dumps(bad_at_the_end())))
    assert snapshot(target) != before
    with target.open() as store:
        assert store.stats().runs == 3 + N


@pytest.mark.parametrize(("call", "nth"), [("write", 1), ("write", 3), ("fsync", 1),
                                           ("replace", 1), ("open", 1)])
def test_an_io_error_while_staging_leaves_the_journal_unchanged(
        tmp_path: pathlib.Path, call: str, nth: int) -> None:
    """The k-th write / the fsync of the temp file / the rename / the temp file's creation
    fails (EIO or ENOSPC through the FileSystem seam): StoreIOError naming the journal, the
    directory byte for byte as it was, and the store still works."""
    fill(Backend("file", str(tmp_path)), records(3, prefix="20250101T000000"))
    before = snapshot_dir(str(tmp_path))
    fs = FailingFS(call, nth, errno.ENOSPC if call == "write" else errno.EIO)
    fs.armed = False
    with Store(tmp_path, _fs=fs) as store:
        fs.armed = True
        with pytest.raises(StoreIOError) as caught:
            store.import_runs(records())
        assert fs.failed == 1 and caught.value.errno == fs.err
        assert "runs.jsonl" in str(caught.value)
        assert snapshot_dir(str(tmp_path)) == before
        assert store.stats().runs == 3
        fs.armed = False
        assert store.import_runs(records()) == N
    with Store(tmp_path) as store:
        assert exported(store) == normal(records(3, prefix="20250101T000000") + records())


def test_broken_variant_an_io_error_after_committing_batches_changes_the_journal(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the test above can fail: an import that commits as it reads stores
    what came before the failing write."""
    fill(Backend("file", str(tmp_path)), records(3, prefix="20250101T000000"))
    before = snapshot_dir(str(tmp_path))
    break_atomicity(monkeypatch, "file")
    fs = FailingFS("write", 3, errno.ENOSPC)
    fs.armed = False
    with Store(tmp_path, _fs=fs) as store, pytest.raises(StoreIOError):
        fs.armed = True
        store.import_runs(records())
    assert snapshot_dir(str(tmp_path)) != before


def test_a_busy_machine_found_late_leaves_the_target_unchanged(target: Backend) -> None:
    """The last record is a running run on a machine that has another active run in the
    target: refused naming both, nothing stored."""
    fill(target, [{**records(8, prefix="20250101T000000")[7], "machine": "busy"}])
    before = snapshot(target)
    late = {**records(1, prefix="20270101T000000")[0], "status": "pending", "machine": "busy",
            "exit_code": None, "ended_at": None}
    with target.open() as store, pytest.raises(InvalidRunError, match=f"record {N + 1}: .*busy"):
        store.import_runs([*records(), late])
    assert snapshot(target) == before


def conflicting_target(request: pytest.FixtureRequest, kind: str,
                       tmp_path: pathlib.Path) -> tuple[Backend, Backend]:
    """A source of 5,000 runs and a target that holds the source's last run with another
    exit code."""
    source = make_backend(request, "file", tmp_path / "source")
    fill(source, records())
    target = make_backend(request, kind, tmp_path / "target")
    fill(target, [{**records()[-1], "exit_code": 99}])
    return source, target


def test_a_conflict_found_late_leaves_the_target_unchanged(
        request: pytest.FixtureRequest, kind: str, tmp_path: pathlib.Path) -> None:
    """migrate meets the conflicting run last: MigrationConflictError naming it and the
    field, and none of the 4,999 runs before it is in the target."""
    source, target = conflicting_target(request, kind, tmp_path)
    before = snapshot(target)
    with (source.open() as src, target.open() as dst,
          pytest.raises(MigrationConflictError) as caught):
        migrate(src, dst)
    assert caught.value.run_id == records()[-1]["id"] and caught.value.fields == ("exit_code",)
    assert snapshot(target) == before


def test_broken_variant_a_conflict_check_that_skips_changes_the_target(
        request: pytest.FixtureRequest, kind: str, tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the test above can fail: when an existing run is skipped whatever its
    content, the other 4,999 runs are imported (and the verification fails)."""
    source, target = conflicting_target(request, kind, tmp_path)
    before = snapshot(target)
    if kind == "file":
        monkeypatch.setattr(Store, "_skip_existing",
                            lambda self, n, run, on_conflict: run.id in self._view.index)
    else:
        from runstore.postgres import PostgresStore

        real = PostgresStore._import_runs
        conflicting = records()[-1]["id"]
        monkeypatch.setattr(PostgresStore, "_import_runs",
                            lambda self, recs, on_conflict=None: real(
                                self, (r for r in recs if r[1].id != conflicting),
                                on_conflict))
    with source.open() as src, target.open() as dst, pytest.raises(Exception):  # noqa: B017
        migrate(src, dst)
    assert snapshot(target) != before


# -- memory --------------------------------------------------------------------------------------

#: the peak is the process's own VmHWM: ``ru_maxrss`` also counts the (pytest) process it
#: was spawned from, since Linux keeps the high-water mark across exec
_MEASURE = """
import sys
from runstore import cli
code = cli.main(sys.argv[1:])
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(peak, code)
"""


def make_source(path: pathlib.Path, n: int) -> None:
    """A freshly compacted file store of ``n`` runs, made in a child process."""
    code = f"""
from runstore import Store
def gen():
    for i in range({n}):
        yield {{"id": f"20260101T000000.{{i:07d}}Z-{{i:016x}}", "machine": f"m{{i % 97}}",
               "test_dir": "/tests/net", "test_dir_hash": f"sha256:{{i:064x}}",
               "status": "completed", "exit_code": 0, "started_at": "2026-01-01T00:00:00Z",
               "ended_at": "2026-01-01T00:05:00Z", "artifacts_path": "/art/x",
               "logs_path": "/logs/x", "revision": 3}}
with Store({str(path)!r}) as s:
    s.import_runs(gen())
    s.compact()
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=3600)


def peak_rss_mb(*argv: str) -> float:
    """The peak RSS (MB) of ``runstore ARGV`` in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True,
                          check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=3600)
    kb, code = done.stdout.split()[-2:]
    assert code == b"0", done.stderr
    return int(kb) / 1024


def fresh_database(dsn: str, name: str) -> str:
    """A new, empty database on the test server, as a postgresql:// URL."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    params = dict(part.split("=", 1) for part in dsn.split())
    return (f"postgresql://{params['user']}@/{name}?host={params['host']}"
            f"&port={params['port']}")


def measure(request: pytest.FixtureRequest, tmp_path: pathlib.Path, n: int,
            what: str) -> float:
    """Peak RSS (MB) of `runstore migrate` of a compacted store of ``n`` runs into
    PostgreSQL or a new directory, or of `runstore import` of ``n`` runs (JSON lines)."""
    src = tmp_path / f"src{n}"
    make_source(src, n)
    if what == "import":
        lines = tmp_path / f"runs{n}.jsonl"
        with Store(src) as store, open(lines, "wb") as fp:
            for run, extra in store._iter_export():
                fp.write(orjson.dumps({**_fields.run_to_json(run), **extra}) + b"\n")
        return peak_rss_mb("--state-dir", str(tmp_path / f"dst{n}"), "import", str(lines))
    if what == "file":
        dest = str(tmp_path / f"dst{n}")
    else:
        dest = fresh_database(request.getfixturevalue("pg_dsn"), f"mem{n}")
    return peak_rss_mb("migrate", "--from", str(src), "--to", dest)


@pytest.mark.parametrize("what", ["postgres", "file", "import"])
def test_memory_grows_far_less_than_linearly(
        request: pytest.FixtureRequest, tmp_path: pathlib.Path, what: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Peak RSS of `runstore migrate` (into PostgreSQL, into a directory) and of `runstore
    import`, for 20,000 and for 100,000 runs: the growth per run is a small fraction of
    what holding every run cost (migrate into PostgreSQL took about 18 KB a run), loosely
    under 1 KB a run; into a file store most of it is the store's own index of its ids."""
    small = measure(request, tmp_path, 20_000, what)
    large = measure(request, tmp_path, 100_000, what)
    per_run = (large - small) * 2**20 / 80_000
    figure(capsys, "streaming import", what=what, rss_20k_mb=round(small, 1),
           rss_100k_mb=round(large, 1), bytes_per_run=round(per_run))
    assert per_run < 1024


@pytest.mark.stress
@pytest.mark.parametrize("what", ["postgres", "file", "import"])
def test_a_million_runs(request: pytest.FixtureRequest, tmp_path: pathlib.Path, what: str,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """At 1,000,000 runs (scaled by RUNSTORE_STRESS_SCALE): migrate into PostgreSQL peaks
    under 150 MB; into a file store (migrate or import) the target's index of every id
    comes on top, loosely under 500 MB."""
    n = sized(100_000, 1_000_000, full_size=True)
    peak = measure(request, tmp_path, n, what)
    figure(capsys, "streaming import", what=what, runs=n, rss_mb=round(peak, 1))
    assert peak < (150 if what == "postgres" else 500)
