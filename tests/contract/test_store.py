"""The store contract, method by method: prepare_atomic, create, get, update, list,
active_by_machine, find_by_test_dir_hash_and_machine, start, finish, heartbeat, active,
compact, the life cycle, and what survives a reopen or a compaction.

A contract module: every test using ``store``/``open_store``/``backend`` runs on the file
store and on PostgreSQL (see conftest.py); the tests of the journal file itself use
``store_dir`` and ``Store`` directly."""

from __future__ import annotations

import datetime as _dt
import os
import pathlib
import stat
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import pytest
from backends import Backend

from runstore import (
    ConflictError,
    InvalidRunError,
    InvalidTransitionError,
    LockTimeoutError,
    MachineBusyError,
    PrepareOutcome,
    Run,
    RunNotFoundError,
    RunStore,
    Status,
    Store,
    _codec as codec,
    _limits,
    store as store_module,
)

pytestmark = pytest.mark.contract

MakeRun = Callable[..., Run]
OpenStore = Callable[..., RunStore]
TERMINAL = [s for s in Status if s.is_terminal]


def _utc(moment: _dt.datetime | None) -> bool:
    return moment is not None and moment.utcoffset() == _dt.timedelta(0)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _prepare(store: RunStore, machine: str = "m1", test_dir_hash: str = "h-a") -> Run:
    run, outcome = store.prepare_atomic(
        machine, test_dir_hash, lambda: Run(machine, f"/tests/{test_dir_hash}", test_dir_hash))
    assert outcome is PrepareOutcome.CREATED
    return run


def _records(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in map(orjson.loads, path.read_bytes().splitlines()) if "seq" in d]


# -- construction and life cycle ------------------------------------------------------------


def test_store_creates_missing_state_dir_0700(store_dir: pathlib.Path) -> None:
    """Store() creates a missing state directory with mode 0700, and its journal."""
    assert not store_dir.exists()
    with Store(store_dir):
        assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
        assert (store_dir / "runs.jsonl").is_file()
        assert (store_dir / "runs.lock").is_file()


