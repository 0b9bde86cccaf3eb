"""The pure rules: which status changes are allowed, what a valid run is, what update() may
change."""

from __future__ import annotations

import datetime as _dt
import itertools

import attrs
import pytest
from hypothesis import given
from strategies import aware_datetimes, runs, statuses

from runstore import (
    ChangeType,
    ConflictError,
    InvalidRunError,
    InvalidTransitionError,
    Run,
    Status,
    _transitions as transitions,
)
from runstore._transitions import (
    change_type,
    check_transition,
    check_update,
    require_text,
    same_content,
    status_set,
    terminal_status,
    validate,
)

P, R = Status.PENDING, Status.RUNNING
TERMINAL = (Status.COMPLETED, Status.FAILED, Status.INTERRUPTED, Status.TIMEOUT)

#: the contract's moves between different states
ALLOWED_MOVES = {
    (P, R), (P, Status.FAILED), (P, Status.INTERRUPTED), (P, Status.TIMEOUT),
    *((R, t) for t in TERMINAL),
}


@pytest.mark.parametrize(("old", "new"), sorted(ALLOWED_MOVES))
def test_allowed_moves_pass(old: Status, new: Status) -> None:
    """pending -> running|failed|interrupted|timeout and running -> any terminal are allowed."""
    check_transition("r1", old, new)


FORBIDDEN_MOVES = [
    (old, new) for old, new in itertools.product(Status, Status)
    if old != new and (old, new) not in ALLOWED_MOVES
]


@pytest.mark.parametrize(("old", "new"), FORBIDDEN_MOVES)
def test_other_moves_are_refused(old: Status, new: Status) -> None:
    """Every other change of status raises InvalidTransitionError naming both states."""
    with pytest.raises(InvalidTransitionError) as info:
        check_transition("r1", old, new)
    assert (info.value.run_id, info.value.from_status, info.value.to_status) == (
        "r1", old.value, new.value)
    assert old.value in str(info.value) and new.value in str(info.value)


def test_pending_cannot_complete_without_running() -> None:
    """pending -> completed is refused: a run completes only after it ran."""
    with pytest.raises(InvalidTransitionError):
        check_transition("r1", P, Status.COMPLETED)


@pytest.mark.parametrize("status", list(Status))
def test_staying_in_a_status_passes(status: Status) -> None:
    """Keeping the status (an update of other fields, or a repeated terminal) is allowed."""
    check_transition("r1", status, status)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(TERMINAL, Status)))
def test_terminal_states_are_final(old: Status, new: Status) -> None:
    """A terminal run can only stay where it is."""
    if old == new:
        check_transition("r1", old, new)
    else:
        with pytest.raises(InvalidTransitionError):
            check_transition("r1", old, new)


# -- validate -------------------------------------------------------------------------------


@given(runs())
def test_validate_accepts_every_well_formed_run(run: Run) -> None:
    """A run with aware UTC datetimes and proper types passes validate() unchanged."""
    assert validate(run) == run


@given(aware_datetimes)
def test_validate_converts_aware_datetimes_to_utc(moment: _dt.datetime) -> None:
    """An aware datetime in another offset is stored as the same instant in UTC."""
    run = validate(Run("m1", "/t", "h", started_at=moment, ended_at=moment, heartbeat_at=moment))
    for value in (run.started_at, run.ended_at, run.heartbeat_at):
        assert value == moment
        assert value is not None and value.utcoffset() == _dt.timedelta(0)


@pytest.mark.parametrize("field", ["started_at", "ended_at", "heartbeat_at"])
def test_validate_refuses_naive_datetimes(field: str) -> None:
    """A naive datetime is refused with InvalidRunError naming the field."""
    run = attrs.evolve(Run("m1", "/t", "h"), **{field: _dt.datetime(2026, 1, 1, 12, 0)})
    with pytest.raises(InvalidRunError, match=field):
        validate(run)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("machine", ""),
        ("machine", "m\x00"),
        ("test_dir_hash", ""),
        ("machine", 7),
        ("status", "bogus"),
        ("exit_code", "1"),
        ("exit_code", True),
        ("exit_code", 1.5),
        ("owner_pid", "12"),
        ("logs_path", None),
        ("batch_id", 3),
        ("started_at", "2026-01-01T00:00:00Z"),
    ],
)
def test_validate_refuses_bad_fields(field: str, value: object) -> None:
    """Wrong types, empty identity fields, NULs and unknown statuses raise InvalidRunError."""
    run = attrs.evolve(Run("m1", "/t", "h"), **{field: value})
    with pytest.raises(InvalidRunError):
        validate(run)


def test_validate_accepts_status_given_as_string() -> None:
    """A status given as its string value is stored as the Status member."""
    run = validate(attrs.evolve(Run("m1", "/t", "h"), status="running"))
    assert run.status is Status.RUNNING


def test_validate_refuses_non_runs() -> None:
    """Anything but a Run is refused with InvalidRunError."""
    with pytest.raises(InvalidRunError):
        validate({"machine": "m1"})  # type: ignore[arg-type]  # the point of the test


def test_require_text_returns_the_value() -> None:
    """require_text passes a non-empty string through."""
    assert require_text("machine", "m1") == "m1"


# -- check_update / same_content ------------------------------------------------------------


