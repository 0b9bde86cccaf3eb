"""The command line shows a time in local time as ``datetime.astimezone()`` gives it
(``_clifmt.local_text``: ``list`` shows a run older than 30 days by its local date), and
reads a date without an offset as local time as ``astimezone`` reads it
(``_clifmt.utc_of_local``). Both must agree with ``astimezone`` for every moment, around
every change of the local offset too: the zones below are POSIX TZ strings (no time zone
database needed), one changing at a whole hour of UTC, one by half an hour, one at one
minute past local midnight, which falls inside an hour of UTC time and moves the date, and
one changing twice within an hour of UTC time. Where the local time is outside datetime's
range (the first and last hours of the years 1 and 9999), ``astimezone`` raises; the
command line shows the time in UTC instead, and reads every local time whose UTC moment is
within the range."""

from __future__ import annotations

import datetime as _dt
import functools
import os
from collections.abc import Callable, Iterator

import pytest
from clocks import local_zone

from runstore import _clifmt as fmt

_ZONES = {
    "eastern": "EST5EDT,M3.2.0,M11.1.0",
    "half-hour change": "LHST-10:30LHDT-11,M10.1.0,M4.1.0",
    "past local midnight": "NST3:30NDT,M3.2.0/0:01,M11.1.0/0:01",
    "two changes within an hour": "AAA0BBB-1,J100/23:10,J100/24:40",
}
#: zones of one fixed offset: none, the most west of UTC, the most east
_FIXED = {"UTC": 0, "EST5": -5, "XXX-14": 14}
_STEP = _dt.timedelta(minutes=20)  # shorter than any time between two changes
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_HOUR = _dt.timedelta(hours=1)


@pytest.fixture(params=list(_ZONES))
def zone(request: pytest.FixtureRequest) -> Iterator[str]:
    with local_zone(_ZONES[request.param]):
        yield request.param


@pytest.fixture(params=list(_FIXED))
def fixed_zone(request: pytest.FixtureRequest) -> Iterator[int]:
    """The local zone set to a fixed one; its offset in hours."""
    with local_zone(request.param):
        yield _FIXED[request.param]


def _offset(moment: _dt.datetime) -> _dt.timedelta | None:
    return moment.astimezone().utcoffset()


def _changes() -> tuple[_dt.datetime, ...]:
    """The first moment of each new local offset in the 8 years from 2022, to the second."""
    return _changes_in(os.environ["TZ"])


@functools.cache
def _changes_in(tz: str) -> tuple[_dt.datetime, ...]:
    """``_changes`` in the local zone, which is ``tz`` (bisected)."""
    found = []
    at = _dt.datetime(2022, 1, 1, tzinfo=_dt.UTC)
    end = at + _dt.timedelta(days=365 * 8)
    while at < end:
        low, high = at, at + _STEP
        if _offset(low) != _offset(high):
            while high - low > _dt.timedelta(seconds=1):
                mid = low + (high - low) / 2
                low, high = (mid, high) if _offset(mid) == _offset(low) else (low, mid)
            found.append(high)
        at += _STEP
    return tuple(found)


def _around(change: _dt.datetime) -> Iterator[_dt.datetime]:
    """Every minute of the 3 hours around ``change`` and the microseconds next to it."""
    for minutes in range(-90, 91):
        yield change + _dt.timedelta(minutes=minutes)
    for micro in (-1, 0, 1):
        yield change + _dt.timedelta(microseconds=micro)


def _wrong(local_text: Callable[[_dt.datetime], str]) -> list[_dt.datetime]:
    changes = _changes()
    assert len(changes) == 16  # two a year
    return [m for c in changes for m in _around(c)
            if local_text(m) != m.astimezone().date().isoformat()]


def test_local_dates_are_astimezone_dates(zone: str) -> None:
    assert _wrong(fmt.local_text) == []


def _hourly(both_ends: bool) -> Callable[[_dt.datetime], str]:
    """A date from one offset per hour of UTC time, looked up at the hour's first
    microsecond and, with ``both_ends``, at its last one too (used when both agree)."""
    offsets: dict[int, _dt.timedelta | None] = {}

    def local_text(moment: _dt.datetime) -> str:
        hour = (moment - _EPOCH) // _HOUR
        if hour not in offsets:
            first = _EPOCH + hour * _HOUR
            last = first + _HOUR - _dt.timedelta(microseconds=1)
            offset = _offset(first)
            offsets[hour] = offset if not both_ends or offset == _offset(last) else None
        offset = offsets[hour]
        local = moment.astimezone() if offset is None else moment + offset
        return local.date().isoformat()

    return local_text


@pytest.mark.parametrize(("both_ends", "wrong_in"), [
    (False, {"past local midnight", "two changes within an hour"}),
    (True, {"two changes within an hour"}),
])
def test_local_dates_from_an_offset_per_hour_broken_variant(
        zone: str, both_ends: bool, wrong_in: set[str]) -> None:
    """An hour's offset taken from its first microsecond alone gives a change that falls
    within the hour the wrong date for the rest of it; taken from both ends, it misses two
    changes within the hour."""
    assert bool(_wrong(_hourly(both_ends))) == (zone in wrong_in)


