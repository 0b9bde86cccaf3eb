"""Family 2: named crash points. A child process armed with ``RUNSTORE_FAILPOINT=name:N``
writes (logging what it invoked and what was acknowledged) and SIGKILLs itself at the N-th
hit of the point; the parent reopens the store: old or new state, never torn, every
acknowledged write present. Every point in the source is covered, recovery's by planting a
torn tail before the child opens the store."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import time
from typing import Any

import pytest
from faults import audit_store, failpoint_names, figure, lost_acks, read_acks, sized, spawn_python

pytestmark = pytest.mark.timeout(900)

POINTS = failpoint_names()
EXPECTED = {"append.before_write", "append.after_write", "append.after_sync",
            "compact.after_tmp_write", "compact.after_tmp_sync", "compact.after_replace",
            "recover.before_truncate", "prune.after_archive"}

_CHILD = """
import faults
import runstore.store
if {often}:  # compacting on its own (beside the lock) instead of by compact(), as soon as
    # two lines are superseded, however many runs the store has grown to over the kills
    runstore._limits.RETAIN_CHANGES = 2
    runstore.store.Store._compaction_due = (
        lambda self: self._view.lines - self._view.live() > 2)
faults.writer({state!r}, {log!r}, {seed}, ops={ops}, durable={durable}, compact_every={ce},
              prune_every={pe}, archive={archive!r})
"""


def test_every_documented_failpoint_exists() -> None:
    """The failpoints docs/reliability.md lists are all in the code."""
    assert set(POINTS) >= EXPECTED, EXPECTED - set(POINTS)


def _plant_torn_tail(state_dir: pathlib.Path, rng: random.Random) -> None:
    path = state_dir / "runs.jsonl"
    data = path.read_bytes()
    last = data[:-1].rfind(b"\n") + 1
    line = data[last:]
    with open(path, "ab") as f:  # half of a copy of the last line: an unsynced, torn append
        f.write(line[:rng.randrange(1, max(2, len(line) - 1))])


def _kill_at(point: str, kills: int, base: pathlib.Path) -> dict[str, Any]:
    rng = random.Random(point)
    state = base / "state"
    fired = silent = 0
    violations: list[str] = []
    for n in range(kills):
        log = str(base / f"log{n}")
        if point.startswith("recover"):
            if not (state / "runs.jsonl").exists():
                spawn_python(_CHILD.format(state=str(state), log=str(base / "seed"), seed=0,
                                           ops=12, durable=True, ce=0, pe=0,
                                           archive="", often=False)).wait(60)
            _plant_torn_tail(state, rng)
            hit = 1
        elif point.startswith("append"):
            hit = rng.randrange(1, 30)
        else:
            hit = rng.randrange(1, 4)
        child = spawn_python(
            _CHILD.format(state=str(state), log=log, seed=rng.randrange(1 << 30), ops=60,
                          durable=point != "append.after_write" or n % 2 == 0,
                          ce=7 if point.startswith("compact") and n % 2 == 0 else 0,
                          pe=9 if point.startswith("prune") else 0,
                          archive=str(base / "archive.jsonl"),
                          often=point.startswith("compact") and n % 2 == 1),
            env={"RUNSTORE_FAILPOINT": f"{point}:{hit}"})
        _out, err = child.communicate(timeout=120)
        if child.returncode == -signal.SIGKILL:
            fired += 1
        elif child.returncode == 0:
            silent += 1
        else:
            violations.append(f"kill {n}: the child failed: {err.decode()[-500:]}")
            continue
        runs, problems = audit_store(str(state))
        violations += [f"kill {n} ({point}:{hit}): {p}" for p in problems]
        acked = read_acks([str(base / f"log{i}") for i in range(n + 1)])
        in_flight = acked.in_flight[-1] if child.returncode and acked.in_flight else ("", "")
        lost = lost_acks(acked, runs)
        if in_flight[0] == "prune":  # the in-flight prune may have removed terminal runs
            lost = [x for x in lost if not x.endswith("is missing")]
        violations += [f"kill {n} ({point}:{hit}): {x}" for x in lost]
        # old or new: a run changed by the call in flight is at most one revision ahead
        rid = in_flight[1]
        if rid in runs and rid in acked.runs and runs[rid].revision > acked.runs[rid][0] + 1:
            violations.append(f"kill {n}: run {rid} is more than one change ahead of its "
                              "last acknowledged version")
    return {"kills": fired, "not_reached": silent, "violations": violations}


def _run_point(point: str, kills: int, tmp_path: pathlib.Path, capsys: Any) -> None:
    started = time.monotonic()
    result = _kill_at(point, kills, tmp_path)
    figure(capsys, f"failpoint {point}", kills=result["kills"],
           runs_that_missed_the_point=result["not_reached"],
           violations=len(result["violations"]), seconds=round(time.monotonic() - started, 1))
    assert result["violations"] == [], result["violations"][:5]
    assert result["kills"] >= max(1, kills * 3 // 4)


@pytest.mark.parametrize("point", POINTS)
def test_failpoint(point: str, tmp_path: pathlib.Path, capsys: Any) -> None:
    """A few kills at each point (CI size)."""
    _run_point(point, sized(8, 20), tmp_path, capsys)


@pytest.mark.stress
@pytest.mark.parametrize("point", POINTS)
def test_failpoint_full(point: str, tmp_path: pathlib.Path, capsys: Any) -> None:
    """>= 20 kills at each point (stress size)."""
    _run_point(point, sized(20, 20, True), tmp_path, capsys)


def test_failpoint_child_really_dies_at_the_point(tmp_path: pathlib.Path) -> None:
    """Sanity: an armed child is killed by SIGKILL, an unarmed one exits 0."""
    code = _CHILD.format(state=str(tmp_path / "s"), log=str(tmp_path / "l"), seed=1, ops=5,
                         durable=True, ce=0, pe=0, archive="", often=False)
    armed = spawn_python(code, env={"RUNSTORE_FAILPOINT": "append.after_write:2"})
    plain = spawn_python(code)
    assert armed.wait(60) == -signal.SIGKILL
    assert plain.wait(60) == 0
    assert os.path.exists(tmp_path / "s" / "runs.jsonl")