def test_store_creates_missing_parents(tmp_path: pathlib.Path) -> None:
    """A state directory several levels down is created, the leaf with mode 0700."""
    target = tmp_path / "a" / "b" / "state"
    with Store(target) as s:
        s.create(Run("m1", "/t", "h"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_store_defaults_are_durable_with_a_30_s_lock_timeout(store: RunStore) -> None:
    """Store(dir) is durable and waits up to 30 s for the lock by default."""
    assert store.durable is True
    assert store.lock_timeout == 30.0


def test_store_accepts_str_paths(store_dir: pathlib.Path) -> None:
    """state_dir may be a str as well as a PathLike."""
    with Store(str(store_dir)) as s:
        assert s.state_dir == str(store_dir)


def test_context_manager_closes_the_store(backend: Backend) -> None:
    """Leaving the with block closes the store; a closed store refuses further use."""
    with backend.open() as s:
        s.create(Run("m1", "/t", "h"))
    with pytest.raises(ValueError, match="closed"):
        s.list()


def test_close_is_idempotent(backend: Backend) -> None:
    """close() twice is harmless."""
    s = backend.open()
    s.close()
    s.close()


def test_new_store_is_empty(store: RunStore) -> None:
    """A fresh store lists nothing and has no active runs."""
    assert store.list() == []
    assert store.active() == []
    assert store.active_by_machine("m1") is None


# -- prepare_atomic -------------------------------------------------------------------------


def test_prepare_creates_a_pending_run_with_a_fresh_id(store: RunStore) -> None:
    """With no active run on the machine, make() is called once and its run stored pending."""
    calls = []

    def make() -> Run:
        calls.append(1)
        return Run("m1", "/tests/a", "h-a", logs_path="/logs/a")

    run, outcome = store.prepare_atomic("m1", "h-a", make)
    assert outcome is PrepareOutcome.CREATED
    assert calls == [1]
    assert run.id and run.status is Status.PENDING and run.revision == 1
    assert (run.machine, run.test_dir, run.test_dir_hash, run.logs_path) == (
        "m1", "/tests/a", "h-a", "/logs/a")
    assert run.started_at is None and run.ended_at is None and run.exit_code is None
    assert store.get(run.id) == run
    assert store.list() == [run]


def test_prepare_overrides_id_status_and_revision_from_make(store: RunStore) -> None:
    """Whatever id, status and revision make() sets, the stored run is fresh and pending."""
    run, outcome = store.prepare_atomic(
        "m1", "h-a",
        lambda: Run("m1", "/t", "h-a", id="mine", status=Status.RUNNING, revision=9))
    assert outcome is PrepareOutcome.CREATED
    assert run.id != "mine" and run.status is Status.PENDING and run.revision == 1


@pytest.mark.parametrize("started", [False, True], ids=["pending", "running"])
def test_prepare_reuses_the_active_run_with_the_same_hash(store: RunStore, started: bool) -> None:
    """A non-terminal run with the same hash is returned with REUSE; make() is not called."""
    first = _prepare(store)
    if started:
        first = store.start(first.id)

    def make() -> Run:
        raise AssertionError("make() must not be called when a run is reused")

    run, outcome = store.prepare_atomic("m1", "h-a", make)
    assert outcome is PrepareOutcome.REUSE
    assert run == first
    assert len(store.list()) == 1


@pytest.mark.parametrize("started", [False, True], ids=["pending", "running"])
def test_prepare_reports_busy_for_another_hash(store: RunStore, started: bool) -> None:
    """A non-terminal run with another hash is returned with BUSY; nothing is stored."""
    first = _prepare(store)
    if started:
        first = store.start(first.id)

    def make() -> Run:
        raise AssertionError("make() must not be called when the machine is busy")

    run, outcome = store.prepare_atomic("m1", "h-b", make)
    assert outcome is PrepareOutcome.BUSY
    assert run == first
    assert store.list() == [first]


@pytest.mark.parametrize("status", TERMINAL)
@pytest.mark.parametrize("same_hash", [True, False], ids=["same-hash", "other-hash"])
def test_prepare_after_a_terminal_run_creates_a_fresh_run(
    store: RunStore, status: Status, same_hash: bool
) -> None:
    """Terminal runs never block: a re-dispatch creates a new run with a new, greater id."""
    first = store.start(_prepare(store).id)
    first = store.finish(first.id, status)
    run, outcome = store.prepare_atomic(
        "m1", "h-a" if same_hash else "h-b",
        lambda: Run("m1", "/t", "h-a" if same_hash else "h-b"))
    assert outcome is PrepareOutcome.CREATED
    assert run.id != first.id and run.id > first.id
    assert [r.id for r in store.list()] == [first.id, run.id]


def test_prepare_on_other_machines_is_independent(store: RunStore) -> None:
    """An active run on one machine does not block another machine."""
    a = _prepare(store, "m1")
    b = _prepare(store, "m2", "h-b")
    assert a.id != b.id
    assert store.active() == [a, b]


def test_prepare_when_make_raises_leaves_store_unchanged(
    store: RunStore, open_store: OpenStore
) -> None:
    """An exception from make() propagates, nothing is stored and the lock is released."""
    before = store.last_seq()

    def make() -> Run:
        raise KeyError("no free slot")

    with pytest.raises(KeyError, match="no free slot"):
        store.prepare_atomic("m1", "h-a", make)
    assert store.last_seq() == before
    assert store.list() == []
    other = open_store(lock_timeout=0.5)  # the lock (flock, row lock) is free again
    assert _prepare(other, "m1").status is Status.PENDING
    assert _prepare(store, "m2").status is Status.PENDING  # and so is the mutex


@pytest.mark.parametrize(
    "made",
    [
        Run("m2", "/t", "h-a"),
        Run("m1", "/t", "h-b"),
        {"machine": "m1", "test_dir": "/t", "test_dir_hash": "h-a"},
        None,
    ],
    ids=["other-machine", "other-hash", "dict", "none"],
)
def test_prepare_refuses_a_wrong_run_from_make(store: RunStore, made: object) -> None:
    """make() returning a run for another machine or hash, or no Run, is an InvalidRunError."""
    before = store.last_seq()
    with pytest.raises(InvalidRunError):
        store.prepare_atomic("m1", "h-a", lambda: made)  # type: ignore[arg-type, return-value]  # the point of the test
    assert store.last_seq() == before
    assert store.list() == []
    assert _prepare(store).machine == "m1"


def test_prepare_refuses_an_invalid_run_from_make(store: RunStore) -> None:
    """make() returning a run with a naive datetime is refused; nothing is stored."""
    naive = _dt.datetime(2026, 1, 1)
    with pytest.raises(InvalidRunError):
        store.prepare_atomic("m1", "h-a", lambda: Run("m1", "/t", "h-a", heartbeat_at=naive))
    assert store.list() == []


@pytest.mark.parametrize(("machine", "test_dir_hash"), [("", "h"), ("m1", "")])
def test_prepare_refuses_empty_machine_or_hash(
    store: RunStore, machine: str, test_dir_hash: str
) -> None:
    """An empty machine or hash is an InvalidRunError before anything else happens."""
    with pytest.raises(InvalidRunError):
        store.prepare_atomic(machine, test_dir_hash, lambda: Run(machine, "/t", test_dir_hash))


# -- create ---------------------------------------------------------------------------------


def test_create_assigns_a_new_id_over_any_given(store: RunStore, make_run: MakeRun) -> None:
    """create() overwrites a given id, sets revision 1 and returns what it stored."""
    run = store.create(make_run(id="caller-chosen", revision=5, logs_path="/l"))
    assert run.id and run.id != "caller-chosen"
    assert run.revision == 1 and run.logs_path == "/l"
    assert store.get(run.id) == run


def test_create_ids_are_unique_and_increasing(store: RunStore, make_run: MakeRun) -> None:
    """Ids of created runs are distinct and sort in creation order."""
    made = [store.create(make_run(machine=f"m{i}", id="same")).id for i in range(20)]
    assert len(set(made)) == 20
    assert made == sorted(made)


def test_create_keeps_the_given_fields(store: RunStore) -> None:
    """Every caller field but id and revision is stored as given."""
    ended = _dt.datetime(2026, 1, 1, 1, 2, 3, 4, tzinfo=_dt.UTC)
    given = Run("m1", "/tests/x", "h-x", status=Status.FAILED, exit_code=2, ended_at=ended,
                artifacts_path="/a", logs_path="/l", error_code="E1", error_msg="bad",
                batch_id="b", plan_entry="p")
    run = store.create(given)
    assert run == attrs.evolve(given, id=run.id, revision=1)


def test_create_refuses_a_second_active_run_on_a_machine(
    store: RunStore, make_run: MakeRun
) -> None:
    """A second non-terminal run for a machine is a MachineBusyError naming the occupant."""
    first = store.create(make_run())
    with pytest.raises(MachineBusyError) as info:
        store.create(make_run(test_dir_hash="h-b"))
    assert isinstance(info.value, ConflictError)
    assert (info.value.machine, info.value.occupant_id) == ("m1", first.id)
    assert store.list() == [first]


def test_create_allows_terminal_runs_beside_an_active_one(
    store: RunStore, make_run: MakeRun
) -> None:
    """Terminal runs (history, imports) can be created on a busy machine."""
    active = store.create(make_run())
    done = store.create(make_run(status=Status.COMPLETED, exit_code=0))
    assert store.list() == [active, done]
    assert store.active_by_machine("m1") == active


def test_create_refuses_invalid_runs(store: RunStore, make_run: MakeRun) -> None:
    """A naive datetime or an empty machine is an InvalidRunError; nothing is stored."""
    with pytest.raises(InvalidRunError):
        store.create(make_run(started_at=_dt.datetime(2026, 1, 1)))
    with pytest.raises(InvalidRunError):
        store.create(make_run(machine=""))
    assert store.list() == []


# -- get ------------------------------------------------------------------------------------


def test_get_returns_the_latest_version(store: RunStore) -> None:
    """get() returns the stored run as of its latest change."""
    run = _prepare(store)
    running = store.start(run.id)
    assert store.get(run.id) == running
    done = store.finish(run.id, Status.COMPLETED, exit_code=0)
    assert store.get(run.id) == done


def test_get_unknown_id_raises_run_not_found(store: RunStore) -> None:
    """get() of an id the store does not hold raises RunNotFoundError (a LookupError)."""
    _prepare(store)
    with pytest.raises(RunNotFoundError) as info:
        store.get("20260101T000000.000000Z-0000000000000000")
    assert isinstance(info.value, LookupError)
    assert info.value.run_id == "20260101T000000.000000Z-0000000000000000"


# -- update ---------------------------------------------------------------------------------


def test_update_stores_changes_and_increments_revision(store: RunStore) -> None:
    """update() stores the caller's changes with revision + 1 and returns the stored run."""
    run = _prepare(store)
    new = store.update(attrs.evolve(run, logs_path="/logs/1", batch_id="b1"))
    assert new.revision == run.revision + 1
    assert new == attrs.evolve(run, logs_path="/logs/1", batch_id="b1", revision=2)
    assert store.get(run.id) == new
    newer = store.update(attrs.evolve(new, artifacts_path="/art"))
    assert newer.revision == 3


def test_update_unknown_run_raises_run_not_found(store: RunStore, make_run: MakeRun) -> None:
    """update() of a run the store does not hold raises RunNotFoundError."""
    with pytest.raises(RunNotFoundError):
        store.update(make_run(id="20260101T000000.000000Z-0000000000000000", revision=1))


@pytest.mark.parametrize("delta", [-1, 1, 5])
def test_update_with_stale_revision_raises_conflict(store: RunStore, delta: int) -> None:
    """A copy whose revision is not the stored one raises ConflictError; nothing changes."""
    run = _prepare(store)
    current = store.update(attrs.evolve(run, logs_path="/l1"))
    with pytest.raises(ConflictError) as info:
        store.update(attrs.evolve(current, logs_path="/l2", revision=current.revision + delta))
    assert (info.value.run_id, info.value.expected, info.value.actual) == (
        run.id, current.revision + delta, current.revision)
    assert store.get(run.id) == current


def test_update_loser_of_a_race_gets_conflict(store: RunStore, open_store: OpenStore) -> None:
    """Two writers with the same copy: the first update wins, the second gets ConflictError."""
    run = _prepare(store)
    other = open_store()
    copy = other.get(run.id)
    store.update(attrs.evolve(run, logs_path="/first"))
    with pytest.raises(ConflictError):
        other.update(attrs.evolve(copy, logs_path="/second"))
    assert store.get(run.id).logs_path == "/first"


@pytest.mark.parametrize("field", ["machine", "test_dir_hash"])
def test_update_refuses_identity_change(store: RunStore, field: str) -> None:
    """Changing machine or test_dir_hash is an InvalidRunError; nothing changes."""
    run = _prepare(store)
    with pytest.raises(InvalidRunError):
        store.update(attrs.evolve(run, **{field: "other"}))
    assert store.get(run.id) == run


@pytest.mark.parametrize(
    ("start", "target"),
    [(Status.PENDING, Status.COMPLETED), (Status.RUNNING, Status.PENDING)],
)
def test_update_refuses_forbidden_transitions(
    store: RunStore, start: Status, target: Status
) -> None:
    """A status change the state machine forbids raises InvalidTransitionError."""
    run = _prepare(store)
    if start is Status.RUNNING:
        run = store.start(run.id)
    with pytest.raises(InvalidTransitionError):
        store.update(attrs.evolve(run, status=target))
    assert store.get(run.id) == run


@pytest.mark.parametrize("target", [Status.RUNNING, Status.FAILED, Status.TIMEOUT])
def test_update_allows_permitted_transitions(store: RunStore, target: Status) -> None:
    """update() may move a pending run along an allowed edge."""
    run = _prepare(store)
    new = store.update(attrs.evolve(run, status=target))
    assert new.status is target and new.revision == 2


def test_update_unchanged_terminal_copy_is_a_no_op(store: RunStore) -> None:
    """An unchanged copy of a terminal run returns the stored run; nothing is stored."""
    run = store.finish(store.start(_prepare(store).id).id, Status.COMPLETED, exit_code=0)
    before = store.last_seq()
    again = store.update(run)
    assert again == run and again.revision == run.revision
    assert store.last_seq() == before


@pytest.mark.parametrize(
    "change",
    [{"logs_path": "/late"}, {"status": Status.FAILED}, {"status": Status.RUNNING},
     {"exit_code": 9}],
    ids=["field", "other-terminal", "back-to-running", "exit-code"],
)
def test_update_of_a_terminal_run_is_refused(store: RunStore, change: dict[str, Any]) -> None:
    """Any real change to a terminal run raises InvalidTransitionError."""
    run = store.finish(store.start(_prepare(store).id).id, Status.COMPLETED, exit_code=0)
    with pytest.raises(InvalidTransitionError):
        store.update(attrs.evolve(run, **change))
    assert store.get(run.id) == run


# -- start ----------------------------------------------------------------------------------


def test_start_moves_pending_to_running_and_sets_started_at(store: RunStore) -> None:
    """start() sets status running, an aware UTC started_at and revision + 1."""
    run = _prepare(store)
    before = _now()
    started = store.start(run.id)
    after = _now()
    assert started.status is Status.RUNNING
    assert _utc(started.started_at)
    assert started.started_at is not None and before <= started.started_at <= after
    assert started.revision == run.revision + 1
    assert started.owner_pid == os.getpid()
    assert store.get(run.id) == started


@pytest.mark.parametrize("status", [Status.RUNNING, *TERMINAL])
def test_start_refuses_a_run_that_is_not_pending(store: RunStore, status: Status) -> None:
    """start() of a running or terminal run raises InvalidTransitionError."""
    run = store.start(_prepare(store).id)
    if status.is_terminal:
        run = store.finish(run.id, status)
    with pytest.raises(InvalidTransitionError):
        store.start(run.id)
    assert store.get(run.id) == run


def test_start_unknown_id_raises_run_not_found(store: RunStore) -> None:
    """start() of an unknown id raises RunNotFoundError."""
    with pytest.raises(RunNotFoundError):
        store.start("20260101T000000.000000Z-0000000000000000")


# -- finish ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", TERMINAL)
def test_finish_from_running_sets_ended_at_and_details(store: RunStore, status: Status) -> None:
    """finish() of a running run stores the terminal status, ended_at and the details."""
    run = store.start(_prepare(store).id)
    before = _now()
    done = store.finish(run.id, status, exit_code=7, error_code="E7", error_msg="seven")
    assert done.status is status
    assert _utc(done.ended_at) and done.ended_at is not None and done.ended_at >= before
    assert (done.exit_code, done.error_code, done.error_msg) == (7, "E7", "seven")
    assert done.started_at == run.started_at
    assert done.revision == run.revision + 1
    assert store.get(run.id) == done


@pytest.mark.parametrize("status", [Status.FAILED, Status.INTERRUPTED, Status.TIMEOUT])
def test_finish_from_pending_to_non_completed(store: RunStore, status: Status) -> None:
    """A pending run may fail, be interrupted or time out without running."""
    run = _prepare(store)
    done = store.finish(run.id, status)
    assert done.status is status and done.started_at is None and _utc(done.ended_at)


def test_finish_pending_as_completed_is_refused(store: RunStore) -> None:
    """A pending run cannot complete without running: InvalidTransitionError."""
    run = _prepare(store)
    with pytest.raises(InvalidTransitionError):
        store.finish(run.id, Status.COMPLETED, exit_code=0)
    assert store.get(run.id) == run


def test_finish_accepts_the_status_as_a_string(store: RunStore) -> None:
    """finish(id, "completed") works like finish(id, Status.COMPLETED)."""
    run = store.start(_prepare(store).id)
    assert store.finish(run.id, "completed").status is Status.COMPLETED


@pytest.mark.parametrize("status", TERMINAL)
def test_finish_again_with_the_same_status_returns_run_unchanged(
    store: RunStore, status: Status
) -> None:
    """Repeating the terminal status returns the stored run unchanged; nothing is stored."""
    run = store.start(_prepare(store).id)
    done = store.finish(run.id, status, exit_code=1, error_msg="first")
    before = store.last_seq()
    again = store.finish(run.id, status, exit_code=2, error_msg="second")
    assert again == done
    assert store.last_seq() == before


@pytest.mark.parametrize("first", TERMINAL)
def test_finish_with_another_terminal_status_is_refused(store: RunStore, first: Status) -> None:
    """A terminal run cannot switch to another terminal status."""
    run = store.start(_prepare(store).id)
    done = store.finish(run.id, first)
    for other in TERMINAL:
        if other is not first:
            with pytest.raises(InvalidTransitionError):
                store.finish(run.id, other)
    assert store.get(run.id) == done


@pytest.mark.parametrize("target", [Status.PENDING, Status.RUNNING, "running"])
def test_finish_with_a_non_terminal_status_is_refused(
    store: RunStore, target: Status | str
) -> None:
    """finish() to pending or running raises InvalidTransitionError."""
    run = store.start(_prepare(store).id)
    with pytest.raises(InvalidTransitionError):
        store.finish(run.id, target)
    assert store.get(run.id) == run


def test_finish_with_an_unknown_status_is_refused(store: RunStore) -> None:
    """finish() with a status that does not exist is an InvalidRunError."""
    run = store.start(_prepare(store).id)
    with pytest.raises(InvalidRunError):
        store.finish(run.id, "exploded")


def test_finish_unknown_id_raises_run_not_found(store: RunStore) -> None:
    """finish() of an unknown id raises RunNotFoundError."""
    with pytest.raises(RunNotFoundError):
        store.finish("20260101T000000.000000Z-0000000000000000", Status.FAILED)


# -- heartbeat ------------------------------------------------------------------------------


@pytest.mark.parametrize("started", [False, True], ids=["pending", "running"])
def test_heartbeat_sets_heartbeat_at(store: RunStore, started: bool) -> None:
    """heartbeat() of a non-terminal run sets an aware UTC heartbeat_at and revision + 1."""
    run = _prepare(store)
    if started:
        run = store.start(run.id)
    before = _now()
    beat = store.heartbeat(run.id)
    assert _utc(beat.heartbeat_at) and beat.heartbeat_at is not None
    assert beat.heartbeat_at >= before
    assert beat == attrs.evolve(run, heartbeat_at=beat.heartbeat_at, revision=run.revision + 1)
    assert store.get(run.id) == beat


def test_heartbeat_of_a_terminal_run_is_refused(store: RunStore) -> None:
    """A finished run takes no heartbeat: InvalidTransitionError."""
    run = store.finish(_prepare(store).id, Status.FAILED)
    with pytest.raises(InvalidTransitionError):
        store.heartbeat(run.id)


def test_heartbeat_unknown_id_raises_run_not_found(store: RunStore) -> None:
    """heartbeat() of an unknown id raises RunNotFoundError."""
    with pytest.raises(RunNotFoundError):
        store.heartbeat("20260101T000000.000000Z-0000000000000000")


def test_stale_copy_after_heartbeat_conflicts(store: RunStore) -> None:
    """A heartbeat is a stored change: a copy taken before it is stale."""
    run = _prepare(store)
    store.heartbeat(run.id)
    with pytest.raises(ConflictError):
        store.update(attrs.evolve(run, logs_path="/l"))


# -- queries --------------------------------------------------------------------------------


@pytest.fixture
def populated(store: RunStore) -> dict[str, Run]:
    """Five runs on two machines in every status family, batches b1/b2."""
    a = store.create(Run("m1", "/t/a", "h-a", status=Status.COMPLETED, batch_id="b1"))
    b = store.create(Run("m2", "/t/b", "h-b", status=Status.FAILED, batch_id="b2"))
    c = store.create(Run("m1", "/t/a", "h-a", status=Status.TIMEOUT, batch_id="b1"))
    d = store.start(store.create(Run("m1", "/t/a", "h-a", batch_id="b2")).id)
    e = store.create(Run("m2", "/t/c", "h-c"))
    # touch the oldest run last: list order must not follow update order
    store.update(attrs.evolve(e, logs_path="/l"))
    return {"a": a, "b": b, "c": c, "d": d, "e": store.get(e.id)}


def test_list_returns_every_run_in_insertion_order(
    store: RunStore, populated: dict[str, Run]
) -> None:
    """list() returns the latest version of every run, in the order they were created."""
    assert store.list() == [populated[k] for k in "abcde"]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"machine": "m1"}, "acd"),
        ({"machine": "m3"}, ""),
        ({"status": Status.COMPLETED}, "a"),
        ({"status": "pending"}, "e"),
        ({"status": [Status.FAILED, "timeout"]}, "bc"),
        ({"status": {Status.PENDING, Status.RUNNING}}, "de"),
        ({"batch_id": "b1"}, "ac"),
        ({"batch_id": ""}, "e"),
        ({"machine": "m1", "status": Status.RUNNING}, "d"),
        ({"machine": "m2", "batch_id": "b2"}, "b"),
    ],
)
def test_list_filters(
    store: RunStore, populated: dict[str, Run], filters: dict[str, Any], expected: str
) -> None:
    """list() filters by machine, status (one or several) and batch_id, combined with AND."""
    assert store.list(**filters) == [populated[k] for k in expected]


