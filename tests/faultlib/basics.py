"""Small helpers of the fault suite: loop sizes scaled by ``RUNSTORE_STRESS_SCALE``
(``sized``), figures printed into the CI log (``figure``), a run (``run_for``), a dispatcher
cycle and history on a store, the whole view of a store, its checkpoint lines, a directory's
bytes and this process's open descriptors."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import Any

import pytest

from runstore import PrepareOutcome, Run, Status, Store, _codec as codec, _journal as journal

# -- sizes and figures ----------------------------------------------------------------------


def scale() -> float:
    """``RUNSTORE_STRESS_SCALE`` (default 1): multiplies every loop count of the suite."""
    return float(os.environ.get("RUNSTORE_STRESS_SCALE", "1"))


def sized(ci: int, full: int, full_size: bool = False) -> int:
    """The number of iterations: ``full`` under the stress marker, else ``ci``, scaled."""
    return max(1, round((full if full_size else ci) * scale()))


def figure(capsys: Any, family: str, **numbers: Any) -> None:
    """Print one line of figures so that it appears in the CI log even when output is
    captured."""
    text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in numbers.items())
    with capsys.disabled():
        print(f"\n[fault figures] {family}: {text}", flush=True)


def open_fds() -> set[str]:
    """The descriptors open in this process (to prove none leaked)."""
    return set(os.listdir("/proc/self/fd"))


def run_for(machine: str = "m1", digest: str = "h1", **fields: Any) -> Run:
    return Run(machine=machine, test_dir=f"/tests/{digest}", test_dir_hash=digest, **fields)


def snapshot_dir(path: str) -> dict[str, bytes]:
    """Every regular file of a directory with its bytes (to prove a file was not changed)."""
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        st = os.lstat(full)
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                out[name] = f.read()
    return out


# -- store helpers: a cycle, the whole view, checkpoint lines -------------------------------


def cycle(store: Store, machine: str, test_dir: str = "/t") -> str:
    """One dispatcher cycle (prepare, start, finish completed) on ``machine``; the run id."""
    run, _ = store.prepare_atomic(machine, "h", lambda: Run(machine, test_dir, "h"))
    store.start(run.id)
    store.finish(run.id, Status.COMPLETED, exit_code=0)
    return run.id


def history(store: Any, n: int, machines: int = 13, prefix: str = "m") -> None:
    """``n`` prepare/start/finish cycles on ``machines`` machines named ``prefix`` + a
    number, on any backend: some runs left pending or running, a reused one failed."""
    for i in range(n):
        m = f"{prefix}{i % machines}"
        run, outcome = store.prepare_atomic(m, "h", lambda m=m: Run(m, "/t", "h"))
        if outcome is not PrepareOutcome.CREATED:
            if run.status is Status.PENDING:
                store.start(run.id)
            store.finish(run.id, Status.FAILED, exit_code=1)
            continue
        if i % 4:
            store.start(run.id)
        if i % 4 > 1:
            store.finish(run.id, Status.COMPLETED, exit_code=0)


def mixed(s: Store, n: int = 40) -> None:
    """``n`` runs on machines ``m0``.. (hash ``h<i>``): most finished, failed or completed;
    every fifth machine left pending, every fifth other one running."""
    for i in range(n):
        machine = f"m{i}"
        run, _ = s.prepare_atomic(machine, f"h{i}", lambda m=machine, i=i: Run(m, "/t", f"h{i}"))
        if i % 5 == 1:
            continue  # stays pending
        s.start(run.id)
        if i % 5 != 2:  # else stays running
            s.finish(run.id, Status.FAILED if i % 2 else Status.COMPLETED, exit_code=i % 3)


def view(store: Store) -> tuple[object, ...]:
    """Everything a caller can see of a store's view, the change feed included."""
    stats = store.stats()
    return (store.list(), store.active(), store.last_seq(), list(store.changes(0)),
            stats.runs, stats.superseded_lines, stats.oldest_seq,
            [store.active_by_machine(f"m{i}") for i in range(6)])


@contextlib.contextmanager
def full_reading() -> Iterator[None]:
    """Opening as before checkpoints: every line since the base read."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(journal.Journal, "last_checkpoint", lambda self, lo, hi: None)
        yield


def checkpoints(path: str | os.PathLike[str]) -> list[tuple[int, bytes]]:
    """The checkpoint lines of a journal, each with its offset."""
    out, offset = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(codec.CHECKPOINT_START):
                out.append((offset, line))
            offset += len(line)
    return out
