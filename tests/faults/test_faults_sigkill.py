"""Family 3: the SIGKILL loop. Round after round, several writer processes (forked, some
sharing the parent's Store object across the fork, some opening their own, durable or not,
compacting now and then) are killed with SIGKILL at random moments; after each round the
store must open, pass its checks, hold one active run per machine at most and contain every
change any writer had acknowledged."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import time
import traceback
from typing import Any

import orjson
import pytest
from faults import Acked, audit_store, figure, lost_acks, read_acks, sized, wait_pid, writer

from runstore import Store, _limits

pytestmark = pytest.mark.timeout(900)


def _fork_writer(state: str, log: str, seed: int, inherited: Store | None, durable: bool) -> int:
    pid = os.fork()
    if pid == 0:  # the child: write until killed, never return into pytest
        code = 0
        try:
            writer(state, log, seed, durable=durable, compact_every=random.Random(seed).choice(
                [0, 0, 25, 60]), store=inherited)
        except BaseException:
            code = 1
            with open(f"{log}.error", "w") as f:  # for the report: why it failed
                f.write(traceback.format_exc())
        os._exit(code)
    return pid


def _sigkill_loop(base: pathlib.Path, rounds: int, writers: int) -> dict[str, Any]:
    state = str(base / "state")
    rng = random.Random(20240611)
    merged = Acked()
    unreadable = lost = problems = 0
    examples: list[str] = []
    killed = 0
    shared = Store(state)  # forked into some writers: the store must be fork-safe
    try:
        for r in range(rounds):
            logs = [str(base / f"r{r}w{w}") for w in range(writers)]
            pids = [_fork_writer(state, logs[w], rng.randrange(1 << 30),
                                 shared if rng.random() < 0.3 else None, rng.random() < 0.7)
                    for w in range(writers)]
            for pid in pids:  # kill each at its own random moment
                time.sleep(rng.uniform(0.0, 0.06))
                os.kill(pid, signal.SIGKILL)
            for pid in pids:
                status = wait_pid(pid)
                if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                    killed += 1
                elif os.WEXITSTATUS(status) != 0:
                    problems += 1
                    examples.append(f"round {r}: a writer failed before it was killed: "
                                    f"{_error_of(logs[pids.index(pid)])}")
            round_acks = read_acks(logs)
            merged.acks += round_acks.acks
            for rid, (rev, st) in round_acks.runs.items():
                if rev > merged.runs.get(rid, (0, ""))[0]:
                    merged.runs[rid] = (rev, st)
            runs, found = audit_store(state)
            if found and found[0].startswith("store unreadable"):
                unreadable += 1
            else:
                problems += len(found)
            missing = lost_acks(merged, runs) if runs or not found else []
            lost += len(missing)
            examples += [f"round {r}: {x}" for x in found + missing][:3]
            for log in logs:
                for name in (log, f"{log}.error"):
                    if os.path.exists(name):
                        os.unlink(name)
    finally:
        shared.close()
    return {"rounds": rounds, "writers_killed": killed, "acknowledged_calls": merged.acks,
            "runs": len(merged.runs), "unreadable_stores": unreadable,
            "lost_acknowledged_updates": lost, "other_problems": problems,
            "examples": examples[:5]}


def _error_of(log: str) -> str:
    """What a writer that failed wrote of its exception (its traceback, last lines)."""
    try:
        with open(f"{log}.error") as f:
            return " | ".join(f.read().strip().splitlines()[-6:])
    except OSError:
        return "(it left no traceback)"


def _check(capsys: Any, base: pathlib.Path, rounds: int) -> None:
    started = time.monotonic()
    result = _sigkill_loop(base, rounds, writers=3)
    examples = result.pop("examples")
    figure(capsys, "SIGKILL loop", **result, seconds=round(time.monotonic() - started, 1))
    assert result["unreadable_stores"] == 0, examples
    assert result["lost_acknowledged_updates"] == 0, examples
    assert result["other_problems"] == 0, examples
    assert result["acknowledged_calls"] > rounds  # the writers did get work done


def test_sigkill_loop(tmp_path: pathlib.Path, capsys: Any) -> None:
    """>= 200 rounds of 3 writers killed at random moments (CI size)."""
    _check(capsys, tmp_path, sized(200, 1000))


def test_sigkill_loop_compacting_often(tmp_path: pathlib.Path, capsys: Any,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with thresholds so low that the writers keep compacting on their own, beside
    the lock, while the others write: kills land in the middle of compactions and of the
    copying of what was appended meanwhile (CI size)."""
    monkeypatch.setattr(_limits, "COMPACT_MIN_SUPERSEDED", 16)
    monkeypatch.setattr(_limits, "RETAIN_CHANGES", 8)
    _check(capsys, tmp_path, sized(60, 300))
    header = orjson.loads((tmp_path / "state" / "runs.jsonl").read_bytes().split(b"\n")[0])
    assert header["compacted_through"] > 0


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_sigkill_loop_full(tmp_path: pathlib.Path, capsys: Any) -> None:
    """1,000 rounds (stress size). Each round's audit reads the whole store, which grows by
    the runs of every round: over 900 s on 2 cores."""
    _check(capsys, tmp_path, sized(1000, 1000, True))
