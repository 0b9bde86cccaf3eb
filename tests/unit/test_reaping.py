"""The reaping rule both backends share: owner gone, or no heartbeat nor change for too long."""

from __future__ import annotations

import datetime as _dt

import pytest

from runstore import Run, Status
from runstore._reaping import reaped

NOW = _dt.datetime(2026, 3, 1, 12, 0, tzinfo=_dt.UTC)
MINUTE = _dt.timedelta(minutes=1)
RUN = Run("m1", "/t", "h", id="r1", status=Status.RUNNING, revision=3,
          owner_host="host-a", owner_pid=4242, owner_start="boot:1")


def _gone(host: str, pid: int | None, start: str) -> bool:
    return True


def _alive(host: str, pid: int | None, start: str) -> bool:
    return False


def test_a_gone_owner_is_reaped_without_stale_after() -> None:
    """A run whose owner is gone becomes interrupted with owner_gone, next revision."""
    dead = reaped(RUN, None, NOW, None, is_gone=_gone)
    assert dead is not None
    assert (dead.status, dead.ended_at, dead.error_code, dead.revision) == (
        Status.INTERRUPTED, NOW, "owner_gone", 4)
    assert dead.error_msg == "reaped: owner process 4242 on host-a is gone"


def test_an_alive_owner_is_kept_without_stale_after() -> None:
    """Without stale_after only a gone owner counts, however old the last change."""
    assert reaped(RUN, NOW - 1000 * MINUTE, NOW, None, is_gone=_alive) is None


def test_the_owner_is_judged_by_host_pid_and_start() -> None:
    """is_gone is asked about the run's owner_host, owner_pid and owner_start."""
    asked = []

    def is_gone(host: str, pid: int | None, start: str) -> bool:
        asked.append((host, pid, start))
        return False

    reaped(RUN, None, NOW, None, is_gone=is_gone)
    assert asked == [("host-a", 4242, "boot:1")]


@pytest.mark.parametrize(
    ("heartbeat", "last_change", "stale"),
    [
        (NOW - 2 * MINUTE, None, True),
        (None, NOW - 2 * MINUTE, True),
        (NOW - MINUTE, None, False),  # exactly stale_after old: not yet
        (NOW - MINUTE / 2, NOW - 2 * MINUTE, False),  # the heartbeat wins
        (None, None, False),  # nothing to judge by
    ],
)
def test_stale_after_judges_the_heartbeat_else_the_last_change(
    heartbeat: _dt.datetime | None, last_change: _dt.datetime | None, stale: bool
) -> None:
    """With stale_after, a run silent for longer than that is reaped as heartbeat_stale."""
    run = Run("m1", "/t", "h", id="r1", status=Status.RUNNING, revision=1,
              heartbeat_at=heartbeat)
    dead = reaped(run, last_change, NOW, MINUTE, is_gone=_alive)
    assert (dead is not None) == stale
    if dead is not None:
        assert dead.error_code == "heartbeat_stale"
        assert dead.error_msg == ("reaped: no heartbeat or change since 2026-03-01T11:58:00Z "
                                  "(more than 60 s)")


def test_stale_message_shows_the_instant_in_utc() -> None:
    """A last change given in another offset is shown as the same instant in UTC (Z)."""
    east = _dt.timezone(_dt.timedelta(hours=2))
    last = (NOW - 2 * MINUTE).astimezone(east)
    dead = reaped(RUN, last, NOW, MINUTE, is_gone=_alive)
    assert dead is not None and "since 2026-03-01T11:58:00Z" in dead.error_msg


def test_a_gone_owner_wins_over_a_fresh_heartbeat() -> None:
    """owner_gone is reported even when the heartbeat is recent."""
    run = Run("m1", "/t", "h", id="r1", status=Status.RUNNING, revision=1, heartbeat_at=NOW,
              owner_host="host-a", owner_pid=1)
    dead = reaped(run, None, NOW, MINUTE, is_gone=_gone)
    assert dead is not None and dead.error_code == "owner_gone"


def test_a_foreign_owner_is_never_gone() -> None:
    """With the real is_gone, an owner on another host is never judged gone."""
    run = Run("m1", "/t", "h", id="r1", status=Status.RUNNING, revision=1,
              owner_host="surely-not-this-host.invalid", owner_pid=1)
    assert reaped(run, None, NOW, None) is None