def test_list_refuses_unknown_status(store: RunStore) -> None:
    """A status filter naming no status is an InvalidRunError."""
    with pytest.raises(InvalidRunError):
        store.list(status="exploded")


def test_active_returns_non_terminal_runs_in_insertion_order(
    store: RunStore, populated: dict[str, Run]
) -> None:
    """active() lists pending and running runs, oldest first."""
    assert store.active() == [populated["d"], populated["e"]]


def test_active_by_machine(store: RunStore, populated: dict[str, Run]) -> None:
    """active_by_machine() returns the machine's non-terminal run, or None."""
    assert store.active_by_machine("m1") == populated["d"]
    assert store.active_by_machine("m2") == populated["e"]
    assert store.active_by_machine("m3") is None
    store.finish(populated["d"].id, Status.INTERRUPTED)
    assert store.active_by_machine("m1") is None


def test_find_by_hash_and_machine_returns_every_match(
    store: RunStore, populated: dict[str, Run]
) -> None:
    """find_by_test_dir_hash_and_machine() returns every run (any status) of that pair."""
    assert store.find_by_test_dir_hash_and_machine("h-a", "m1") == [
        populated[k] for k in "acd"]
    assert store.find_by_test_dir_hash_and_machine("h-a", "m2") == []
    assert store.find_by_test_dir_hash_and_machine("h-c", "m2") == [populated["e"]]


