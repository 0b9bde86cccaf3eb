"""Run lifecycle: owners and reaping, retention, batches, the change feed, export/import.

A contract module: the tests run on the file store and on PostgreSQL (see conftest.py),
except the one about the journal file's size."""

from __future__ import annotations

import datetime as dt
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import orjson
import pytest
from backends import Backend
from faults import stop_all

import runstore
from runstore import (
    ChangeType,
    HistoryTruncatedError,
    InvalidRunError,
    PrepareOutcome,
    Run,
    RunStore,
    Status,
    Store,
    _forks,
    _owner as owner,
)
from runstore.store import RETAIN_CHANGES

pytestmark = pytest.mark.contract

UTC = dt.UTC
OpenStore = Callable[..., RunStore]


def make(machine: str, h: str = "h1", **kw: object) -> Run:
    return Run(machine, f"/tests/{machine}", h, **kw)  # type: ignore[arg-type]


def _start_and_die(backend: Backend, machine: str, ready: str) -> None:
    with backend.open() as store:
        run, _ = store.prepare_atomic(machine, "h1", lambda: make(machine))
        store.start(run.id)
        Path(ready + ".tmp").write_text(run.id)
        os.replace(ready + ".tmp", ready)  # whole when it appears: the parent reads it then
        time.sleep(60)


# -- owners and reaping ----------------------------------------------------------------


def test_created_and_started_runs_record_this_process_as_owner(open_store: OpenStore) -> None:
    """create and start set owner host, pid and start time, and they are stored."""
    store = open_store()
    run, _ = store.prepare_atomic("m1", "h1", lambda: make("m1"))
    assert run.owner_pid == os.getpid() and run.owner_host and run.owner_start
    started = store.start(run.id)
    assert started.owner_pid == os.getpid()
    stored = open_store().get(run.id)
    assert (stored.owner_host, stored.owner_pid, stored.owner_start) == (
        run.owner_host, os.getpid(), run.owner_start)


