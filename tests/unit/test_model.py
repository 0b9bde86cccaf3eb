"""The records: ``Run`` defaults and immutability, ``Status``, ``PrepareOutcome``, and the
error tree (builtin bases, attributes, messages, pickling)."""

from __future__ import annotations

import errno
import pickle

import attrs
import pytest
from hypothesis import given, strategies as st
from strategies import runs

import runstore
from runstore import (
    ConflictError,
    CorruptStoreError,
    DatabaseConnectionError,
    DatabaseError,
    HistoryTruncatedError,
    InvalidRunError,
    InvalidTransitionError,
    LockTimeoutError,
    MachineBusyError,
    PrepareOutcome,
    Run,
    RunNotFoundError,
    RunstoreError,
    Status,
    StoreIOError,
    TableLockTimeoutError,
    UnsafeStoreError,
)
from runstore._fields import RUN_FIELDS
from runstore.model import replace_run

# -- Run ------------------------------------------------------------------------------------


def test_run_needs_only_machine_test_dir_and_hash() -> None:
    """A Run built from machine, test_dir and test_dir_hash gets the documented defaults."""
    run = Run("m1", "/tests/a", "h-a")
    assert (run.machine, run.test_dir, run.test_dir_hash) == ("m1", "/tests/a", "h-a")
    assert run.id == ""
    assert run.status is Status.PENDING
    assert run.exit_code is None
    assert run.started_at is None and run.ended_at is None and run.heartbeat_at is None
    for name in ("artifacts_path", "logs_path", "error_code", "error_msg", "batch_id",
                 "plan_entry", "owner_host", "owner_start"):
        assert getattr(run, name) == "", name
    assert run.owner_pid is None
    assert run.revision == 0


def test_run_has_the_contract_fields() -> None:
    """Run carries every field the contract names, under those names."""
    names = {a.name for a in attrs.fields(Run)}
    assert names >= {
        "id", "machine", "test_dir", "test_dir_hash", "status", "exit_code", "started_at",
        "ended_at", "artifacts_path", "logs_path", "error_code", "error_msg", "batch_id",
        "plan_entry", "revision", "owner_host", "owner_pid", "owner_start", "heartbeat_at",
    }


def test_run_is_frozen() -> None:
    """A Run cannot be changed in place; attrs.evolve makes a changed copy."""
    run = Run("m1", "/tests/a", "h-a")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        run.status = Status.RUNNING  # type: ignore[misc]  # the point of the test
    changed = attrs.evolve(run, status=Status.RUNNING)
    assert changed.status is Status.RUNNING and run.status is Status.PENDING


@given(runs())
def test_run_equality_and_hash_follow_the_fields(run: Run) -> None:
    """Equal field values make equal, equally hashed runs (runs can key dicts and sets)."""
    twin = attrs.evolve(run)
    assert twin == run and hash(twin) == hash(run)
    assert attrs.evolve(run, revision=run.revision + 1) != run


@given(runs())
def test_run_is_terminal_follows_status(run: Run) -> None:
    """Run.is_terminal is its status' is_terminal."""
    assert run.is_terminal is run.status.is_terminal


@given(runs(), runs(), st.sets(st.sampled_from(RUN_FIELDS)))
def test_replace_run_is_attrs_evolve(run: Run, other: Run, changed: set[str]) -> None:
    """``replace_run`` (the write path's ``evolve``) gives what ``attrs.evolve`` gives, for
    any fields changed, and a frozen ``Run`` like any other."""
    changes = {name: getattr(other, name) for name in changed}
    before = attrs.astuple(run)
    new = replace_run(run, **changes)
    assert new == attrs.evolve(run, **changes)
    assert type(new) is Run
    assert attrs.astuple(new) == attrs.astuple(attrs.evolve(run, **changes))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        new.status = Status.FAILED  # type: ignore[misc]
    assert attrs.astuple(run) == before  # the original is untouched


def test_replace_run_refuses_an_unknown_field() -> None:
    """Like ``attrs.evolve``: a name that is not a field of ``Run`` is a ``TypeError``."""
    with pytest.raises(TypeError, match="statu"):
        replace_run(Run("m1", "/t", "h"), statu=Status.RUNNING)


@given(runs())
def test_run_pickles(run: Run) -> None:
    """A Run crosses process boundaries unchanged."""
    assert pickle.loads(pickle.dumps(run)) == run


# -- Status and PrepareOutcome --------------------------------------------------------------


def test_status_values_are_the_contract_strings() -> None:
    """Status is a str enum of exactly the six lifecycle states."""
    assert [s.value for s in Status] == [
        "pending", "running", "completed", "failed", "interrupted", "timeout"]
    assert all(isinstance(s, str) for s in Status)
    assert Status("running") is Status.RUNNING
    assert Status.COMPLETED == "completed"
    assert str(Status.TIMEOUT) == "timeout"


@pytest.mark.parametrize("status", list(Status))
def test_status_is_terminal_for_the_last_four(status: Status) -> None:
    """is_terminal is true exactly for completed, failed, interrupted and timeout."""
    expected = status.value in {"completed", "failed", "interrupted", "timeout"}
    assert status.is_terminal is expected


def test_prepare_outcome_has_created_reuse_busy() -> None:
    """PrepareOutcome has exactly CREATED, REUSE and BUSY."""
    assert {o.name for o in PrepareOutcome} == {"CREATED", "REUSE", "BUSY"}


# -- errors -----------------------------------------------------------------------------------

