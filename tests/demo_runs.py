"""The four-run store the command-line tests read: ``done`` (m1, completed, exit 0, batch b1,
plan entry e1), ``failed`` (m1, exit 2, error E "boom"), ``running`` (m2) and ``pending``
(m3), with the hashes a test chooses."""

from __future__ import annotations

from typing import Any

from runstore import Run, RunStore, Status


def run_for(machine: str, h: str, **fields: Any) -> Run:
    """A run of ``machine`` with hash ``h`` in ``/tests/<machine>``."""
    return Run(machine=machine, test_dir=f"/tests/{machine}", test_dir_hash=h, **fields)


def four_runs(store: RunStore, hashes: tuple[str, str, str, str]) -> dict[str, str]:
    """Store the four runs (hashes in the order done, failed, running, pending); their ids by
    name."""
    done = store.create(run_for("m1", hashes[0], batch_id="b1", plan_entry="e1"))
    store.start(done.id)
    store.finish(done.id, Status.COMPLETED, exit_code=0)
    failed = store.create(run_for("m1", hashes[1]))
    store.start(failed.id)
    store.finish(failed.id, Status.FAILED, exit_code=2, error_code="E", error_msg="boom")
    running = store.create(run_for("m2", hashes[2]))
    store.start(running.id)
    pending = store.create(run_for("m3", hashes[3]))
    return {"done": done.id, "failed": failed.id, "running": running.id,
            "pending": pending.id}