def test_a_forked_child_knows_its_own_pid_without_asking_the_kernel() -> None:
    """``_forks.pid()`` (the store's fork check, kept by an at-fork hook) and the owner a
    forked child records are the child's, also after the parent asked before forking."""
    assert _forks.pid() == os.getpid() and owner.current()[1] == os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status
        os._exit(0 if _forks.pid() == os.getpid() == owner.current()[1] else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _forks.pid() == os.getpid()


def test_sigkilled_owner_is_reaped_and_machine_freed(backend: Backend, tmp_path: Path) -> None:
    """A process that starts a run and is SIGKILLed is reaped (owner_gone) and frees its machine."""
    ready = str(tmp_path / "ready")
    proc = multiprocessing.get_context("fork").Process(
        target=_start_and_die, args=(backend, "m1", ready))
    proc.start()
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(ready) and time.monotonic() < deadline:
            time.sleep(0.01)
        run_id = Path(ready).read_text()
        with backend.open() as store:
            assert store.reap(stale_after=dt.timedelta(hours=1)) == []  # owner alive
            assert store.prepare_atomic("m1", "h2", lambda: make("m1", "h2"))[1] is \
                PrepareOutcome.BUSY
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            reaped = store.reap(stale_after=dt.timedelta(hours=1))
            assert [r.id for r in reaped] == [run_id]
            assert reaped[0].status is Status.INTERRUPTED
            assert reaped[0].error_code == "owner_gone"
            assert store.get(run_id).status is Status.INTERRUPTED
            _, outcome = store.prepare_atomic("m1", "h2", lambda: make("m1", "h2"))
            assert outcome is PrepareOutcome.CREATED
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


def test_prepare_atomic_reap_frees_machine_of_dead_predecessor(
    backend: Backend, tmp_path: Path
) -> None:
    """prepare_atomic(reap=True) reaps a run whose owner is gone in the same critical section."""
    ready = str(tmp_path / "ready")
    proc = multiprocessing.get_context("fork").Process(
        target=_start_and_die, args=(backend, "m1", ready))
    proc.start()
    deadline = time.monotonic() + 20
    while not os.path.exists(ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    with backend.open() as store:
        assert store.prepare_atomic("m1", "h2", lambda: make("m1", "h2"))[1] is \
            PrepareOutcome.BUSY  # off by default
        _, outcome = store.prepare_atomic("m1", "h2", lambda: make("m1", "h2"), reap=True)
        assert outcome is PrepareOutcome.CREATED
        old = store.get(Path(ready).read_text())
        assert old.status is Status.INTERRUPTED and old.error_code == "owner_gone"
        kinds = [c.type for c in store.changes()][-2:]
        assert kinds == [ChangeType.RUN_REAPED, ChangeType.RUN_CREATED]


def test_reused_pid_is_not_mistaken_for_the_owner(backend: Backend) -> None:
    """A live process with the owner's pid but another start time is not the owner."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with backend.open() as store:
            host, _, _ = runstore._owner.current()
            real = runstore._owner.process_start(sleeper.pid)
            assert real
            impostor = store.create(make("m1"))
            alive = store.create(make("m2"))
            # rewrite owners through update(): m1 claims the sleeper's pid with another
            # start time (the pid was reused), m2 is really the sleeper
            store.update(attrs.evolve(impostor, owner_host=host, owner_pid=sleeper.pid,
                                      owner_start=real + "0"))
            store.update(attrs.evolve(alive, owner_host=host, owner_pid=sleeper.pid,
                                      owner_start=real))
            reaped = store.reap(stale_after=dt.timedelta(hours=1))
            assert [r.id for r in reaped] == [impostor.id]
            assert store.get(alive.id).status is Status.PENDING
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_heartbeat_is_reaped_and_fresh_one_is_not(backend: Backend) -> None:
    """reap(stale_after) interrupts runs whose heartbeat (or last change) is too old and
    whose owner cannot be asked (here: a process of another host)."""
    with backend.open() as store:
        a = store.start(store.create(make("m1")).id)
        a = store.update(attrs.evolve(a, owner_host="elsewhere.invalid"))
        b = store.create(make("m2"))
        time.sleep(0.3)
        store.heartbeat(b.id)
        reaped = store.reap(stale_after=dt.timedelta(seconds=0.2))
        assert [r.id for r in reaped] == [a.id]
        assert reaped[0].error_code == "heartbeat_stale"
        assert store.get(b.id).status is Status.PENDING


def test_reap_dry_run_changes_nothing(backend: Backend) -> None:
    """reap(dry_run=True) reports what it would reap and writes nothing."""
    with backend.open() as store:
        run = store.create(make("m1"))
        run = store.update(attrs.evolve(run, owner_host="elsewhere.invalid"))
        before = store.last_seq()
        assert [r.id for r in store.reap(stale_after=dt.timedelta(0), dry_run=True)] == [run.id]
        assert store.last_seq() == before
        assert store.get(run.id).status is Status.PENDING


def test_heartbeat_refreshes_and_counts_as_a_change(backend: Backend) -> None:
    """heartbeat() sets heartbeat_at, bumps revision and is refused on terminal runs."""
    with backend.open() as store:
        run = store.create(make("m1"))
        beat = store.heartbeat(run.id)
        assert beat.heartbeat_at is not None and beat.revision == run.revision + 1
        store.finish(run.id, Status.FAILED)
        with pytest.raises(runstore.InvalidTransitionError):
            store.heartbeat(run.id)


# -- retention ---------------------------------------------------------------------------


def test_prune_keeps_non_terminal_runs_and_archives_exactly_the_pruned(
    backend: Backend, tmp_path: Path
) -> None:
    """prune never drops a non-terminal run, and the archive holds exactly what was pruned."""
    archive = tmp_path / "archive.jsonl"
    with backend.open() as store:
        done = []
        for i in range(6):
            r = store.create(make(f"m{i}"))
            store.start(r.id)
            done.append(store.finish(r.id, Status.COMPLETED, exit_code=0))
        live = [store.create(make("busy1")), store.start(store.create(make("busy2")).id)]
        assert store.prune(keep_last=2, archive=archive, dry_run=True) == 4
        assert len(store.list()) == 8
        assert store.prune(keep_last=2, archive=archive) == 4
        left = store.list()
        assert [r.id for r in left] == [r.id for r in done[4:]] + [r.id for r in live]
        archived = [json.loads(line) for line in archive.read_text().splitlines()]
        assert [a["id"] for a in archived] == [r.id for r in done[:4]]
        assert archived[0]["status"] == "completed" and archived[0]["exit_code"] == 0
        assert oct(archive.stat().st_mode & 0o777) == "0o600"
    with backend.open() as store:  # reopened: the pruned runs stay gone
        assert len(store.list()) == 4
        with pytest.raises(runstore.RunNotFoundError):
            store.get(done[0].id)


def test_prune_older_than_uses_ended_at(backend: Backend) -> None:
    """prune(older_than) removes terminal runs that ended before the cutoff only."""
    with backend.open() as store:
        old = store.finish(store.create(make("m1")).id, Status.FAILED)
        time.sleep(0.2)
        new = store.finish(store.create(make("m2")).id, Status.FAILED)
        assert store.prune(older_than=dt.timedelta(seconds=0.1)) == 1
        assert [r.id for r in store.list()] == [new.id]
        assert old.id not in {r.id for r in store.list()}


def test_prune_needs_exactly_one_criterion(backend: Backend) -> None:
    """prune() with neither or both criteria is refused."""
    with backend.open() as store:
        with pytest.raises(InvalidRunError):
            store.prune()
        with pytest.raises(InvalidRunError):
            store.prune(keep_last=1, older_than=dt.timedelta(days=1))


def test_pruned_changes_appear_in_the_feed(backend: Backend) -> None:
    """prune() writes run_pruned changes that a follower sees."""
    with backend.open() as store:
        run = store.finish(store.create(make("m1")).id, Status.FAILED)
        seq = store.last_seq()
        store.prune(keep_last=0)
        changes = list(store.changes(seq))
        assert [(c.type, c.run.id) for c in changes] == [(ChangeType.RUN_PRUNED, run.id)]


def test_compaction_bounds_the_file(tmp_path: Path) -> None:
    """Automatic compaction keeps lines <= 2 x live + RETAIN_CHANGES + 1024 + slack."""
    with Store(tmp_path / "s", durable=False) as store:
        runs = [store.create(make(f"m{i}")) for i in range(10)]
        for _ in range(700):
            for r in runs:
                store.heartbeat(r.id)
        lines = (tmp_path / "s" / "runs.jsonl").read_bytes().count(b"\n")
        assert lines <= 2 * 10 + RETAIN_CHANGES + 1024 + 10 + 1
        assert [r.id for r in store.list()] == [r.id for r in runs]


# -- batches -------------------------------------------------------------------------------


def test_batch_summary_counts_latest_run_per_plan_entry(backend: Backend) -> None:
    """batch_summary gives counts by status and the latest run of each plan entry."""
    with backend.open() as store:
        a1 = store.create(make("m1", batch_id="b", plan_entry="a"))
        store.finish(a1.id, Status.FAILED)
        a2 = store.create(make("m1", batch_id="b", plan_entry="a"))  # retry of entry a
        b1 = store.create(make("m2", batch_id="b", plan_entry="b"))
        store.create(make("m3", batch_id="other", plan_entry="a"))
        summary = store.batch_summary("b")
        assert summary.entries["a"].id == a2.id and summary.entries["b"].id == b1.id
        assert summary.counts[Status.PENDING] == 2 and summary.counts[Status.FAILED] == 0
        assert summary.runs == 3 and not summary.done
        store.start(a2.id)
        store.finish(a2.id, Status.COMPLETED)
        store.finish(b1.id, Status.TIMEOUT)
        summary = store.batch_summary("b")
        assert summary.done
        assert summary.counts[Status.COMPLETED] == 1 and summary.counts[Status.TIMEOUT] == 1


# -- the change feed -----------------------------------------------------------------------


def test_changes_have_gap_free_seqs_and_types(backend: Backend) -> None:
    """changes() yields every stored change with strictly increasing gap-free seqs."""
    with backend.open() as store:
        run, _ = store.prepare_atomic("m1", "h1", lambda: make("m1"))
        store.start(run.id)
        store.heartbeat(run.id)
        store.finish(run.id, Status.COMPLETED, exit_code=0)
        store.update(attrs.evolve(store.create(make("m2")), logs_path="/l"))
        changes = list(store.changes())
        assert [c.seq for c in changes] == [1, 2, 3, 4, 5, 6]
        assert [c.type for c in changes] == [
            ChangeType.RUN_CREATED, ChangeType.RUN_STARTED, ChangeType.HEARTBEAT,
            ChangeType.RUN_FINISHED, ChangeType.RUN_CREATED, ChangeType.RUN_UPDATED]
        assert changes[3].run.exit_code == 0 and changes[3].time.tzinfo is not None
        assert [c.seq for c in store.changes(4)] == [5, 6]


def test_history_before_compaction_point_raises(backend: Backend) -> None:
    """Asking for compacted-away history raises HistoryTruncatedError with the oldest seq."""
    with backend.open(durable=False) as store:
        run = store.create(make("m1"))
        for _ in range(RETAIN_CHANGES + 10):
            store.heartbeat(run.id)
        store.compact()
        last = store.last_seq()
        oldest = last - RETAIN_CHANGES + 1
        with pytest.raises(HistoryTruncatedError) as err:
            list(store.changes(0))
        assert err.value.oldest_seq == oldest
        assert [c.seq for c in store.changes(oldest - 1)][:2] == [oldest, oldest + 1]
        assert list(store.changes(last)) == []


def test_change_json_shape_is_snake_case_with_string_enums(backend: Backend) -> None:
    """The JSON shape of a change: seq, time (RFC 3339 Z), type, run with snake_case field names."""
    with backend.open() as store:
        store.create(make("m1"))
        change = next(iter(store.changes()))
    data = runstore._codec.change_to_json(change.seq, change.time, change.type, change.run)
    assert data["seq"] == 1 and data["type"] == "run_created" and data["time"].endswith("Z")
    assert data["run"]["test_dir_hash"] == "h1" and data["run"]["exit_code"] is None
    assert "batch_id" not in data["run"]
    orjson.dumps(data)


def _writer(backend: Backend, name: str, count: int, go: str) -> None:
    while not os.path.exists(go):
        time.sleep(0.001)
    with backend.open(durable=False) as store:
        for i in range(count):
            machine = f"{name}-{i}"
            run, outcome = store.prepare_atomic(machine, "h", lambda m=machine: make(m, "h"))
            assert outcome is PrepareOutcome.CREATED
            store.start(run.id)
            store.finish(run.id, Status.COMPLETED, exit_code=0)


def _compactor(backend: Backend, go: str, stop: str) -> None:
    while not os.path.exists(go):
        time.sleep(0.001)
    with backend.open(durable=False) as store:
        while not os.path.exists(stop):
            store.compact()
            time.sleep(0.02)


def _watcher(backend: Backend, out: str, expected: int) -> None:
    got = []
    with backend.open(durable=False) as store:
        for change in store.watch(0, timeout=60):
            got.append((change.seq, change.run.id, change.type.value))
            if len(got) == expected:
                break
    Path(out).write_text(json.dumps(got))


@pytest.mark.timeout(120)
def test_watch_sees_three_writers_in_order_exactly_once_across_compaction(
    backend: Backend, tmp_path: Path
) -> None:
    """watch in one process sees the changes of three others in order, exactly once, while a
    fourth compacts."""
    backend.open().close()  # create the store before the race
    go, stop, out = str(tmp_path / "go"), str(tmp_path / "stop"), str(tmp_path / "out")
    per_writer = 60
    expected = 3 * per_writer * 3
    ctx = multiprocessing.get_context("fork")
    watcher = ctx.Process(target=_watcher, args=(backend, out, expected))
    writers = [ctx.Process(target=_writer, args=(backend, f"w{k}", per_writer, go))
               for k in range(3)]
    compactor = ctx.Process(target=_compactor, args=(backend, go, stop))
    procs = [watcher, *writers, compactor]
    for p in procs:
        p.start()
    try:
        Path(go).touch()
        for w in writers:
            w.join(60)
        watcher.join(60)
        Path(stop).touch()
        compactor.join(30)
        got = json.loads(Path(out).read_text())
    finally:
        stop_all(procs)
    seqs = [g[0] for g in got]
    assert seqs == list(range(1, expected + 1))
    per_run: dict[str, list[str]] = {}
    for _, run_id, kind in got:
        per_run.setdefault(run_id, []).append(kind)
    assert len(per_run) == 3 * per_writer
    assert all(k == ["run_created", "run_started", "run_finished"] for k in per_run.values())
    with backend.open() as store:
        compacted = store.stats().oldest_seq > 1
    print(f"watch: {expected} changes from 3 writers seen in order exactly once; "
          f"compactions happened: {compacted}")


# -- export and import ---------------------------------------------------------------------


def test_export_import_round_trips_every_field(backend: Backend) -> None:
    """export -> import into an empty store round-trips every field, ids included."""
    now = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    with backend.open() as src:
        full = src.create(Run("m1", "/t", "h", exit_code=3, started_at=now, ended_at=now,
                              artifacts_path="/a", logs_path="/l", error_code="E",
                              error_msg="boom \u2603", batch_id="b", plan_entry="p",
                              status=Status.FAILED))
        src.create(make("m2"))
        buf = io.StringIO()
        assert src.export(buf) == 2
        original = src.list()
    doc = json.loads(buf.getvalue())
    assert [d["id"] for d in doc] == [r.id for r in original]
    assert doc[0]["exit_code"] == 3 and doc[0]["started_at"] == "2026-01-02T03:04:05.678901Z"
    assert "batch_id" not in doc[1] and doc[1]["exit_code"] is None
    with backend.sibling("b").open() as dst:
        assert dst.import_runs(io.StringIO(buf.getvalue())) == 2
        assert dst.list() == original
        assert dst.get(full.id) == full


def test_import_is_all_or_nothing(backend: Backend) -> None:
    """A duplicate or invalid record is refused naming it, and nothing is imported."""
    with backend.open() as store:
        existing = store.create(make("m1"))
        good = {"id": "r-1", "machine": "m9", "test_dir": "/t", "test_dir_hash": "h",
                "status": "completed"}
        for bad, needle in [
            ([good, {**good, "id": existing.id}], existing.id),
            ([good, {**good, "id": "r-2", "exit_code": "zero"}], "record 2"),
            ([good, good], "appears twice"),
            ([good, {**good, "id": "r-3", "machine": "m1", "status": "running"}], "m1"),
            ([good, {**good, "id": ""}], "record 2"),
        ]:
            with pytest.raises(InvalidRunError, match=needle):
                store.import_runs(io.BytesIO(orjson.dumps(bad)))
            assert [r.id for r in store.list()] == [existing.id]


def test_import_accepts_json_lines_and_keeps_unknown_fields(backend: Backend) -> None:
    """import_runs reads JSON lines too and keeps fields this library does not know."""
    lines = b"\n".join(orjson.dumps({"id": f"x{i}", "machine": f"m{i}", "test_dir": "/t",
                                     "test_dir_hash": "h", "status": "completed",
                                     "x_custom": i}) for i in range(3))
    with backend.open() as store:
        assert store.import_runs(io.BytesIO(lines)) == 3
        store.compact()
        out = io.BytesIO()
        store.export(out)
    assert [d["x_custom"] for d in json.loads(out.getvalue())] == [0, 1, 2]


@pytest.mark.parametrize("imported", [
    "29991231T235959.999999Z-ffffffffffffffff",  # a runstore id from later
    "99991231T235959.999999Z-0",  # the last microsecond ids can say
    "zzz-imported",  # another shape, sorting after every runstore id
    "x.~ffffffffffffffff-00000000",  # a counter after such an id, full
    "zz.~fffffffffffffffe-00000000",  # one short of full
])
def test_new_ids_sort_after_imported_ones(backend: Backend, imported: str) -> None:
    """Ids created after an import sort after the imported ids, whatever their shape, and
    keep doing so."""
    with backend.open() as store:
        store.import_runs([Run("m1", "/t", "h", id=imported, status=Status.COMPLETED)])
        made = [store.create(make(f"m{i}")).id for i in range(2, 5)]
        assert imported < made[0] < made[1] < made[2]


_LAST_REVISION = (1 << 63) - 1


@pytest.mark.parametrize("change", ["start", "heartbeat", "finish", "update", "reap"])
def test_a_run_at_the_last_revision_cannot_change(store: RunStore, change: str) -> None:
    """A run imported with the largest revision a store keeps refuses any change with
    ``InvalidRunError`` naming it, on both backends, and stays as it was: its next
    revision would not fit in 64 bits (a store that wrote it could not be exported and
    imported again)."""
    status = Status.PENDING if change == "start" else Status.RUNNING
    store.import_runs([Run("m", "/t", "h", id="last", status=status,
                           revision=_LAST_REVISION,
                           heartbeat_at=dt.datetime(2020, 1, 1, tzinfo=UTC))])
    before = store.get("last")
    with pytest.raises(InvalidRunError, match="revision 9223372036854775807 is the largest"):
        if change == "start":
            store.start("last")
        elif change == "heartbeat":
            store.heartbeat("last")
        elif change == "finish":
            store.finish("last", Status.FAILED, exit_code=1)
        elif change == "update":
            store.update(attrs.evolve(before, error_msg="x"))
        else:
            store.reap(stale_after=dt.timedelta(seconds=1))
    assert store.get("last") == before
    run, outcome = store.prepare_atomic("other", "h", lambda: Run("other", "/t", "h"))
    assert outcome is PrepareOutcome.CREATED and run.revision == 1
