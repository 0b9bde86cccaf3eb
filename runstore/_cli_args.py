"""The types of the command line's argument values: each refuses, as a usage error (exit 2)
naming the argument, a value the library would refuse later (``_validate``'s rules), before
any store is opened. Text typed on the command line must be UTF-8 (a byte that is not is
refused: runstore stores and prints only UTF-8) and, where the library needs a value, not
empty."""

from __future__ import annotations

import argparse
import datetime as _dt
from collections.abc import Callable

from . import _clifmt as fmt, _ids, _validate
from .errors import InvalidRunError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value > _validate.INT64_MAX:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer of at most 2**63 - 1, got {text!r}")
    return value


def _int64(text: str) -> int:
    """An integer a run field holds (``exit_code``): the signed 64-bit range."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not _validate.INT64_MIN <= value <= _validate.INT64_MAX:
        raise argparse.ArgumentTypeError(
            f"expected an integer from -2**63 to 2**63 - 1, got {text!r}")
    return value


def _utf8(text: str) -> str:
    """``text`` when it is UTF-8 (argv bytes that are not arrive as lone surrogates)."""
    try:
        _validate.storable("text", text)
    except InvalidRunError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid UTF-8; runstore keeps and prints only UTF-8 text") from None
    return text


def _filled(name: str, expected: str) -> Callable[[str], str]:
    """The type of a value that must not be empty (``expected`` says what it is): non-empty
    UTF-8 text."""

    def filled(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"expected {expected}, got ''")
        return _utf8(text)

    filled.__name__ = name  # what argparse would call it
    return filled


#: values that name something (a run id, a machine, a batch)
_run_id = _filled("run id", "a non-empty run id")
_machine = _filled("machine name", "a non-empty machine name")
_batch = _filled("batch id", "a non-empty batch id")
#: a file or directory name (``-`` for stdin/stdout where allowed)
_path = _filled("path", "a file name")
#: a store location (``--store``, ``--state-dir``, ``migrate --from/--to``); its form is
#: read by ``_location.parse`` when the store is needed
_location = _filled("location", "a store (a directory, file:///dir or postgresql://...)")


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
    """``2h`` (that long ago) or a date/time (ISO 8601; without an offset: local time) that
    is within the years 1 to 9999 in UTC."""
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
    try:
        utc = (fmt.utc_of_local(moment) if moment.tzinfo is None  # local time
               else moment.astimezone(_dt.UTC))
    except OverflowError:
        utc = None
    if utc is None:  # past the year 1 or 9999 once in UTC
        raise argparse.ArgumentTypeError(
            f"{text!r} is outside the dates runstore keeps (the years 1 to 9999 in UTC); "
            "give a date within them")
    return utc
