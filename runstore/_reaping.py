"""When a non-terminal run is abandoned, and the interrupted version that replaces it.

One rule for both backends: a run is reaped when its owner process on this host is provably
gone (``error_code="owner_gone"``) or, when a ``stale_after`` is given, when neither a
heartbeat nor a change came for longer than that (``"heartbeat_stale"``), unless its owner
process on this host provably still runs. Staleness compares wall-clock times, which a step
of the clock (NTP, a resumed virtual machine) moves by any amount: it is the judge only for
runs whose owner cannot be asked (another host, or no start time known), never over a live
owner's word. Pure apart from asking the operating system whether the owner still runs
(``owner.is_gone`` and ``owner.is_alive``, replaceable).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable

import attrs

from . import _owner, _transitions, _validate
from .model import Run, Status


def check_stale_after(stale_after: object) -> None:
    """Refuse a ``reap()`` threshold that is not a non-negative timedelta (or reaches back
    before the year 1)."""
    _validate.duration("stale_after", stale_after)


def reaped(
    run: Run,
    last_change: _dt.datetime | None,
    now: _dt.datetime,
    stale_after: _dt.timedelta | None,
    *,
    is_gone: Callable[[str, int | None, str], bool] = _owner.is_gone,
    is_alive: Callable[[str, int | None, str], bool] | None = None,
) -> Run | None:
    """The interrupted version of ``run`` (ended at ``now``, next revision) if its owner is
    gone or (with ``stale_after``) its last heartbeat, else ``last_change``, is more than
    ``stale_after`` before ``now`` and its owner is not provably alive (``is_alive``,
    default ``owner.is_alive``, asked only then); else None."""
    if is_gone(run.owner_host, run.owner_pid, run.owner_start):
        code = "owner_gone"
        msg = f"reaped: owner process {run.owner_pid} on {run.owner_host} is gone"
    elif stale_after is not None:
        last = run.heartbeat_at or last_change
        if last is None or now - last <= stale_after:
            return None
        if (is_alive or _owner.is_alive)(run.owner_host, run.owner_pid, run.owner_start):
            return None  # its owner runs here: wall-clock silence alone proves nothing
        code = "heartbeat_stale"
        since = last.astimezone(_dt.UTC).isoformat().replace("+00:00", "Z")
        msg = (f"reaped: no heartbeat or change since {since} "
               f"(more than {stale_after.total_seconds():g} s)")
    else:
        return None
    return attrs.evolve(run, status=Status.INTERRUPTED, ended_at=now, error_code=code,
                        error_msg=msg, revision=_transitions.next_revision(run))
