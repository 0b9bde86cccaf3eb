"""Child processes of the fault suite: ``writer`` (a dispatcher-like writer logging what it
acknowledged, for the failpoint and SIGKILL tests), ``spawn_python``, ``wait_pid``,
``stop_all``, ``in_thread``, ``as_nobody`` and ``failpoint_names`` (every failpoint in the
package's source)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from runstore import Run, Status, Store
from runstore.errors import RunstoreError

from .acks import AckLog
from .basics import run_for

# -- small process helpers ------------------------------------------------------------------


#: the uid and gid a root test drops to (root reads and writes whatever the modes say)
NOBODY = 65534


def as_nobody(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child, as uid/gid ``NOBODY`` when this is root; return the text
    it returned, or ``child failed: <error>``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            out = fn()
        except BaseException as exc:
            out = f"child failed: {type(exc).__name__}: {exc}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    wait_pid(pid)
    return b"".join(chunks).decode()


def wait_pid(pid: int, timeout: float = 30.0) -> int:
    """waitpid with a deadline; returns the raw wait status (kills the child on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.002)


def stop_all(procs: Any) -> None:
    """Kill each of ``procs`` (``multiprocessing`` processes) that is still alive, then join
    them all: the ``finally`` of a test that started workers."""
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()


def in_thread(fn: Callable[[], Any]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


# -- writer processes for the failpoint and SIGKILL tests -----------------------------------


def failpoint_names() -> list[str]:
    """Every ``failpoints.hit("...")`` in the package's source (new points are covered
    automatically)."""
    import re

    import runstore

    names: set[str] = set()
    pkg = os.path.dirname(runstore.__file__)
    for name in os.listdir(pkg):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name), encoding="utf-8") as f:
                names.update(re.findall(r'failpoints\.hit\("([^"]+)"\)', f.read()))
    return sorted(names)


def writer(state_dir: str, log_path: str, seed: int, *, ops: int = 10**9, durable: bool = True,
           machines: int = 4, compact_every: int = 0, prune_every: int = 0,
           archive: str = "", store: Store | None = None) -> None:
    """A dispatcher-like writer: random prepare (reaping dead owners) / start / heartbeat /
    finish / update, plus ``compact()`` and ``prune()`` every so many operations, each call
    logged before (invoke) and after (ack) in ``log_path``."""
    rng = random.Random(seed)
    log = AckLog(log_path)
    own = store if store is not None else Store(state_dir, durable=durable, lock_timeout=30)
    mine: list[Run] = []
    for n in range(1, ops + 1):
        if compact_every and n % compact_every == 0:
            log.invoke("compact")
            own.compact()
            log.ack("compact")
            continue
        if prune_every and n % prune_every == 0:
            log.invoke("prune")
            own.prune(keep_last=rng.randrange(1, 4), archive=archive or None)
            log.ack("prune")
            continue
        if not mine or rng.random() < 0.3:
            m, d = f"m{rng.randrange(machines)}", f"h{rng.randrange(2)}"
            log.invoke("prepare", m)
            run, outcome = own.prepare_atomic(m, d, lambda m=m, d=d: run_for(m, d), reap=True)
            log.ack("prepare", run)
            if outcome.value == "created":
                mine.append(run)
            continue
        run = rng.choice(mine)
        roll = rng.random()
        try:
            if run.status is Status.PENDING and roll < 0.5:
                log.invoke("start", run.id)
                new = own.start(run.id)
            elif roll < 0.7:
                log.invoke("heartbeat", run.id)
                new = own.heartbeat(run.id)
            elif roll < 0.8:
                log.invoke("update", run.id)
                new = own.update(attrs.evolve(run, logs_path=f"/l/{n}"))
            else:
                st = Status.COMPLETED if run.status is Status.RUNNING else Status.FAILED
                log.invoke("finish", run.id)
                new = own.finish(run.id, st)
        except RunstoreError:  # reaped or changed by another writer: forget it
            log.ack("error")
            mine.remove(run)
            continue
        log.ack("change", new)
        mine.remove(run)
        if not new.is_terminal:
            mine.append(new)
    own.close()
    log.close()


def spawn_python(code: str, env: dict[str, str] | None = None) -> Any:
    """Start ``python -c code`` with the tests directory importable."""

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join([here, full.get("PYTHONPATH", "")])
    full.update(env or {})
    return subprocess.Popen([sys.executable, "-c", code], env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
