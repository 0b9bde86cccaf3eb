"""The argument checks of the run-store contract, shared by both backends.

Every public method of ``Store`` and ``PostgresStore`` (and their constructors) checks its
arguments here, before it takes a lock or opens a transaction, so that both backends refuse
the same inputs with the same ``InvalidRunError`` and message, and a refused call changes
nothing. The rules are the stricter of what the two can store:

- text (ids, machines, hashes, every string field of a run, filters): no NUL character
  (PostgreSQL text cannot hold one) and no lone surrogate (not encodable as UTF-8);
- integers of a run (``exit_code``, ``owner_pid``, ``revision``) and sequence numbers: the
  signed 64-bit range (PostgreSQL ``bigint``);
- datetimes: timezone-aware, and representable in UTC (``datetime.max`` with a negative
  offset is not);
- seconds (``lock_timeout``, ``watch``'s ``timeout`` and ``poll_interval``): a finite
  number from 0 to ``MAX_SECONDS``; ``inf`` and ``nan`` are refused (pass ``None`` to
  ``watch`` for no limit);
- durations (``reap``'s ``stale_after``, ``prune``'s ``older_than``): a non-negative
  ``timedelta`` that reaches back no further than the year 1 from now.

No I/O here.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import attrs

from .errors import InvalidRunError
from .model import Run, Status

#: the signed 64-bit range: PostgreSQL's ``bigint``, and so what both backends store
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
#: the longest wait in seconds: PostgreSQL's longest ``lock_timeout`` (2**31 - 1 ms, about
#: 24.8 days); the file store keeps to it too, so both accept the same timeouts
MAX_SECONDS = 2_147_483.0

#: the string fields of a run besides its id, machine and hash (which must not be empty)
_TEXT_FIELDS = ("test_dir", "artifacts_path", "logs_path", "error_code", "error_msg",
                "batch_id", "plan_entry", "owner_host", "owner_start")
_INT_FIELDS = ("exit_code", "owner_pid")
_TIME_FIELDS = ("started_at", "ended_at", "heartbeat_at")
_DATETIME, _UTC = _dt.datetime, _dt.UTC


# -- the building blocks -------------------------------------------------------------------


def storable(name: str, value: str) -> str:
    """``value`` (a string) when both backends can store it: no NUL, no lone surrogate."""
    if value.isascii() and "\x00" not in value:  # the common case, at once
        return value
    if "\x00" in value:
        raise InvalidRunError(f"{name} must not contain NUL characters, got {value!r}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRunError(
                f"{name} must not contain lone surrogates (not encodable as UTF-8), got "
                f"{value!r}") from None
    return value


def text(name: str, value: object) -> str:
    """A non-empty, storable string (an id, a machine, a hash)."""
    if type(value) is str and value and value.isascii() and "\x00" not in value:
        return value  # the common case, at once (the checks below say what is wrong)
    if not isinstance(value, str) or not value:
        raise InvalidRunError(f"{name} must be a non-empty string, got {value!r}")
    return storable(name, value)


def run_id(value: object) -> str:
    """A run id: a non-empty, storable string."""
    if type(value) is str and value and value.isascii() and "\x00" not in value:
        return value  # as ``text`` does first, one call less for every call by id
    return text("run id", value)


def optional_text(name: str, value: object) -> str | None:
    """None, or a storable string (empty allowed): a ``list()`` filter."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRunError(f"{name} must be a string or None, got {value!r}")
    return storable(name, value)


def int64(name: str, value: object) -> None:
    """Refuse an int outside the signed 64-bit range (neither backend stores it)."""
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise InvalidRunError(f"{name} {value} is outside the signed 64-bit range "
                              "(-2**63 to 2**63 - 1), which is all a run store keeps")


def seq(name: str, value: object) -> int:
    """A change-feed sequence number: a non-negative int within 64 bits."""
    if type(value) is not int or value < 0:
        raise InvalidRunError(f"{name} must be a non-negative int, got {value!r}")
    int64(name, value)
    return value


def flag(name: str, value: object) -> bool:
    """A yes/no argument: ``True`` or ``False`` (not a truthy string or number)."""
    if not isinstance(value, bool):
        raise InvalidRunError(f"{name} must be True or False, got {value!r}")
    return value


def seconds(name: str, value: object, *, none_means: str = "") -> float | None:
    """A number of seconds: finite, from 0 to ``MAX_SECONDS``; ``inf`` and ``nan`` are
    refused. With ``none_means`` (what None stands for, e.g. "no limit") None is allowed
    and returned."""
    if value is None and none_means:
        return None
    alternative = f", or None for {none_means}" if none_means else ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRunError(f"{name} must be a number of seconds{alternative}, "
                              f"got {value!r}")
    if not 0 <= value <= MAX_SECONDS:  # False for nan, too
        raise InvalidRunError(
            f"{name} must be a finite number of seconds from 0 to {MAX_SECONDS:.0f} (about "
            f"24.8 days){alternative}, got {value!r}")
    return float(value)


