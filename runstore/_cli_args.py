"""The types of the command line's argument values: each refuses, as a usage error (exit 2),
a value the library would refuse later (``_validate``'s ranges), before any store is opened."""

from __future__ import annotations

import argparse
import datetime as _dt

from . import _clifmt as fmt, _ids, _validate
from .errors import InvalidRunError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= _validate.INT64_MAX:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 0 (at most 2**63 - 1), got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A number of seconds the library accepts (``_validate.seconds``): finite, 0 to
    ``MAX_SECONDS``; ``inf`` and ``nan`` are usage errors."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= _validate.MAX_SECONDS:  # False for nan, too
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds >= 0 (finite, at most {_validate.MAX_SECONDS:.0f}, "
            f"about 24.8 days), got {text!r}")
    return value


def _too_long(text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(
        f"{text!r} reaches back before the year 1; use a shorter duration")


def _duration(text: str) -> _dt.timedelta:
    """A duration the library accepts (``_validate.duration``): one that reaches back from
    now no further than the year 1."""
    try:
        value = fmt.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except OverflowError:  # more days than a timedelta holds
        raise _too_long(text) from None
    try:
        return _validate.duration("duration", value)
    except InvalidRunError:
        raise _too_long(text) from None


def _since(text: str) -> _dt.datetime:
    """``2h`` (that long ago) or a date/time (ISO 8601; without an offset: local time)."""
    try:
        return _ids.utcnow() - fmt.parse_duration(text)
    except ValueError:
        pass
    except OverflowError:  # more days than a timedelta holds, or before the year 1
        raise _too_long(text) from None
    try:
        moment = _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (2h, 30m, 7d) nor a date "
            "(2026-01-31, 2026-01-31T12:00, 2026-01-31T12:00Z)") from None
    return moment.astimezone(_dt.UTC)  # a naive time is taken as local time
