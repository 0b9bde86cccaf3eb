"""Run ids: a UTC timestamp prefix that sorts lexicographically plus a random suffix.

The store passes the greatest id it has seen,
so an id created later in a store sorts after every earlier one even if the wall clock steps
back (the prefix is then taken one microsecond after the previous one). When the greatest id
is not a runstore id, or its time is the last microsecond ``datetime`` can hold (an imported
id of year 9999), a new id is that id, ``.~``, a fixed-width counter and a random suffix: it
still sorts after it, and ids after it do not grow.
"""

from __future__ import annotations

import datetime as _dt
import os
import re

_PREFIX_LEN = len("20260101T000000.000000Z")
_FORMAT = "%Y%m%dT%H%M%S.%fZ"
#: an id prefix as ``_prefix`` writes it (ASCII digits only), its fields as groups
_PREFIX = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})T([0-9]{2})([0-9]{2})([0-9]{2})"
                     r"\.([0-9]{6})Z")
#: an id made after an imported id of another shape: that id, ".~", a counter, "-", random
_FOREIGN = re.compile(r"(.*)\.~([0-9a-f]{16})-[0-9a-f]{8}", re.DOTALL)
_MICROSECOND = _dt.timedelta(microseconds=1)
#: the first count the 16 hex digits of ``_FOREIGN``'s counter cannot hold
_COUNTER_END = 1 << 64


def utcnow() -> _dt.datetime:
    """The current time, in UTC (every time a store records: ids, changes, heartbeats)."""
    return _dt.datetime.now(_dt.UTC)


def time_of(run_id: str) -> _dt.datetime | None:
    """When a run id made by ``new_run_id`` was made (its prefix), or None for an id of
    another shape (an imported one)."""
    moment = _parse_prefix(run_id[:_PREFIX_LEN])
    return None if moment is None else moment.replace(tzinfo=_dt.UTC)


def _parse_prefix(text: str) -> _dt.datetime | None:
    """The (naive UTC) time of an id prefix in ``_prefix``'s form, or None for any other
    text, a date or time that does not exist included: what ``strptime(text, _FORMAT)``
    gives, at a quarter of its cost or less (1.8 us against 6.9 us on a prefix, 0.2 us
    against 3.2 us on an id of another shape: ids are made inside the store's lock, and
    every id made after an imported id of another shape reads it)."""
    match = _PREFIX.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, micro = map(int, match.groups())
    try:
        return _dt.datetime(year, month, day, hour, minute, second, micro)
    except ValueError:
        return None


def new_run_id(after: str = "", now: _dt.datetime | None = None) -> str:
    """Return a new id that sorts after ``after`` (the greatest id the store holds)."""
    moment = now.astimezone(_dt.UTC) if now is not None else utcnow()
    prefix = _prefix(moment)
    last = after[:_PREFIX_LEN]
    if prefix <= last:
        then = _parse_prefix(last)
        if then is not None and then < _dt.datetime.max:
            prefix = _prefix(then + _MICROSECOND)
        else:
            # an imported id with another shape, or at the end of time, sorts last: count up
            # a fixed-width suffix on it (suffixing each new id to the previous one made ids
            # grow with every run); a full counter starts again on the whole id (a wider
            # one would sort before it)
            match = _FOREIGN.fullmatch(after)
            count = int(match[2], 16) + 1 if match else _COUNTER_END
            stem, count = (match[1], count) if match and count < _COUNTER_END else (after, 0)
            return f"{stem}.~{count:016x}-{os.urandom(4).hex()}"
    return f"{prefix}-{os.urandom(8).hex()}"


def _prefix(m: _dt.datetime) -> str:
    """``m.strftime(_FORMAT)`` at twice its speed (ids are made inside the store's lock;
    an f-string with format specs is as slow as strftime here, hence ``%``)."""
    return "%04d%02d%02dT%02d%02d%02d.%06dZ" % (  # noqa: UP031
        m.year, m.month, m.day, m.hour, m.minute, m.second, m.microsecond)