@pytest.mark.parametrize("field", ["machine", "test_dir_hash"])
def test_check_update_refuses_identity_changes(field: str) -> None:
    """Changing machine or test_dir_hash through update() is an InvalidRunError."""
    stored = Run("m1", "/t", "h", id="r1", revision=1)
    with pytest.raises(InvalidRunError, match=field):
        check_update(stored, attrs.evolve(stored, **{field: "other"}))


def test_check_update_allows_other_field_changes() -> None:
    """Changing test_dir, paths, batch or status along an allowed move passes."""
    stored = Run("m1", "/t", "h", id="r1", revision=1)
    check_update(stored, attrs.evolve(stored, test_dir="/u", logs_path="/l", batch_id="b",
                                      status=Status.RUNNING))


@given(statuses, statuses)
def test_check_update_applies_the_transition_rules(old: Status, new: Status) -> None:
    """check_update refuses exactly the status changes check_transition refuses."""
    stored = Run("m1", "/t", "h", id="r1", status=old)
    allowed = old == new or (old, new) in ALLOWED_MOVES
    if allowed:
        check_update(stored, attrs.evolve(stored, status=new))
    else:
        with pytest.raises(InvalidTransitionError):
            check_update(stored, attrs.evolve(stored, status=new))


@given(runs())
def test_same_content_ignores_only_the_revision(run: Run) -> None:
    """Two versions differing only in revision have the same content; any other field not."""
    assert same_content(run, attrs.evolve(run, revision=run.revision + 3))
    assert not same_content(run, attrs.evolve(run, logs_path=run.logs_path + "x"))


# -- change_type / terminal_status / status_set -------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (P, P, ChangeType.RUN_UPDATED),
        (R, R, ChangeType.RUN_UPDATED),
        (Status.FAILED, Status.FAILED, ChangeType.RUN_UPDATED),
        (P, R, ChangeType.RUN_STARTED),
        *((P, t, ChangeType.RUN_FINISHED) for t in (Status.FAILED, Status.INTERRUPTED)),
        *((R, t, ChangeType.RUN_FINISHED) for t in TERMINAL),
    ],
)
def test_change_type_names_the_move(old: Status, new: Status, expected: ChangeType) -> None:
    """Same status: updated; to running: started; to a terminal status: finished."""
    assert change_type(old, new) is expected


@pytest.mark.parametrize("status", [*TERMINAL, *(t.value for t in TERMINAL)])
def test_terminal_status_accepts_terminal_statuses(status: Status | str) -> None:
    """A terminal Status, or its string value, comes back as the Status member."""
    assert terminal_status("r1", status) is Status(status)


@pytest.mark.parametrize("status", [P, R, "pending", "running"])
def test_terminal_status_refuses_non_terminal_ones(status: Status | str) -> None:
    """pending or running is an InvalidTransitionError naming the run and the status."""
    with pytest.raises(InvalidTransitionError, match="needs a terminal status") as info:
        terminal_status("r1", status)
    assert (info.value.run_id, info.value.to_status) == ("r1", Status(status).value)


def test_terminal_status_refuses_unknown_ones() -> None:
    """An unknown status is an InvalidRunError listing the known ones."""
    with pytest.raises(InvalidRunError, match="unknown status 'done'; use one of pending"):
        terminal_status("r1", "done")


def test_status_set_reads_every_form() -> None:
    """None means no filter; one status or any iterable of them becomes a frozenset."""
    assert status_set(None) is None
    assert status_set("running") == frozenset({R})
    assert status_set(Status.FAILED) == frozenset({Status.FAILED})
    assert status_set(["pending", R]) == frozenset({P, R})
    assert status_set(()) == frozenset()


def test_status_set_refuses_unknown_statuses() -> None:
    """An unknown status in the filter is an InvalidRunError quoting the argument."""
    with pytest.raises(InvalidRunError, match=r"unknown status in \['running', 'done'\]"):
        status_set(["running", "done"])


def test_the_next_version_rules_are_pure_and_shared() -> None:
    """What each write method stores, decided without a store (both backends call these)."""
    now = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)
    pending = Run("m", "/t", "h", id="r1", revision=1)
    running, change = transitions.started(pending, now, ("host", 7, "s"))
    assert change is ChangeType.RUN_STARTED and running.revision == 2
    assert (running.owner_host, running.owner_pid, running.started_at) == ("host", 7, now)
    with pytest.raises(InvalidTransitionError):
        transitions.started(running, now, ("host", 7, "s"))
    step = transitions.finished(running, Status.FAILED, now, 3, "e", "m")
    assert step is not None and step[1] is ChangeType.RUN_FINISHED
    done = step[0]
    assert done.exit_code == 3 and done.ended_at == now
    assert transitions.finished(done, Status.FAILED, now, 3, "e", "m") is None  # idempotent
    assert transitions.updated(done, done) is None
    with pytest.raises(ConflictError):
        transitions.updated(running, pending)
    assert transitions.beat(running, now)[0].heartbeat_at == now
    with pytest.raises(InvalidTransitionError):
        transitions.beat(done, now)
    with pytest.raises(InvalidRunError):
        transitions.check_finish("0", "", "")
    with pytest.raises(InvalidRunError, match="asked for machine 'other'"):
        transitions.check_made(pending, "other", "h")