ERRORS = [
    (RunNotFoundError("r1", "/s/runs.jsonl"), LookupError,
     {"run_id": "r1", "path": "/s/runs.jsonl"}),
    (InvalidTransitionError("r1", "completed", "running", "terminal states are final"),
     ValueError, {"run_id": "r1", "from_status": "completed", "to_status": "running",
                  "reason": "terminal states are final"}),
    (InvalidRunError("machine must be a non-empty string"), ValueError, {}),
    (ConflictError("r1", 2, 3), RunstoreError, {"run_id": "r1", "expected": 2, "actual": 3}),
    (MachineBusyError("m1", "r9"), ConflictError, {"machine": "m1", "occupant_id": "r9"}),
    (LockTimeoutError("/s/runs.lock", 0.2), TimeoutError,
     {"lock_path": "/s/runs.lock", "timeout": 0.2}),
    (CorruptStoreError("/s/runs.jsonl", 123, "checksum mismatch", "restore a backup"),
     ValueError, {"path": "/s/runs.jsonl", "offset": 123, "problem": "checksum mismatch",
                  "remedy": "restore a backup"}),
    (UnsafeStoreError("/s", "writable by others", "chmod 700"), PermissionError,
     {"path": "/s", "problem": "writable by others", "remedy": "chmod 700"}),
    (HistoryTruncatedError(5, 10), LookupError, {"since_seq": 5, "oldest_seq": 10}),
    (StoreIOError("/s/runs.jsonl", "syncing", OSError(errno.EIO, "I/O error")), OSError,
     {"path": "/s/runs.jsonl", "action": "syncing"}),
    (TableLockTimeoutError("table runs on db", 0.5), LockTimeoutError,
     {"lock_path": "table runs on db", "timeout": 0.5}),
    (DatabaseError("db:5432", "updating", "disk full", None, errno.ENOSPC), StoreIOError,
     {"server": "db:5432", "action": "updating", "reason": "disk full", "applied": None,
      "errno": errno.ENOSPC}),
    (DatabaseConnectionError("db:5432", "reading", "server closed the connection"),
     ConnectionError, {"server": "db:5432", "reason": "server closed the connection",
                       "applied": False, "errno": errno.ECONNRESET}),
]
ERROR_IDS = [type(e).__name__ for e, _, _ in ERRORS]


@pytest.mark.parametrize(("error", "builtin", "attributes"), ERRORS, ids=ERROR_IDS)
def test_error_inherits_runstore_error_and_its_builtin(
    error: Exception, builtin: type[Exception], attributes: dict[str, object]
) -> None:
    """Every error is a RunstoreError and also the builtin that fits."""
    assert isinstance(error, RunstoreError)
    assert isinstance(error, builtin)


@pytest.mark.parametrize(("error", "builtin", "attributes"), ERRORS, ids=ERROR_IDS)
def test_error_pickle_round_trip_keeps_attributes(
    error: Exception, builtin: type[Exception], attributes: dict[str, object]
) -> None:
    """An error survives pickling with its type, attributes and message."""
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error)
    assert str(clone) == str(error)
    assert clone.args == error.args
    for name, value in attributes.items():
        assert getattr(clone, name) == value, name
        assert getattr(error, name) == value, name


def test_store_io_error_pickles_its_cause() -> None:
    """StoreIOError keeps its OSError cause (errno included) through pickling."""
    error = StoreIOError("/s/runs.jsonl", "syncing", OSError(errno.ENOSPC, "No space left"))
    clone = pickle.loads(pickle.dumps(error))
    assert clone.errno == errno.ENOSPC
    assert clone.cause.errno == errno.ENOSPC


def test_lock_timeout_error_names_lock_file_and_timeout() -> None:
    """LockTimeoutError's message names the lock file and the timeout."""
    message = str(LockTimeoutError("/s/runs.lock", 0.25))
    assert "/s/runs.lock" in message
    assert "0.25" in message


def test_corrupt_store_error_names_file_offset_problem_and_remedy() -> None:
    """CorruptStoreError's message names the file, the offset, the problem and a remedy."""
    message = str(CorruptStoreError("/s/runs.jsonl", 4242, "checksum mismatch"))
    assert "/s/runs.jsonl" in message
    assert "4242" in message
    assert "checksum mismatch" in message
    assert "restore" in message or "backup" in message


def test_table_lock_timeout_error_points_at_pg_locks() -> None:
    """TableLockTimeoutError names the table and the timeout and says where to look."""
    message = str(TableLockTimeoutError("table runs on db:5432", 0.25))
    assert "table runs on db:5432" in message and "0.25" in message
    assert "pg_locks" in message


def test_database_error_says_whether_the_change_was_applied() -> None:
    """DatabaseError's message says rolled back, or unknown when the COMMIT failed."""
    assert "rolled back" in str(DatabaseError("db", "updating", "disk full"))
    assert "may or may not" in str(DatabaseError("db", "updating", "disk full", None))
    lost = str(DatabaseConnectionError("db", "reading", "server closed the connection"))
    assert "rolled back" in lost and "reconnects" in lost


def test_errors_are_exported_from_the_package() -> None:
    """Every error class is reachable as runstore.<Name> and listed in __all__."""
    for name in [*ERROR_IDS, "RunstoreError"]:
        assert name in runstore.__all__
        assert isinstance(getattr(runstore, name), type)


def test_a_database_error_names_the_action_without_a_dangling_preposition() -> None:
    from runstore import DatabaseError

    text = str(DatabaseError("host=/tmp dbname=ci", "listing runs in", "disk full"))
    assert text.startswith("listing runs on PostgreSQL host=/tmp dbname=ci failed (disk full)")


def test_the_cli_gives_a_table_lock_timeout_its_own_hint() -> None:
    from runstore import TableLockTimeoutError
    from runstore.cli import message_for

    text = message_for(TableLockTimeoutError("table 'runs' on dbname=ci", 2.0))
    assert "pg_locks" in text and "fuser" not in text and "--lock-timeout" in text