# -- several handles, reopen, compaction ----------------------------------------------------


def test_two_handles_see_each_others_writes(store: RunStore, open_store: OpenStore) -> None:
    """A second handle on the same store sees the first one's changes and vice versa."""
    other = open_store()
    a = _prepare(store)
    assert other.get(a.id) == a
    b, outcome = other.prepare_atomic("m1", "h-b", lambda: Run("m1", "/t", "h-b"))
    assert outcome is PrepareOutcome.BUSY and b == a
    started = other.start(a.id)
    assert store.get(a.id) == started
    assert store.list() == other.list() == [started]


def test_reopen_after_close_keeps_every_run(backend: Backend) -> None:
    """Runs, revisions, details and the active set survive close() and a new handle."""
    with backend.open() as s:
        a = s.finish(s.start(_prepare(s, "m1").id).id, Status.COMPLETED, exit_code=0)
        b = s.heartbeat(s.start(_prepare(s, "m2").id).id)
        c = s.update(attrs.evolve(_prepare(s, "m3"), batch_id="b", plan_entry="p"))
        runs = s.list()
    assert runs == [a, b, c]
    with backend.open() as s:
        assert s.list() == runs
        assert s.active() == [b, c]
        assert s.get(a.id) == a
        d, outcome = s.prepare_atomic("m2", "h-a", lambda: Run("m2", "/t", "h-a"))
        assert outcome is PrepareOutcome.REUSE and d == b
        e = _prepare(s, "m1")
        assert e.id > c.id


