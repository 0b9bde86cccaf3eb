"""The pruning rule both backends share, without a store."""

from __future__ import annotations

import datetime as dt

import pytest

from runstore import InvalidRunError, Run, Status, _retention as retention

NOW = dt.datetime(2026, 1, 10, tzinfo=dt.UTC)


def _ended(days_ago: int | None) -> Run:
    ended = None if days_ago is None else NOW - dt.timedelta(days=days_ago)
    return Run("m", "/t", "h", id=f"r{days_ago}", status=Status.COMPLETED, ended_at=ended)


def test_keep_last_removes_the_oldest_and_older_than_the_ended_before_the_cutoff() -> None:
    runs = [_ended(9), _ended(5), _ended(None), _ended(1)]
    assert retention.doomed(runs, lambda r: r, older_than=None, keep_last=1, now=NOW) == runs[:3]
    assert retention.doomed(runs, lambda r: r, older_than=None, keep_last=9, now=NOW) == []
    week = dt.timedelta(days=7)
    assert retention.doomed(runs, lambda r: r, older_than=week, keep_last=None, now=NOW) == [
        runs[0]]  # no end time: never pruned by age
    pairs = [(r, {"x": 1}) for r in runs]
    assert retention.doomed(pairs, lambda p: p[0], older_than=None, keep_last=3,
                            now=NOW) == pairs[:1]


@pytest.mark.parametrize(("older_than", "keep_last"), [
    (None, None), (dt.timedelta(days=1), 3), (None, -1), (None, True), ("7d", None)])
def test_prune_arguments_are_refused_before_any_lock(older_than: object,
                                                     keep_last: object) -> None:
    with pytest.raises(InvalidRunError):
        retention.check_prune(older_than, keep_last)
