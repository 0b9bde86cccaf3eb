"""Family 4: simulated power loss. A RecordingFS logs every write and sync of a store driven
through random operations; every crash state a power loss could leave (unsynced writes
dropped, torn, zeroed or garbage; directory changes persisted up to an unsynced point) must
open to a state that holds every acknowledged change and nothing torn. Removing any sync from
the store must make the same exploration find violations."""

from __future__ import annotations

import os
import pathlib
import random
import time
from typing import Any

import attrs
import pytest
from faults import (
    RecordingFS,
    Scratch,
    check_crash_state,
    crash_states,
    figure,
    record_history,
    run_for,
    sized,
)

import runstore.store as store_module
from runstore import Status, Store, _limits
from runstore._journal import Journal

pytestmark = pytest.mark.timeout(600)


@attrs.define
class Exploration:
    histories: int = 0
    log_ops: int = 0
    states: int = 0
    violations: list[str] = attrs.Factory(list)


def explore(base: pathlib.Path, *, seeds: range, steps: int, durable: bool, exhaustive: bool,
            limit: int, skip: frozenset[str] = frozenset(), compact_every: int = 0,
            write_every: int = 10, stop_at_first: bool = False) -> Exploration:
    """Record one history per seed and check its crash states."""
    out = Exploration()
    scratch = Scratch(str(base))
    for seed in seeds:
        rng = random.Random(seed)
        state_dir = base / f"h{seed}"
        h = record_history(str(state_dir), rng, steps, durable=durable,
                           rec=RecordingFS(skip=skip), compact_every=compact_every)
        out.histories += 1
        out.log_ops += h.rec.position
        for k, files in crash_states(h.rec, rng, exhaustive=exhaustive, limit=limit):
            out.states += 1
            problem = check_crash_state(scratch, files, h, k,
                                        write_after=out.states % write_every == 0)
            if problem is not None:
                out.violations.append(f"seed {seed}: {problem}")
                if stop_at_first:
                    return out
    return out


def _report(capsys: Any, name: str, ex: Exploration, started: float) -> None:
    figure(capsys, f"power loss ({name})", histories=ex.histories, logged_fs_ops=ex.log_ops,
           crash_states_explored=ex.states, violations=len(ex.violations),
           seconds=round(time.monotonic() - started, 1))


def test_every_crash_state_of_short_durable_histories(tmp_path: pathlib.Path, capsys: Any) -> None:
    """Exhaustive: every crash point of short durable histories (with a compaction), every
    combination of fates of the unsynced writes: 0 violations."""
    started = time.monotonic()
    ex = explore(tmp_path, seeds=range(sized(3, 30)), steps=6, durable=True, exhaustive=True,
                 limit=625, compact_every=4)
    _report(capsys, "exhaustive, short durable histories", ex, started)
    assert ex.violations == [], ex.violations[:5]
    # a compaction writes its file in ~1 MB chunks (one write here), so these short
    # histories have a few hundred crash states: enough to cover every point
    assert ex.states > 200


