"""``View``: the file store's in-memory view, tested as an object of its own.

Each test feeds it records as the journal holds them (``codec``'s record dicts) and checks
what queries read from it: the latest offset of each run, the non-terminal runs by id and by
machine, the counters, and what a pruned or finished run leaves behind.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import pytest

from runstore import CorruptStoreError, Run, Status
from runstore._view import View

T0 = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)


def _record(run_id: str, machine: str, status: Status, change: str = "run_created",
            **fields: Any) -> dict[str, Any]:
    """A decoded record line as the journal holds it."""
    return {"seq": 1, "change": change, "time": T0.isoformat(), "id": run_id,
            "machine": machine, "test_dir": "/t", "test_dir_hash": "h",
            "status": status.value, "revision": 1,
            **fields}


def test_a_new_view_is_empty() -> None:
    view = View("/s/runs.jsonl")
    assert (view.live(), view.lines, view.index, view.machines) == (0, 0, {}, {})
    assert view.active_of("m1") is None


def test_the_latest_version_of_each_run_is_indexed_in_insertion_order() -> None:
    view = View("/s/runs.jsonl")
    view.ingest_record(0, _record("a", "m1", Status.PENDING))
    view.ingest_record(100, _record("b", "m2", Status.COMPLETED))
    view.ingest_record(200, _record("a", "m1", Status.RUNNING, "run_started"))
    assert view.index == {"a": 200, "b": 100}
    assert (view.live(), view.lines, view.max_id) == (2, 3, "b")
    assert list(view.recent) == [0, 100, 200]


def test_non_terminal_runs_are_kept_by_id_and_machine_until_they_end() -> None:
    view = View("/s/runs.jsonl")
    view.ingest_record(0, _record("a", "m1", Status.PENDING))
    run = view.active_of("m1")
    assert isinstance(run, Run) and run.id == "a" and run.status is Status.PENDING
    assert view.machines == {"m1": ["a"]} and view.active_at == {"a": 0}
    assert view.changed_at["a"] == T0
    view.ingest_record(50, _record("a", "m1", Status.FAILED, "run_finished"))
    assert view.active_of("m1") is None
    assert (view.machines, view.active_at, view.changed_at) == ({}, {}, {})
    assert "a" not in view.active and view.index == {"a": 50}


def test_a_deferred_record_is_structured_when_first_read() -> None:
    """Catching up defers structuring a non-terminal run; a malformed one is refused when
    it is read, naming the file."""
    view = View("/s/runs.jsonl")
    view.ingest_record(0, _record("a", "m1", Status.RUNNING), defer=True)
    assert view.active.get("a") is not None
    view.ingest_record(80, _record("b", "m2", Status.RUNNING, revision="x"), defer=True)
    with pytest.raises(CorruptStoreError, match=r"runs\.jsonl"):
        view.active["b"]


def test_a_malformed_run_is_refused_when_not_deferred() -> None:
    view = View("/s/runs.jsonl")
    with pytest.raises(CorruptStoreError, match="run 'a' has a malformed field"):
        view.ingest_record(0, _record("a", "m1", Status.RUNNING, revision="x"))


def test_a_pruned_run_leaves_nothing_behind() -> None:
    view = View("/s/runs.jsonl")
    view.ingest_record(0, _record("a", "m1", Status.COMPLETED, extra_field=1))
    assert view.extras == {"a": {"extra_field": 1}}
    view.ingest_record(60, _record("a", "m1", Status.COMPLETED, "run_pruned"))
    assert (view.index, view.extras, view.live()) == ({}, {}, 0)
    assert view.lines == 2  # the pruned line stays in the file until a compaction


def test_a_lazy_view_counts_the_base_and_the_changes_since() -> None:
    """Opened from a compaction's summary, the base is not indexed: the live count comes
    from the summary's count, the runs created since and those pruned since."""
    view = View("/s/runs.jsonl")
    view.lazy, view.base_count = True, 10
    view.ingest_record(0, _record("n", "m1", Status.COMPLETED))
    view.ingest_record(40, _record("old", "m1", Status.COMPLETED, "run_pruned"))
    assert (view.tail_created, view.tail_pruned, view.live()) == (1, {"old"}, 10)


def test_recent_keeps_the_last_retain_offsets() -> None:
    view = View("/s/runs.jsonl", retain=2)
    for offset in range(0, 500, 100):
        view.ingest_record(offset, _record(f"r{offset}", "m", Status.COMPLETED))
    assert list(view.recent) == [300, 400]


def test_several_machines_and_runs_per_machine() -> None:
    """A machine's earliest non-terminal run is its active one (an import may hold two)."""
    view = View("/s/runs.jsonl")
    view.ingest_record(0, _record("a", "m1", Status.PENDING))
    view.ingest_record(10, _record("b", "m1", Status.RUNNING))
    view.ingest_record(20, _record("c", "m2", Status.RUNNING))
    assert view.machines == {"m1": ["a", "b"], "m2": ["c"]}
    active = view.active_of("m1")
    assert active is not None and active.id == "a"
    view.ingest_record(30, _record("a", "m1", Status.COMPLETED, "run_finished"))
    active = view.active_of("m1")
    assert active is not None and active.id == "b"