def test_reopen_without_close_keeps_acknowledged_runs(open_store: OpenStore) -> None:
    """A store that was never closed (a crashed process) reopens with every change."""
    s = open_store()
    run = s.start(_prepare(s).id)
    assert open_store().list() == [run]


def test_compact_keeps_every_run_and_the_order(
    store: RunStore, open_store: OpenStore, backend: Backend, store_dir: pathlib.Path
) -> None:
    """compact() changes nothing list() returns; on the file store it replaces the journal
    by rename and keeps the lock file."""
    runs = []
    for i in range(6):
        run = store.start(_prepare(store, f"m{i}").id)
        for _ in range(3):
            run = store.heartbeat(run.id)
        if i % 2:
            run = store.finish(run.id, Status.COMPLETED, exit_code=0)
        runs.append(run)
    on_file = backend.kind == "file"
    if on_file:
        lock_inode = (store_dir / "runs.lock").stat().st_ino
        journal_inode = (store_dir / "runs.jsonl").stat().st_ino
    store.compact()
    assert store.list() == runs
    if on_file:
        assert (store_dir / "runs.jsonl").stat().st_ino != journal_inode  # replaced by rename
        assert (store_dir / "runs.lock").stat().st_ino == lock_inode
    again = open_store()
    assert again.list() == runs
    assert again.active() == [r for r in runs if not r.is_terminal]