def duration(name: str, value: object) -> _dt.timedelta:
    """A non-negative ``timedelta`` that can be subtracted from now (it does not reach back
    before the year 1)."""
    if not isinstance(value, _dt.timedelta) or value < _dt.timedelta(0):
        raise InvalidRunError(f"{name} must be a non-negative timedelta, got {value!r}")
    try:
        _dt.datetime.now(_dt.UTC) - value
    except OverflowError:
        raise InvalidRunError(
            f"{name} must not reach back before the year 1 from now, got {value!r}; "
            "pass a shorter duration") from None
    return value


def instant(rid: str, name: str, value: object) -> _dt.datetime | None:
    """A run's timestamp: None, or a timezone-aware datetime, returned in UTC."""
    if value is None:
        return None
    if not isinstance(value, _dt.datetime):
        raise InvalidRunError(f"run {rid!r}: {name} must be a datetime or None, got {value!r}")
    offset = value.utcoffset() if value.tzinfo is not None else None
    if offset is None:
        raise InvalidRunError(
            f"run {rid!r}: {name} is a naive datetime ({value.isoformat()}); "
            "pass a timezone-aware one, e.g. datetime.now(timezone.utc)"
        )
    if offset == _dt.timedelta(0):
        return value
    try:
        return value.astimezone(_dt.UTC)
    except OverflowError:
        raise InvalidRunError(
            f"run {rid!r}: {name} {value.isoformat()} is outside the datetime range once "
            "converted to UTC (years 1 to 9999); pass a time within it") from None


def run(value: object) -> Run:
    """A run about to be stored, checked field by field (the id is checked by the callers
    that keep it: ``update`` and ``import_runs``); returned with its status a ``Status``
    and its timestamps in UTC."""
    if type(value) is Run:
        # the common case at a glance, every rule below at once: plain ASCII text without
        # NUL (a non-string fails the join), plain ints in range, times None or in UTC;
        # anything else goes through the checks field by field, which say what is wrong
        try:
            joined = "".join((value.machine, value.test_dir_hash, value.test_dir,
                              value.artifacts_path, value.logs_path, value.error_code,
                              value.error_msg, value.batch_id, value.plan_entry,
                              value.owner_host, value.owner_start))
        except TypeError:
            joined = "\x00"
        code, pid, revision = value.exit_code, value.owner_pid, value.revision
        started, ended, beat = value.started_at, value.ended_at, value.heartbeat_at
        if (value.machine and value.test_dir_hash and joined.isascii()
                and "\x00" not in joined and type(value.status) is Status
                and (code is None or (type(code) is int and INT64_MIN <= code <= INT64_MAX))
                and (pid is None or (type(pid) is int and INT64_MIN <= pid <= INT64_MAX))
                and type(revision) is int and INT64_MIN <= revision <= INT64_MAX
                and (started is None or (type(started) is _DATETIME and started.tzinfo is _UTC))
                and (ended is None or (type(ended) is _DATETIME and ended.tzinfo is _UTC))
                and (beat is None or (type(beat) is _DATETIME and beat.tzinfo is _UTC))):
            return value
    if not isinstance(value, Run):
        raise InvalidRunError(f"expected a runstore.Run, got {type(value).__name__}")
    rid = value.id or "<new>"
    text("machine", value.machine)
    text("test_dir_hash", value.test_dir_hash)
    changes: dict[str, Any] = {}
    if not isinstance(value.status, Status):
        try:
            changes["status"] = Status(value.status)
        except ValueError:
            raise InvalidRunError(f"run {rid!r}: unknown status {value.status!r}") from None
    # the messages are formatted only on failure: update() and create() pass here each time
    for name in _TEXT_FIELDS:
        field = getattr(value, name)
        if not isinstance(field, str):
            raise InvalidRunError(f"run {rid!r}: {name} must be a string")
        if "\x00" in field or not field.isascii():
            storable(f"run {rid!r}: {name}", field)
    for name in _INT_FIELDS:
        field = getattr(value, name)
        if field is None:
            continue
        if not isinstance(field, int) or isinstance(field, bool):
            raise InvalidRunError(f"run {rid!r}: {name} must be an int or None, got {field!r}")
        if not INT64_MIN <= field <= INT64_MAX:
            int64(f"run {rid!r}: {name}", field)
    revision = value.revision
    if not isinstance(revision, int) or isinstance(revision, bool):
        raise InvalidRunError(f"run {rid!r}: revision must be an int, got {revision!r}")
    if not INT64_MIN <= revision <= INT64_MAX:
        int64(f"run {rid!r}: revision", revision)
    for name in _TIME_FIELDS:
        field = getattr(value, name)
        utc = instant(rid, name, field)
        if utc is not field:
            changes[name] = utc
    return attrs.evolve(value, **changes) if changes else value


def path(name: str, value: object) -> str:
    """A file name (a ``str`` or ``os.PathLike``): non-empty, without NUL."""
    if not isinstance(value, str | os.PathLike):
        raise InvalidRunError(f"{name} must be a path (str or os.PathLike), got {value!r}")
    name_ = os.fspath(value)
    if not isinstance(name_, str) or not name_:
        raise InvalidRunError(f"{name} must be a non-empty path, got {value!r}")
    return storable(name, name_)


