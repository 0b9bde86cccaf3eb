"""The dispatcher cycle raced by threads and processes, and the checks of its outcome, shared by
the race tests of both backends (stress/test_concurrency.py, postgres/test_postgres.py)."""

from __future__ import annotations

import collections
import random
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

from runstore import PrepareOutcome, Run, Status, Store

HASHES = ("h-a", "h-b")


def cycle(store: Store, machines: Sequence[str], attempts: int, seed: int,
           make_delay: float = 0.0) -> dict[str, Any]:
    """Run ``attempts`` dispatcher cycles; log (machine, id, t_active, t_end) per created run.

    ``t_active`` is taken right after prepare_atomic returned CREATED and ``t_end`` right
    before finish() is called, so [t_active, t_end] lies inside the time the run was really
    non-terminal: two logged intervals of one machine may never overlap.
    """
    rng = random.Random(seed)
    created: list[tuple[str, str, float, float]] = []
    counts: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    for _ in range(attempts):
        machine, h = rng.choice(machines), rng.choice(HASHES)

        def make(machine: str = machine, h: str = h) -> Run:
            if make_delay:
                time.sleep(make_delay)
            return Run(machine, f"/tests/{h}", h)

        try:
            run, outcome = store.prepare_atomic(machine, h, make)
            counts[outcome.name] += 1
            if outcome is not PrepareOutcome.CREATED:
                if run.machine != machine or run.is_terminal:
                    errors.append(f"{outcome.name} returned {run!r} for {machine}")
                if (run.test_dir_hash == h) != (outcome is PrepareOutcome.REUSE):
                    errors.append(f"{outcome.name} for hash {h} returned {run.test_dir_hash}")
                continue
            t_active = time.monotonic()
            store.start(run.id)
            if rng.random() < 0.2:
                store.heartbeat(run.id)
            t_end = time.monotonic()
            store.finish(run.id, Status.COMPLETED, exit_code=0)
            created.append((machine, run.id, t_active, t_end))
        except Exception:
            errors.append(traceback.format_exc())
            break
    return {"created": created, "counts": dict(counts), "errors": errors}


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"created": [], "counts": collections.Counter(), "errors": []}
    for result in results:
        merged["created"] += [tuple(c) for c in result["created"]]
        merged["counts"].update(result["counts"])
        merged["errors"] += result["errors"]
    return merged


def threads(store_for: Any, machines: Sequence[str], attempts: int, threads: int,
             seed: int, make_delay: float = 0.0) -> dict[str, Any]:
    results: list[dict[str, Any]] = [{} for _ in range(threads)]

    def body(i: int) -> None:
        results[i] = cycle(store_for(i), machines, attempts, seed * 1000 + i, make_delay)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return merge(results)


def overlaps(created: Sequence[tuple[str, str, float, float]]) -> list[tuple[str, str]]:
    """Pairs of runs of one machine whose logged active intervals overlap."""
    by_machine: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for machine, run_id, t_active, t_end in created:
        by_machine[machine].append((t_active, t_end, run_id))
    bad = []
    for spans in by_machine.values():
        spans.sort()
        latest_end, latest_id = float("-inf"), ""
        for t_active, t_end, run_id in spans:
            if t_active < latest_end:
                bad.append((latest_id, run_id))
            if t_end > latest_end:
                latest_end, latest_id = t_end, run_id
    return bad


def replay(records: Sequence[dict[str, Any]]) -> list[str]:
    """Problems found by replaying the records in seq order: two non-terminal runs of one
    machine at once, ids out of creation order, versions out of revision order."""
    problems = []
    status: dict[str, str] = {}
    revision: dict[str, int] = {}
    active: dict[str, set[str]] = collections.defaultdict(set)
    last_created = ""
    for d in records:
        run_id, machine = d["id"], d["machine"]
        if d["change"] == "run_created":
            if run_id in status:
                problems.append(f"seq {d['seq']}: id {run_id} created twice")
            if run_id <= last_created:
                problems.append(f"seq {d['seq']}: id {run_id} sorts before {last_created}")
            last_created = run_id
        elif d["revision"] != revision.get(run_id, 0) + 1:
            problems.append(f"seq {d['seq']}: {run_id} revision {d['revision']} after "
                            f"{revision.get(run_id)}")
        status[run_id], revision[run_id] = d["status"], d["revision"]
        if d["status"] in ("pending", "running"):
            active[machine].add(run_id)
        else:
            active[machine].discard(run_id)
        if len(active[machine]) > 1:
            problems.append(f"seq {d['seq']}: {machine} has active runs {sorted(active[machine])}")
    return problems