def test_seqs_continue_gap_free_after_compact(store: RunStore) -> None:
    """After a compaction the next change gets the next sequence number."""
    run = _prepare(store)
    store.heartbeat(run.id)
    store.heartbeat(run.id)
    last = store.last_seq()
    assert last == 3
    store.compact()
    store.heartbeat(run.id)
    assert store.last_seq() == last + 1
    assert [c.seq for c in store.changes(last)] == [last + 1]


def test_compaction_by_another_handle_is_followed(
    store: RunStore, open_store: OpenStore
) -> None:
    """A handle keeps working after another handle compacted (replaced the file)."""
    run = _prepare(store)
    other = open_store()
    other.heartbeat(run.id)
    other.compact()
    beat = other.heartbeat(run.id)
    assert store.get(run.id) == beat
    assert store.finish(run.id, Status.FAILED).revision == beat.revision + 1


def test_unknown_fields_survive_updates_and_compaction(store_dir: pathlib.Path) -> None:
    """Fields a newer runstore wrote are kept on later versions and through compact()."""
    with Store(store_dir) as s:
        done = s.finish(_prepare(s, "m1").id, Status.FAILED)
        active = _prepare(s, "m2")
    path = store_dir / "runs.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    for i, line in enumerate(lines):
        data = codec.decode_line(line[:-1])
        if data.get("id") in (done.id, active.id) and "seq" in data:
            data["x_future"] = {"owner": data["id"][-4:], "tags": [1, 2]}
            lines[i] = codec.reseal(data)
    path.write_bytes(b"".join(lines))

    with Store(store_dir) as s:
        assert s.list() == [done, active]  # unknown fields are invisible to the API
        s.compact()
        s.heartbeat(active.id)
        s.compact()
    with Store(store_dir) as s:
        s.compact()
        s.heartbeat(active.id)
    records = _records(path)
    for run in (done, active):
        versions = [d for d in records if d["id"] == run.id]
        assert versions, run.id
        assert versions[-1]["x_future"] == {"owner": run.id[-4:], "tags": [1, 2]}, versions[-1]