_EDGES = [
    _dt.datetime.min.replace(tzinfo=_dt.UTC),
    _dt.datetime(1, 1, 1, 13, 59, 59, 999999, tzinfo=_dt.UTC),
    _dt.datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=_dt.UTC),
    _dt.datetime(9999, 12, 31, 4, 59, 59, 999999, tzinfo=_dt.UTC),
    _dt.datetime(9999, 12, 31, 10, 0, tzinfo=_dt.UTC),
    _dt.datetime.max.replace(tzinfo=_dt.UTC),
]


def _shifted(moment: _dt.datetime, hours: int) -> _dt.datetime | None:
    """``moment`` plus ``hours``, or None past the ends of datetime's range."""
    try:
        return moment + _dt.timedelta(hours=hours)
    except OverflowError:
        return None


@pytest.mark.parametrize("moment", _EDGES, ids=str)
def test_local_text_at_the_edges_of_datetime(fixed_zone: int, moment: _dt.datetime) -> None:
    """At the ends of datetime's range the local time may be outside it: the local date or
    time where it is not, else the UTC one followed by Z (never an error)."""
    local = _shifted(moment, fixed_zone)
    if local is None:
        assert fmt.local_text(moment) == moment.date().isoformat() + "Z"
        assert fmt.local_text(moment, clock=True) == (
            moment.replace(tzinfo=None).isoformat(" ", "seconds") + "Z")
    else:
        assert fmt.local_text(moment) == local.strftime("%Y-%m-%d")
        assert fmt.local_text(moment, clock=True) == local.strftime("%Y-%m-%d %H:%M:%S")


def test_local_text_outside_the_range_in_each_direction() -> None:
    """West of UTC the first hours of the year 1 are outside the range, east of it the last
    hours of 9999."""
    with local_zone("EST5"):
        assert fmt.local_text(_EDGES[0]) == "0001-01-01Z"
        assert fmt.local_text(_EDGES[-1]) == "9999-12-31"
    with local_zone("XXX-14"):
        assert fmt.local_text(_EDGES[-1], clock=True) == "9999-12-31 23:59:59Z"
        assert fmt.local_text(_EDGES[3], clock=True) == "9999-12-31 18:59:59"


def test_ago_shows_the_local_date_past_30_days(zone: str) -> None:
    now = _dt.datetime(2031, 1, 1, tzinfo=_dt.UTC)
    for change in _changes():
        for moment in _around(change):
            assert fmt.ago(moment, now) == moment.astimezone().date().isoformat(), moment
    assert fmt.ago(_EDGES[0], now) == fmt.local_text(_EDGES[0])


def _naive_around(change: _dt.datetime) -> Iterator[_dt.datetime]:
    """The wall-clock times of the 3 hours around ``change`` on either side of it, each
    minute and the seconds next to each offset's local time of the change, in both folds."""
    for offset in {_offset(change - _dt.timedelta(seconds=1)), _offset(change)}:
        assert offset is not None
        wall = (change + offset).replace(tzinfo=None)
        for delta in [*(_dt.timedelta(minutes=m) for m in range(-90, 91)),
                      *(_dt.timedelta(seconds=s) for s in (-1, 1)),
                      _dt.timedelta(microseconds=1)]:
            for fold in (0, 1):
                yield (wall + delta).replace(fold=fold)


def test_utc_of_local_is_astimezone(zone: str) -> None:
    """Around every change (a gap, a repeated hour), in both folds."""
    wrong = [naive for change in _changes() for naive in _naive_around(change)
             if fmt.utc_of_local(naive) != naive.astimezone(_dt.UTC)]
    assert wrong == []


@pytest.mark.parametrize("naive", [
    _dt.datetime.min,
    _dt.datetime(1, 1, 1, 13, 59, 59, 999999),
    _dt.datetime(1, 1, 1, 14, 0),
    _dt.datetime(1, 1, 2),
    _dt.datetime(9999, 12, 30, 23, 59),
    _dt.datetime(9999, 12, 31, 18, 59, 59, 999999),
    _dt.datetime(9999, 12, 31, 19, 0),
    _dt.datetime.max,
], ids=str)
def test_utc_of_local_at_the_edges_of_datetime(fixed_zone: int, naive: _dt.datetime) -> None:
    """Every local time whose UTC moment is within datetime's range is read (``astimezone``
    refuses those within a day of its ends), and None for the others."""
    expected = _shifted(naive.replace(tzinfo=_dt.UTC), -fixed_zone)
    assert fmt.utc_of_local(naive) == expected


@pytest.mark.parametrize(("tz", "east"), [
    ("XXX-24", _dt.timedelta(hours=24)),
    ("XXX+24:30", -_dt.timedelta(hours=24, minutes=30)),
    ("AAA-24:59:59", _dt.timedelta(hours=24, minutes=59, seconds=59))])
def test_local_times_where_the_offset_is_a_day_or_more(tz: str, east: _dt.timedelta) -> None:
    """The C library takes offsets up to 24:59:59, datetime none of a day or more: such a
    zone's times are shown in UTC rather than raising, and read with the offset itself."""
    moment = _dt.datetime(2026, 1, 1, 12, tzinfo=_dt.UTC)
    with local_zone(tz):
        assert fmt.local_text(moment) == "2026-01-01Z"
        assert fmt.local_text(moment, clock=True) == "2026-01-01 12:00:00Z"
        assert fmt.utc_of_local(moment.replace(tzinfo=None)) == moment - east
