"""The pure rules of the run state machine and of what a valid run is. No I/O here.

Allowed moves: pending -> running | failed | interrupted | timeout; running -> any terminal
status. Staying in a non-terminal status while other fields change is an update. Terminal
states are final: repeating the same terminal transition is an idempotent no-op, anything else
is refused. Also here: which change-feed type a move is, and how the status arguments of
``finish()`` and ``list()`` are read. Both backends use these rules.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable

import attrs

from . import _validate
from .errors import ConflictError, InvalidRunError, InvalidTransitionError
from .model import ChangeType, Run, Status, replace_run

ALLOWED: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset(
        {Status.PENDING, Status.RUNNING, Status.FAILED, Status.INTERRUPTED, Status.TIMEOUT}
    ),
    Status.RUNNING: frozenset(
        {Status.RUNNING, Status.COMPLETED, Status.FAILED, Status.INTERRUPTED, Status.TIMEOUT}
    ),
}

#: fields that identify a run's claim on a machine; changing them could break the
#: one-active-run-per-machine rule, so ``update()`` refuses it
IDENTITY_FIELDS = ("machine", "test_dir_hash")


def check_transition(run_id: str, old: Status, new: Status) -> None:
    """Raise ``InvalidTransitionError`` unless a run may move from ``old`` to ``new``."""
    if old.is_terminal:
        if old != new:
            raise InvalidTransitionError(run_id, old.value, new.value, "terminal states are final")
        return
    if new not in ALLOWED[old]:
        raise InvalidTransitionError(
            run_id, old.value, new.value, f"a {old.value} run may only go to "
            + ", ".join(sorted(s.value for s in ALLOWED[old] if s != old))
        )


def require_seq(name: str, value: object) -> int:
    """A change-feed sequence number: a non-negative int (within 64 bits)."""
    return _validate.seq(name, value)


def require_text(name: str, value: object) -> str:
    """Return ``value`` when it is a non-empty string both backends can store (no NUL, no
    lone surrogate), else raise ``InvalidRunError``."""
    return _validate.text(name, value)


def validate(run: Run) -> Run:
    """Check the types and invariants of a run about to be stored; return it in UTC form
    (``_validate.run``: the rules both backends share)."""
    return _validate.run(run)


def check_update(stored: Run, new: Run) -> None:
    """Raise unless ``new`` may replace ``stored`` (same identity, allowed transition)."""
    for name in IDENTITY_FIELDS:
        if getattr(stored, name) != getattr(new, name):
            raise InvalidRunError(
                f"run {stored.id!r}: {name} cannot change ({getattr(stored, name)!r} -> "
                f"{getattr(new, name)!r}); create a new run instead"
            )
    check_transition(stored.id, stored.status, new.status)


def same_content(a: Run, b: Run) -> bool:
    """True when two versions differ at most in ``revision``."""
    return attrs.evolve(a, revision=0) == attrs.evolve(b, revision=0)


def change_type(old: Status, new: Status) -> ChangeType:
    """The kind of change a run's move from ``old`` to ``new`` is, for the change feed."""
    if new is old:
        return ChangeType.RUN_UPDATED
    if new is Status.RUNNING:
        return ChangeType.RUN_STARTED
    return ChangeType.RUN_FINISHED if new.is_terminal else ChangeType.RUN_UPDATED


def terminal_status(run_id: str, status: Status | str) -> Status:
    """``status`` as a terminal ``Status`` for ``finish()``; ``InvalidRunError`` when it is no
    status, ``InvalidTransitionError`` when it is not a terminal one."""
    try:
        target = Status(status)
    except ValueError:
        raise InvalidRunError(f"unknown status {status!r}; use one of "
                              + ", ".join(s.value for s in Status)) from None
    if not target.is_terminal:
        raise InvalidTransitionError(run_id, "?", target.value,
                                     "finish() needs a terminal status "
                                     "(completed, failed, interrupted or timeout)")
    return target


def status_set(status: Status | str | Iterable[Status | str] | None) -> frozenset[Status] | None:
    """The ``status=`` filter of ``list()`` as a set of statuses (None: no filter);
    ``InvalidRunError`` names an unknown one."""
    if status is None:
        return None
    try:
        items = [status] if isinstance(status, str) else list(status)
    except TypeError:
        raise InvalidRunError(f"status must be a status, a list of statuses or None, got "
                              f"{status!r}") from None
    try:
        return frozenset(Status(s) for s in items)
    except ValueError:
        raise InvalidRunError(f"unknown status in {status!r}") from None


