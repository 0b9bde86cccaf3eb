"""Family 1: the race. Eight processes x two threads run the dispatcher cycle (``runstore
stress``'s engine) on 1 and 4 machines: 0 overlapping active runs, 0 duplicate ids, gap-free
sequence numbers, no lost acknowledged change. Then the proof that this test can fail: with
locking deliberately broken in the worker processes (no cross-process lock; lockf without
the thread mutex; flock on the journal that compaction replaces) it must find violations."""

from __future__ import annotations

import time
from typing import Any

import pytest
from faults import break_stress_workers, figure, sized

from runstore import stress

pytestmark = pytest.mark.timeout(600)


def _race(capsys: Any, label: str, *, machines: int, attempts: int, procs: int = 8,
          threads: int = 2, durable: bool = True, seconds: float = 120.0) -> dict[str, Any]:
    started = time.monotonic()
    report = stress.run(stress.Config(procs=procs, threads=threads, machines=machines,
                                      seconds=seconds, durable=durable, attempts=attempts,
                                      backoff=0.0005))
    by_check = {c["name"].split(" (")[0]: c["violations"] for c in report["checks"]}
    figure(capsys, f"race ({label})", processes=procs, threads=threads, machines=machines,
           prepare_attempts=report["prepare_attempts"], operations=report["operations"],
           created=report["outcomes"]["created"], violations=report["violations"],
           by_check=by_check, seconds=round(time.monotonic() - started, 1))
    return report


def _assert_clean(report: dict[str, Any]) -> None:
    bad = [c for c in report["checks"] if c["violations"]]
    assert report["ok"] and not bad, bad


@pytest.mark.parametrize("machines", [1, 4])
def test_race(capsys: Any, machines: int) -> None:
    """8 processes x 2 threads, durable: every guarantee holds."""
    report = _race(capsys, f"{machines} machines", machines=machines,
                   attempts=sized(4000, 20000))
    _assert_clean(report)
    assert report["prepare_attempts"] >= sized(4000, 20000) * 0.95
    assert report["outcomes"]["created"] >= 10  # the machines did change hands


def test_race_not_durable(capsys: Any) -> None:
    """The same without fdatasync (a much faster interleaving)."""
    report = _race(capsys, "4 machines, not durable", machines=4, attempts=sized(4000, 20000),
                   durable=False)
    _assert_clean(report)


@pytest.mark.stress
@pytest.mark.parametrize("machines", [1, 4])
def test_race_full(capsys: Any, machines: int) -> None:
    """Stress size: >= 20,000 prepare attempts on each machine count."""
    report = _race(capsys, f"{machines} machines, stress size", machines=machines,
                   attempts=sized(20000, 20000, True), seconds=600)
    _assert_clean(report)
    assert report["prepare_attempts"] >= 20000


# -- the proofs that the race test can fail -------------------------------------------------


def _must_catch(capsys: Any, monkeypatch: pytest.MonkeyPatch, variant: str,
                **kwargs: Any) -> None:
    """Run the race with a broken lock until a check fails (at most 4 rounds)."""
    break_stress_workers(monkeypatch, variant)
    for round_ in range(1, 5):
        report = _race(capsys, f"BROKEN {variant}, round {round_}", **kwargs)
        caught = [c["name"] for c in report["checks"]
                  if c["violations"] and not c["name"].startswith("no errors")]
        if caught:
            figure(capsys, f"race (BROKEN {variant})", caught_by=caught, rounds=round_)
            return
    pytest.fail(f"the race test did not notice locking broken by {variant}")


def test_catches_no_cross_process_lock(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the thread mutex, no flock: processes interleave."""
    _must_catch(capsys, monkeypatch, "no_cross_process_lock", machines=1, attempts=1500, seconds=20)


def test_catches_lockf_without_mutex(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """lockf (a process-wide record lock) and no mutex: threads of one process get in
    together."""
    _must_catch(capsys, monkeypatch, "lockf_without_mutex", machines=1, attempts=1500, procs=4,
                threads=4, seconds=20)


def test_catches_locking_the_replaced_file(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """flock on runs.jsonl, which compaction replaces by rename: two inodes, two holders."""
    _must_catch(capsys, monkeypatch, "lock_the_data_file", machines=1, attempts=1500, seconds=20)