def test_every_crash_state_around_automatic_compactions(tmp_path: pathlib.Path, capsys: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Exhaustive, with every write that leaves a superseded line compacting on its own
    (beside the lock: the temp file claimed and emptied, written and synced, renamed over
    the journal): 0 violations."""
    monkeypatch.setattr(store_module.Store, "_compaction_due",
                        lambda self: self._view.lines > self._view.live())
    started = time.monotonic()
    ex = explore(tmp_path, seeds=range(200, 200 + sized(3, 30)), steps=6, durable=True,
                 exhaustive=True, limit=400)
    _report(capsys, "exhaustive, automatic compactions", ex, started)
    assert ex.violations == [], ex.violations[:5]
    assert ex.states > 200


def test_every_crash_state_of_short_non_durable_histories(tmp_path: pathlib.Path,
                                                          capsys: Any) -> None:
    """Exhaustive where feasible for non-durable histories: a crash loses a suffix of the
    changes since the last compaction or close, never corrupts older ones."""
    started = time.monotonic()
    ex = explore(tmp_path, seeds=range(100, 100 + sized(2, 20)), steps=5, durable=False,
                 exhaustive=True, limit=200)
    _report(capsys, "exhaustive, short non-durable histories", ex, started)
    assert ex.violations == [], ex.violations[:5]


def test_every_crash_state_with_checkpoints(tmp_path: pathlib.Path, capsys: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Exhaustive, durable and not, with a checkpoint before every other record: every
    crash state opens (after the reboot a power loss is) to a state it may show. A
    checkpoint whose unsynced predecessors were torn is not opened at."""
    monkeypatch.setattr(_limits, "CHECKPOINT_EVERY", 2)
    started = time.monotonic()
    ex = explore(tmp_path / "d", seeds=range(300, 300 + sized(3, 20)), steps=7, durable=True,
                 exhaustive=True, limit=400)
    more = explore(tmp_path / "n", seeds=range(400, 400 + sized(3, 20)), steps=7,
                   durable=False, exhaustive=True, limit=300)
    ex.histories, ex.log_ops = ex.histories + more.histories, ex.log_ops + more.log_ops
    ex.states, ex.violations = ex.states + more.states, ex.violations + more.violations
    _report(capsys, "exhaustive, checkpoints every 2 records", ex, started)
    assert ex.violations == [], ex.violations[:5]
    assert ex.states > 400


def test_catches_checkpoints_taken_without_checking(tmp_path: pathlib.Path, capsys: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: a checkpoint from an earlier boot taken without reading the unsynced
    lines before it. Some crash state then opens past a torn line, to a state no sequence
    of calls made (or fails to be read later)."""
    monkeypatch.setattr(_limits, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(Journal, "lines_follow", lambda self, lo, hi, next_seq: True)
    started = time.monotonic()
    ex = explore(tmp_path, seeds=range(400, 400 + sized(3, 20)), steps=7, durable=False,
                 exhaustive=True, limit=300, stop_at_first=True)
    _report(capsys, "broken variant: checkpoints taken unchecked", ex, started)
    assert ex.violations, "checkpoints taken without checking passed the power-loss test"
    figure(capsys, "power loss (broken variant: checkpoints taken unchecked)",
           first_violation=ex.violations[0])


def _random_crashes(tmp_path: pathlib.Path, capsys: Any, total: int) -> None:
    started = time.monotonic()
    histories = max(4, total // 250)
    per = max(1, total // histories)
    results = []
    for i, durable in enumerate([True, False] * (histories // 2)):
        results.append(explore(tmp_path / f"r{i}", seeds=range(1000 + i, 1001 + i), steps=40,
                               durable=durable, exhaustive=False, limit=per))
    ex = Exploration()
    for r in results:
        ex.histories += r.histories
        ex.log_ops += r.log_ops
        ex.states += r.states
        ex.violations += r.violations
    _report(capsys, "random crash states of longer histories", ex, started)
    assert ex.violations == [], ex.violations[:5]


def test_random_crash_states(tmp_path: pathlib.Path, capsys: Any) -> None:
    """About 1,000 random crash states of 40-operation histories, durable and not: 0
    violations."""
    _random_crashes(tmp_path, capsys, sized(1000, 10000))


@pytest.mark.stress
def test_random_crash_states_full(tmp_path: pathlib.Path, capsys: Any) -> None:
    """>= 10,000 random crash states (stress size)."""
    _random_crashes(tmp_path, capsys, sized(10000, 10000, True))


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_every_crash_state_full(tmp_path: pathlib.Path, capsys: Any) -> None:
    """Exhaustive exploration of more and longer durable histories (stress size)."""
    started = time.monotonic()
    ex = explore(tmp_path, seeds=range(sized(20, 20, True)), steps=8, durable=True,
                 exhaustive=True, limit=1024, compact_every=5)
    _report(capsys, "exhaustive, stress size", ex, started)
    assert ex.violations == [], ex.violations[:5]


def test_crash_during_recovery(tmp_path: pathlib.Path, capsys: Any) -> None:
    """A crash state with a torn tail becomes the starting point of a second recorded
    history (recovery truncates, then more writes): its crash states are sound too."""
    started = time.monotonic()
    scratch = Scratch(str(tmp_path))
    ex = Exploration()
    seeds = range(sized(12, 60))
    for seed in seeds:
        rng = random.Random(seed)
        first = record_history(str(tmp_path / f"a{seed}"), rng, 8, durable=False)
        # pick a crash state of the first history that leaves a torn tail to recover
        for _k, files in crash_states(first.rec, rng, exhaustive=False, limit=20):
            data = files.get("runs.jsonl", b"")
            if data and not data.endswith(b"\n"):
                break
        else:
            continue
        second_dir = tmp_path / f"b{seed}"
        os.mkdir(second_dir, 0o700)
        (second_dir / "runs.jsonl").write_bytes(data)
        os.chmod(second_dir / "runs.jsonl", 0o600)
        h = record_history(str(second_dir), rng, 4, durable=True,
                           rec=RecordingFS({"runs.jsonl": data}))
        ex.histories += 1
        ex.log_ops += h.rec.position
        for k, state in crash_states(h.rec, rng, exhaustive=True, limit=200):
            ex.states += 1
            problem = check_crash_state(scratch, state, h, k)
            if problem is not None:
                ex.violations.append(f"seed {seed}: {problem}")
    _report(capsys, "crash during and after recovery", ex, started)
    assert ex.histories >= len(seeds) // 2
    assert ex.violations == [], ex.violations[:5]


# -- removing a sync must be caught --------------------------------------------------------


def _broken(tmp_path: pathlib.Path, capsys: Any, skip: str) -> None:
    started = time.monotonic()
    ex = explore(tmp_path, seeds=range(3), steps=8, durable=True, exhaustive=True, limit=200,
                 skip=frozenset({skip}), compact_every=3, stop_at_first=True)
    _report(capsys, f"broken variant: no {skip}", ex, started)
    assert ex.violations, f"a store without {skip} passed the power-loss test"
    figure(capsys, f"power loss (broken variant: no {skip})", first_violation=ex.violations[0])


def test_catches_a_missing_fdatasync(tmp_path: pathlib.Path, capsys: Any) -> None:
    """Durable appends without fdatasync: acknowledged changes are lost in some crash state."""
    _broken(tmp_path, capsys, "fdatasync")


def test_catches_a_missing_fsync_of_the_temp_file(tmp_path: pathlib.Path, capsys: Any) -> None:
    """Compaction renaming a temp file it did not fsync: the journal can come back empty."""
    _broken(tmp_path, capsys, "fsync_file")


def test_catches_a_missing_fsync_of_the_directory(tmp_path: pathlib.Path, capsys: Any) -> None:
    """A rename not followed by an fsync of the directory: the old journal can come back."""
    _broken(tmp_path, capsys, "fsync_dir")


def test_compaction_keeps_every_run_at_its_latest_version(tmp_path: pathlib.Path) -> None:
    """Regression (found by this suite): compaction re-pointed runs whose latest version sat
    in the retained history using offsets of the new file as if they were of the old one, so
    a finished run could read back as an older version (and be changed again)."""
    rng = random.Random(7)
    with Store(tmp_path / "s") as s:
        for n in range(60):
            active = s.active()
            if active and rng.random() < 0.5:
                s.finish(rng.choice(active).id, Status.TIMEOUT)
            elif rng.random() < 0.5:
                m = f"m{rng.randrange(3)}"
                s.prepare_atomic(m, "h", lambda m=m: run_for(m, "h"))
            else:
                s.create(run_for(f"x{n}", "h", status=Status.COMPLETED))
            if n % 2:
                s.compact()
            mine = {r.id: r for r in s.list()}
            assert all(s.get(rid) == r for rid, r in mine.items())
            with Store(tmp_path / "s") as fresh:
                assert {r.id: r for r in fresh.list()} == mine, f"after step {n}"