# -- the next version of a stored run: the decision each write method makes, for both backends

#: a stored change: the run's new version and the kind of change; None means "no change"
Step = tuple[Run, ChangeType]
#: (host, pid, process start) of the process that owns a non-terminal run
Owner = tuple[str, int, str]


def check_made(made: object, machine: str, test_dir_hash: str) -> Run:
    """The run ``make()`` returned to ``prepare_atomic``, refused unless it is a ``Run`` for
    that machine and hash."""
    if not isinstance(made, Run):
        raise InvalidRunError(f"make() must return a runstore.Run, got {made!r}")
    if made.machine != machine or made.test_dir_hash != test_dir_hash:
        raise InvalidRunError(
            f"make() returned a run for machine {made.machine!r} and hash "
            f"{made.test_dir_hash!r}; prepare_atomic was asked for machine "
            f"{machine!r} and hash {test_dir_hash!r}")
    return made


def as_pending(made: Run) -> Run:
    """The run ``make()`` returned, as the pending run ``prepare_atomic`` stores (its own
    status, whatever it was, is replaced)."""
    return made if made.status is Status.PENDING else replace_run(made, status=Status.PENDING)


def fresh(run: Run, run_id: str, owner: Owner) -> Run:
    """The first stored version of a validated ``run``: ``run_id``, revision 1 and, when it
    is non-terminal, ``owner`` (a terminal run has none)."""
    if run.status.is_terminal:
        return replace_run(run, id=run_id, revision=1)
    host, pid, since = owner
    return replace_run(run, id=run_id, revision=1, owner_host=host, owner_pid=pid,
                       owner_start=since)


def next_revision(run: Run) -> int:
    """``run``'s revision after one more change; ``InvalidRunError`` when that would pass
    the signed 64-bit range (a run imported with a revision at its end)."""
    if run.revision >= _validate.INT64_MAX:
        raise InvalidRunError(
            f"run {run.id!r}: revision {run.revision} is the largest a run store keeps, so "
            "the run cannot change again; import it with a smaller revision")
    return run.revision + 1


def updated(stored: Run, run: Run) -> Step | None:
    """``update(run)``: refuse a stale copy, a forbidden move or an identity change; None
    for an unchanged copy of a terminal run."""
    if run.revision != stored.revision:
        raise ConflictError(run.id, run.revision, stored.revision)
    check_update(stored, run)
    if stored.status.is_terminal:
        if same_content(stored, run):
            return None
        raise InvalidTransitionError(run.id, stored.status.value, run.status.value,
                                     "terminal runs are final")
    new = replace_run(run, revision=next_revision(stored))
    return new, change_type(stored.status, new.status)


def started(stored: Run, now: _dt.datetime, owner: Owner) -> Step:
    """``start()``: pending -> running, owned by ``owner`` from ``now``."""
    if stored.status is not Status.PENDING:
        raise InvalidTransitionError(stored.id, stored.status.value, Status.RUNNING.value,
                                     "only a pending run can be started")
    host, pid, since = owner
    new = replace_run(stored, status=Status.RUNNING, started_at=now, owner_host=host,
                      owner_pid=pid, owner_start=since, revision=next_revision(stored))
    return new, ChangeType.RUN_STARTED


def check_finish(exit_code: object, error_code: object, error_msg: object) -> None:
    """Refuse ``finish()`` arguments that neither backend stores, before any lock is taken
    (the run id is checked by ``_validate.finish``)."""
    _validate.finish("-", exit_code, error_code, error_msg)


def finished(stored: Run, target: Status, now: _dt.datetime, exit_code: int | None,
             error_code: str, error_msg: str) -> Step | None:
    """``finish()``: to the terminal ``target`` at ``now``; None when already there."""
    if stored.status is target:
        return None
    check_transition(stored.id, stored.status, target)
    new = replace_run(stored, status=target, ended_at=now, exit_code=exit_code,
                      error_code=error_code, error_msg=error_msg,
                      revision=next_revision(stored))
    return new, ChangeType.RUN_FINISHED


def beat(stored: Run, now: _dt.datetime) -> Step:
    """``heartbeat()``: a non-terminal run's ``heartbeat_at`` set to ``now``."""
    if stored.status.is_terminal:
        raise InvalidTransitionError(stored.id, stored.status.value, stored.status.value,
                                     "a finished run takes no heartbeat")
    new = replace_run(stored, heartbeat_at=now, revision=next_revision(stored))
    return new, ChangeType.HEARTBEAT
