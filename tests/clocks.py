"""A wall clock the tests set by hand, for ``runstore._ids``."""

from __future__ import annotations

import datetime as _dt
import types


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
