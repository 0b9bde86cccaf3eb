"""A wall clock the tests set by hand, for ``runstore._ids``; the local time zone set for a
block (``local_zone``)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
import types
from collections.abc import Iterator


@contextlib.contextmanager
def local_zone(tz: str) -> Iterator[None]:
    """``TZ`` set to ``tz`` (and ``time.tzset``) for the block, then restored."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = tz
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


class SettableClock:
    """A stand-in for the ``datetime`` module in ``runstore._ids`` whose now() is
    ``moment`` (monkeypatch ``runstore._ids._dt`` with ``module``)."""

    def __init__(self, moment: _dt.datetime) -> None:
        self.moment = moment
        clock = self

        class _DateTime(_dt.datetime):
            @classmethod
            def now(cls, tz: _dt.tzinfo | None = None) -> _DateTime:  # type: ignore[override]  # fixed clock
                return clock.moment  # type: ignore[return-value]  # a plain aware datetime

        self.module = types.SimpleNamespace(**{**vars(_dt), "datetime": _DateTime})