# -- the arguments of each method ------------------------------------------------------------


def options(durable: object, lock_timeout: object) -> float:
    """The constructor options both backends take; returns ``lock_timeout`` as a float."""
    flag("durable", durable)
    timeout = seconds("lock_timeout", lock_timeout)
    assert timeout is not None
    return timeout


def prepare_atomic(machine: object, test_dir_hash: object, make: object,
                   reap: object) -> None:
    """``prepare_atomic(machine, test_dir_hash, make, *, reap)``."""
    if not (type(machine) is str and machine and machine.isascii() and "\x00" not in machine):
        text("machine", machine)  # (as ``text`` does first, without a call in the common case)
    if not (type(test_dir_hash) is str and test_dir_hash and test_dir_hash.isascii()
            and "\x00" not in test_dir_hash):
        text("test_dir_hash", test_dir_hash)
    if not callable(make):
        raise InvalidRunError(f"make must be a callable returning a runstore.Run, "
                              f"got {make!r}")
    if reap is not False and reap is not True:
        flag("reap", reap)


def updated_run(value: object) -> Run:
    """``update(run)``: a valid run with a valid id."""
    checked = run(value)
    run_id(checked.id)
    return checked


def finish(run_id_: object, exit_code: object, error_code: object, error_msg: object) -> None:
    """``finish(run_id, status, *, exit_code, error_code, error_msg)`` (the status is read by
    ``transitions.terminal_status``)."""
    if not (type(run_id_) is str and run_id_ and run_id_.isascii() and "\x00" not in run_id_):
        run_id(run_id_)  # (as ``run_id`` does first, without a call in the common case)
    if exit_code is not None:
        if type(exit_code) is not int:
            raise InvalidRunError(f"exit_code must be an int or None, got {exit_code!r}")
        if not INT64_MIN <= exit_code <= INT64_MAX:
            int64("exit_code", exit_code)
    if not isinstance(error_code, str) or not isinstance(error_msg, str):
        raise InvalidRunError("error_code and error_msg must be strings")
    if error_code:
        storable("error_code", error_code)
    if error_msg:
        storable("error_msg", error_msg)


def list_filters(machine: object, batch_id: object) -> None:
    """``list(machine=, batch_id=)``: None or a storable string (``batch_id=""``: runs
    without a batch); a machine is never empty."""
    if machine is not None:
        text("machine", machine)
    optional_text("batch_id", batch_id)


def find(test_dir_hash: object, machine: object) -> None:
    """``find_by_test_dir_hash_and_machine(test_dir_hash, machine)``."""
    text("test_dir_hash", test_dir_hash)
    text("machine", machine)


def reap(stale_after: object, dry_run: object) -> None:
    """``reap(*, stale_after, dry_run)``."""
    duration("stale_after", stale_after)
    flag("dry_run", dry_run)


def prune(older_than: object, keep_last: object, archive: object, dry_run: object) -> None:
    """``prune(*, older_than, keep_last, archive, dry_run)``: exactly one of ``older_than``
    and ``keep_last``."""
    if (older_than is None) == (keep_last is None):
        raise InvalidRunError("prune() needs exactly one of older_than or keep_last")
    if keep_last is not None and (type(keep_last) is not int or keep_last < 0):
        raise InvalidRunError(f"keep_last must be a non-negative int, got {keep_last!r}")
    if keep_last is not None:
        int64("keep_last", keep_last)
    if older_than is not None:
        duration("older_than", older_than)
    if archive is not None:
        path("archive", archive)
    flag("dry_run", dry_run)


def watch(since_seq: object, timeout: object, poll_interval: object) -> None:
    """``watch(since_seq, *, timeout, poll_interval)``: None for ``since_seq`` is now, None
    for ``timeout`` is no limit (``inf`` is refused)."""
    if since_seq is not None:
        seq("since_seq", since_seq)
    seconds("timeout", timeout, none_means="no limit")
    seconds("poll_interval", poll_interval)


def export_target(fp: object, *, paths: bool) -> None:
    """``export(fp)``: a file object with a ``write`` method, or (``paths``) a file name."""
    if isinstance(fp, str | os.PathLike) and paths:
        path("export target", fp)
        return
    if not callable(getattr(fp, "write", None)):
        kind = "a file object with a write() method" + (" or a path" if paths else "")
        raise InvalidRunError(f"export needs {kind}, got {fp!r}")


def import_source(source: object) -> None:
    """``import_runs(source)``: a file object with ``read``, or an iterable of runs/dicts
    (not a string: to import a file by name, open it)."""
    if callable(getattr(source, "read", None)):
        return
    if isinstance(source, str | bytes | bytearray | os.PathLike):
        raise InvalidRunError(
            f"import_runs needs a file object or an iterable of runs, got {source!r}; to "
            "import a file by name, open it and pass the file")
    try:
        iter(source)  # type: ignore[call-overload]  # any object: refused if not iterable
    except TypeError:
        raise InvalidRunError(f"import_runs needs a file object or an iterable of runs, "
                              f"got {source!r}") from None

