"""The stress run's worker processes: each runs ``Config.threads`` threads looping on the
dispatcher cycle and writes every call to a per-thread history file (invoke, then ack or
error, flushed at once) that the checks read afterwards.

``worker`` is what each worker process runs: the parent looks it up on this module when it
starts a process, and it is pickled by name, so a test may replace it with a module-level
function (or a ``functools.partial`` of one) that changes the process before calling it."""

from __future__ import annotations

import functools
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import orjson

from . import _owner
from .errors import InvalidTransitionError
from .model import PrepareOutcome, Run, Status
from .store import Store


@attrs.frozen
class Config:
    """What to run. ``attempts`` bounds the prepare attempts of the whole run (split over the
    threads) and ``seconds`` bounds its time."""

    procs: int = 4
    threads: int = 2
    machines: int = 4
    seconds: float = 10.0
    durable: bool = True
    state_dir: str | None = None
    kill: bool = False
    attempts: int | None = None
    lock_timeout: float = 30.0
    #: seconds a thread waits after REUSE/BUSY before its next attempt (a polling dispatcher)
    backoff: float = 0.0


def _history_name(slot: int, gen: int, thread: int) -> str:
    return f"w{slot:03d}g{gen:03d}t{thread:02d}.jsonl"


class _History:
    """A thread's write-ahead history file: one JSON array per line, flushed at once."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "ab", buffering=0)  # noqa: SIM115  # closed by close()

    def put(self, *item: Any) -> None:
        self._f.write(orjson.dumps(item) + b"\n")

    def close(self) -> None:
        self._f.close()


def worker(cfg: Config, state_dir: str, hist_dir: str, slot: int, gen: int, prefix: str,
            deadline_ns: int, attempts: Any, ops: Any, stop: Any) -> None:
    """One worker process: ``cfg.threads`` threads sharing one Store."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    store = Store(state_dir, durable=cfg.durable, lock_timeout=cfg.lock_timeout)
    budget = None
    if cfg.attempts is not None:
        budget = -(-cfg.attempts // (cfg.procs * cfg.threads))
    threads = [
        threading.Thread(target=_cycle, args=(cfg, store, hist_dir, slot, gen, t, prefix,
                                              deadline_ns, budget, attempts, ops, stop))
        for t in range(cfg.threads)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    store.close()


def _cycle(cfg: Config, store: Store, hist_dir: str, slot: int, gen: int, t: int, prefix: str,
           deadline_ns: int, budget: int | None, attempts: Any, ops: Any, stop: Any) -> None:
    idx = slot * cfg.threads + t
    rng = random.Random()
    hist = _History(os.path.join(hist_dir, _history_name(slot, gen, t)))
    now = time.monotonic_ns

    def call(op: str, key: str, fn: Callable[[], Any]) -> Any:
        hist.put("i", op, now(), key)
        try:
            result = fn()
        except Exception as exc:  # every failure is recorded; the checks count them
            hist.put("e", op, now(), type(exc).__name__, str(exc)[:300])
            time.sleep(0.001)  # a broken store may fail at once: do not spin
            return None
        ops[idx] += 1
        return result

    def ack(op: str, run: Run, outcome: str = "") -> None:
        hist.put("a", op, now(), run.id, run.machine, run.revision, run.status.value, outcome)

    try:
        while not stop.value and now() < deadline_ns:
            if budget is not None and attempts[idx] >= budget:
                break
            attempts[idx] += 1
            machine = f"{prefix}m{rng.randrange(cfg.machines)}"
            digest = f"h{rng.randrange(2)}"
            make = functools.partial(Run, machine=machine, test_dir=f"/tests/{digest}",
                                     test_dir_hash=digest)
            got = call("prepare", machine,
                       functools.partial(store.prepare_atomic, machine, digest, make))
            if got is None:
                continue
            run, outcome = got
            ack("prepare", run, outcome.value)
            if outcome is PrepareOutcome.CREATED:
                for op, fn in (("start", functools.partial(store.start, run.id)),
                               ("heartbeat", functools.partial(store.heartbeat, run.id)),
                               ("finish", functools.partial(store.finish, run.id,
                                                            Status.COMPLETED))):
                    done = call(op, run.id, fn)
                    if done is None:
                        break
                    ack(op, done)
            elif cfg.backoff and not cfg.kill:
                time.sleep(rng.uniform(0, 2 * cfg.backoff))
            elif cfg.kill and _owner.is_gone(run.owner_host, run.owner_pid, run.owner_start):
                # its worker was killed: finish it for it, as a dispatcher's reaper would
                done = call("finish", run.id, functools.partial(_reap_finish, store, run.id))
                if done is not None:
                    ack("finish", done)
    finally:
        hist.close()


def _reap_finish(store: Store, run_id: str) -> Run | None:
    """Interrupt a run whose owner is gone; None when the owner had finished it just before
    it was killed (after this worker's prepare saw it active): a race, not an error."""
    try:
        return store.finish(run_id, Status.INTERRUPTED)
    except InvalidTransitionError:
        if store.get(run_id).is_terminal:
            return None
        raise