def test_auto_compaction_keeps_the_file_bounded(store_dir: pathlib.Path) -> None:
    """Many updates on few runs never let the file grow past its bound; nothing is lost."""
    # The bound was once 2 * live + 1100 lines; RETAIN_CHANGES (history kept for lagging
    # watchers) was added since, so the bound follows the module's constants, capped.
    retain = getattr(store_module, "RETAIN_CHANGES", 0)
    bound_extra = _limits.COMPACT_MIN_SUPERSEDED + retain + 76
    assert bound_extra <= 6000, "the file may now grow to more than ~6,000 superseded lines"
    updates = retain + 3 * _limits.COMPACT_MIN_SUPERSEDED
    path = store_dir / "runs.jsonl"
    most = 0
    with Store(store_dir, durable=False) as s:
        runs = [s.start(_prepare(s, f"m{i}").id) for i in range(10)]
        for i in range(updates):
            runs[i % 10] = s.heartbeat(runs[i % 10].id)
            if i % 97 == 0:
                most = max(most, path.read_bytes().count(b"\n"))
        final = path.read_bytes().count(b"\n")
        most = max(most, final)
        assert s.list() == runs
    assert final < updates, "no automatic compaction happened"
    live = len(runs)
    assert most < 2 * live + bound_extra, (
        f"{most} lines after {updates} updates on {live} runs; bound {2 * live + bound_extra}")
    with Store(store_dir) as s:
        assert s.list() == runs


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
def test_store_stays_readable_across_automatic_compactions(
    store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    """Changes after an automatic compaction are readable by a new Store (regression: in
    durable mode the next line claimed a durable mark past its own offset -> corrupt)."""
    monkeypatch.setattr(_limits, "COMPACT_MIN_SUPERSEDED", 16)
    if hasattr(store_module, "RETAIN_CHANGES"):
        monkeypatch.setattr(_limits, "RETAIN_CHANGES", 8)
    path = store_dir / "runs.jsonl"
    with Store(store_dir, durable=durable) as s:
        runs = [s.start(_prepare(s, f"m{i}").id) for i in range(3)]
        inode, compactions = path.stat().st_ino, 0
        for i in range(150):
            runs[i % 3] = s.heartbeat(runs[i % 3].id)
            compactions += path.stat().st_ino != inode
            inode = path.stat().st_ino
            if i % 50 == 49:
                with Store(store_dir) as reader:  # a fresh reader at any point
                    assert reader.list() == runs
        assert compactions > 3, "the test needs several automatic compactions"
    with Store(store_dir) as s:
        assert s.list() == runs
        assert s.finish(runs[0].id, Status.COMPLETED).revision == runs[0].revision + 1


def test_lock_file_is_never_deleted(store_dir: pathlib.Path) -> None:
    """runs.lock stays (same inode) across close, reopen and compaction."""
    with Store(store_dir) as s:
        _prepare(s)
        inode = (store_dir / "runs.lock").stat().st_ino
        s.compact()
    assert (store_dir / "runs.lock").stat().st_ino == inode
    with Store(store_dir) as s:
        s.compact()
    assert (store_dir / "runs.lock").stat().st_ino == inode


def test_non_durable_store_keeps_the_contract(backend: Backend) -> None:
    """durable=False changes only syncing: runs are stored and reopen the same."""
    with backend.open(durable=False) as s:
        assert s.durable is False
        run = s.finish(s.start(_prepare(s).id).id, Status.COMPLETED, exit_code=0)
    with backend.open(durable=False) as s:
        assert s.list() == [run]


def test_lock_timeout_zero_works_without_contention(open_store: OpenStore) -> None:
    """lock_timeout=0 still lets an uncontended store work."""
    s = open_store(lock_timeout=0)
    assert _prepare(s).status is Status.PENDING
    assert s.finish(s.start(_prepare(s, "m2").id).id, Status.COMPLETED).revision == 3


def test_lock_is_not_reentrant_from_make(store_dir: pathlib.Path) -> None:
    """Calling the store from inside make() times out instead of deadlocking."""
    with Store(store_dir, lock_timeout=0.2) as s:
        with pytest.raises(LockTimeoutError):
            s.prepare_atomic("m1", "h", lambda: (s.list(), Run("m1", "/t", "h"))[1])
        assert s.list() == []
