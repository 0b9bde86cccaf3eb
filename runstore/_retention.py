"""Which finished runs ``prune()`` removes. One rule for both backends; no I/O here.

Either all but the newest ``keep_last`` terminal runs, or those that ended more than
``older_than`` before now. Non-terminal runs are never pruned (callers pass terminal runs).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from typing import TypeVar

from . import _validate
from .model import Run

T = TypeVar("T")


def check_prune(older_than: object, keep_last: object) -> None:
    """Refuse ``prune()`` arguments before any lock is taken (``_validate.prune``)."""
    _validate.prune(older_than, keep_last, None, False)


def doomed(
    terminal: Sequence[T],
    run_of: Callable[[T], Run],
    *,
    older_than: _dt.timedelta | None,
    keep_last: int | None,
    now: _dt.datetime,
) -> list[T]:
    """The items of ``terminal`` (in insertion order) whose runs ``prune()`` removes."""
    if keep_last is not None:
        return list(terminal[:max(len(terminal) - keep_last, 0)])
    assert older_than is not None
    return [item for item in terminal if ended_before(run_of(item), now, older_than)]


def ended_before(run: Run, now: _dt.datetime, older_than: _dt.timedelta) -> bool:
    """Whether the terminal ``run`` ended more than ``older_than`` before ``now`` (the
    ``older_than`` rule, one run at a time)."""
    return run.ended_at is not None and run.ended_at < now - older_than
