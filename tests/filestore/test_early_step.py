"""``update``/``start``/``finish``/``heartbeat`` make the run's next version before taking the
flock, from the process's view, and keep it only when catching up brought no newer version
of the run: a change another process makes in between is never overwritten."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runstore import InvalidTransitionError, Run, Status, Store, _fields


@pytest.fixture
def two(tmp_path: pathlib.Path) -> Iterator[tuple[Store, Store]]:
    with Store(tmp_path, durable=False) as a, Store(tmp_path, durable=False) as b:
        yield a, b


def _meanwhile(monkeypatch: pytest.MonkeyPatch, act: Callable[[], object]) -> list[int]:
    """Run ``act`` (another store's write) the first time a next version's fields are made
    early, i.e. after this store took its mutex and before it takes the flock. Returns a
    list that counts the calls of ``record_fields``."""
    real = _fields.record_fields
    calls: list[int] = []

    def spy(run: Run, extra: dict[str, Any] | None = None) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            act()
        return real(run, extra)

    monkeypatch.setattr(_fields, "record_fields", spy)
    return calls


def _new(store: Store) -> Run:
    return store.create(Run(machine="m", test_dir="/t", test_dir_hash="h"))


def test_a_run_finished_meanwhile_is_not_started(two: tuple[Store, Store],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    run = _new(a)
    a.get(run.id)  # a's view holds the pending run
    _meanwhile(monkeypatch, lambda: b.finish(run.id, Status.FAILED, error_code="cancelled"))
    with pytest.raises(InvalidTransitionError):
        a.start(run.id)
    monkeypatch.undo()
    for store in (a, b):
        stored = store.get(run.id)
        assert stored.status is Status.FAILED and stored.error_code == "cancelled"


def test_a_change_made_meanwhile_is_kept(two: tuple[Store, Store],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    run = a.start(_new(a).id)
    beat = b.heartbeat  # b's next version of the run: revision 3 with a heartbeat
    _meanwhile(monkeypatch, lambda: beat(run.id))
    done = a.finish(run.id, Status.COMPLETED, exit_code=0)
    monkeypatch.undo()
    assert done.revision == run.revision + 2 and done.heartbeat_at is not None
    assert b.get(run.id) == done == a.get(run.id)


def test_the_early_version_is_used_when_nothing_changed(two: tuple[Store, Store],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process's writes to other runs do not make the early version stale: its
    fields are made once, and the line is the same as one made under the flock."""
    a, b = two
    run = a.start(_new(a).id)
    calls = _meanwhile(monkeypatch, lambda: b.create(
        Run(machine="other", test_dir="/t", test_dir_hash="h")))
    done = a.finish(run.id, Status.COMPLETED, exit_code=0)
    assert len(calls) == 2  # a's early fields, then b's create (made under b's own flock)
    monkeypatch.undo()
    assert b.get(run.id) == done and done.status is Status.COMPLETED
    reopened = Store(a.state_dir, durable=False)
    try:
        assert reopened.get(run.id) == done
    finally:
        reopened.close()
