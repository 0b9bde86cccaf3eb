"""``list`` shows a run older than 30 days by its local date: ``_clifmt.LocalDates`` gives
``moment.astimezone().date()`` from one offset per hour of UTC time. It must give exactly
that for every moment, around every change of the local offset too: the zones below are
POSIX TZ strings (no time zone database needed), one changing at a whole hour of UTC, one
by half an hour, and one at one minute past local midnight, which falls inside an hour
of UTC time and moves the date."""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Iterator

import pytest

from runstore import _clifmt as fmt

_ZONES = {
    "eastern": "EST5EDT,M3.2.0,M11.1.0",
    "half-hour change": "LHST-10:30LHDT-11,M10.1.0,M4.1.0",
    "past local midnight": "NST3:30NDT,M3.2.0/0:01,M11.1.0/0:01",
}
_STEP = _dt.timedelta(hours=6)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


@pytest.fixture(params=list(_ZONES))
def zone(request: pytest.FixtureRequest) -> Iterator[str]:
    before = os.environ.get("TZ")
    os.environ["TZ"] = _ZONES[request.param]
    time.tzset()
    try:
        yield request.param
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def _offset(moment: _dt.datetime) -> _dt.timedelta | None:
    return moment.astimezone().utcoffset()


def _changes(years: int = 8) -> Iterator[_dt.datetime]:
    """The first moment of each new local offset from 2022 on, to the second (bisected)."""
    at = _dt.datetime(2022, 1, 1, tzinfo=_dt.UTC)
    end = at + _dt.timedelta(days=365 * years)
    while at < end:
        low, high = at, at + _STEP
        if _offset(low) != _offset(high):
            while high - low > _dt.timedelta(seconds=1):
                mid = low + (high - low) / 2
                low, high = (mid, high) if _offset(mid) == _offset(low) else (low, mid)
            yield high
        at += _STEP


def _around(change: _dt.datetime) -> Iterator[_dt.datetime]:
    """Every minute of the 3 hours around ``change`` and the microseconds next to it."""
    for minutes in range(-90, 91):
        yield change + _dt.timedelta(minutes=minutes)
    for micro in (-1, 0, 1):
        yield change + _dt.timedelta(microseconds=micro)


def _wrong(dates: fmt.LocalDates) -> list[_dt.datetime]:
    changes = list(_changes())
    assert len(changes) == 16  # two a year
    return [m for c in changes for m in _around(c) if dates(m) != m.astimezone().date()]


def test_local_dates_are_astimezone_dates(zone: str) -> None:
    assert _wrong(fmt.LocalDates()) == []


def test_local_dates_around_midnight_broken_variant(zone: str) -> None:
    """An hour's offset taken from its first microsecond alone gives a change that falls
    within the hour the wrong date for the rest of it."""

    class FirstOnly(fmt.LocalDates):
        def _offset(self, hour: int) -> _dt.timedelta | None:
            offset = _offset(_EPOCH + hour * _dt.timedelta(hours=1))
            self._offsets[hour] = offset
            return offset

    assert bool(_wrong(FirstOnly())) == (zone == "past local midnight")


@pytest.mark.parametrize("moment", [
    _dt.datetime.min.replace(tzinfo=_dt.UTC),
    _dt.datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=_dt.UTC),
    _dt.datetime.max.replace(tzinfo=_dt.UTC),
    _dt.datetime(9999, 12, 31, 23, 0, tzinfo=_dt.UTC),
])
def test_local_dates_at_the_edges_of_datetime(zone: str, moment: _dt.datetime) -> None:
    """At the ends of datetime's range the offset may not apply: the same answer (or the
    same error) as ``astimezone``."""
    try:
        expected: object = moment.astimezone().date()
    except OverflowError as exc:
        expected = type(exc)
    try:
        got: object = fmt.LocalDates()(moment)
    except OverflowError as exc:
        got = type(exc)
    assert got == expected


def test_ago_shows_the_local_date_past_30_days(zone: str) -> None:
    now = _dt.datetime(2027, 1, 1, tzinfo=_dt.UTC)
    dates = fmt.LocalDates()
    for change in _changes(years=4):
        for moment in _around(change):
            assert fmt.ago(moment, now, dates) == fmt.ago(moment, now), moment


def test_local_dates_forget_hours_past_their_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt.LocalDates, "LIMIT", 3)
    dates = fmt.LocalDates()
    for hours in range(10):
        moment = _EPOCH + _dt.timedelta(hours=hours, minutes=30)
        assert dates(moment) == moment.astimezone().date()
        assert len(dates._offsets) <= 3
