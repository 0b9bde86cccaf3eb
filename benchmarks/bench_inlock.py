"""Where the dispatcher cycle's time goes inside runstore, and one code version against another.

Three measurements, each of the cycle on a fresh store, not durable unless ``--durable``
(prepare_atomic on one of 50 machines; when created, start, get and finish):

* ``--procs 2`` (default): P processes for ``--seconds``; operations/s, and per call the mean
  time under the flock and in all (the flock's taking and release are timed from inside
  ``runstore._lock``, so the figures include that instrumentation); with ``--durable`` also
  the time in ``fdatasync`` (after the flock is released: group commit), which tells how
  much of a durable write the disk's cache flush is and how much is runstore's own work;
* ``--against DIR``: the same without timing, alternating rounds between the runstore under
  ``DIR`` (a checkout of another commit: ``git worktree add /tmp/before COMMIT``) and this
  one; operations/s of each and their ratio;
* ``--turns N``: one process, two stores on one directory taking turns for N rounds (every
  write catches up with the other's line, as with two processes), for counting instructions:
  ``valgrind --tool=callgrind python -m benchmarks.bench_inlock --turns 1000``, minus the
  count of ``--turns 1``, divided by the operations printed.

    python -m benchmarks.bench_inlock --seconds 8
    python -m benchmarks.bench_inlock --seconds 8 --durable
    python -m benchmarks.bench_inlock --against /tmp/before --rounds 5 --seconds 5
"""

from __future__ import annotations

import argparse
import collections
import functools
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

_CALLS = ("prepare_atomic", "start", "finish")
#: the checkout this file is in
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cycles(store: Any, run_cls: Any, created: Any, seconds: float, seed: int) -> int:
    rng = random.Random(seed)
    names = [f"m{i}" for i in range(50)]
    ops = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        machine, digest = names[rng.randrange(50)], ("a", "b")[rng.randrange(2)]
        make = functools.partial(run_cls, machine, f"/srv/{machine}/{digest}", digest)
        run, outcome = store.prepare_atomic(machine, digest, make)
        ops += 1
        if outcome is created:
            store.start(run.id)
            store.get(run.id)
            store.finish(run.id, "completed", exit_code=0)
            ops += 3
    return ops


def _timed() -> dict[str, list[int]]:
    """Wrap runstore's lock, sync and Store calls: {call: [ns under the flock, ns in all,
    count, ns in fdatasync]}."""
    from runstore import _journal as journal, _lock as lock, store

    spent: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])
    now = time.perf_counter_ns
    state = {"call": "", "taken": 0}
    take, release = lock.flock_until, lock.StoreLock.release_file

    def flock_until(*args: Any) -> None:
        take(*args)
        state["taken"] = now()

    def release_file(self: Any) -> None:
        if state["taken"]:
            spent[state["call"]][0] += now() - state["taken"]
            state["taken"] = 0
        release(self)

    sync = journal.Journal.sync

    def timed_sync(self: Any) -> None:
        started = now()
        try:
            sync(self)
        finally:
            spent[state["call"]][3] += now() - started

    lock.flock_until = flock_until  # type: ignore[assignment]
    lock.StoreLock.release_file = release_file  # type: ignore[method-assign]
    journal.Journal.sync = timed_sync  # type: ignore[method-assign]
    for name in _CALLS:
        method = getattr(store.Store, name)

        def call(*args: Any, _method: Any = method, _name: str = name, **kw: Any) -> Any:
            state["call"] = _name
            started = now()
            try:
                return _method(*args, **kw)
            finally:
                spent[_name][1] += now() - started
                spent[_name][2] += 1

        setattr(store.Store, name, call)
    return spent


def _worker(where: str, seconds: float, seed: int, timed: bool, durable: bool,
            out: Any) -> None:
    import runstore

    spent = _timed() if timed else {}
    with runstore.Store(where, durable=durable) as store:
        ops = _cycles(store, runstore.Run, runstore.PrepareOutcome.CREATED, seconds, seed)
    out.put((ops, {k: list(v) for k, v in spent.items()}))


def _processes(procs: int, seconds: float, timed: bool,
               durable: bool = False) -> tuple[float, dict[str, list[int]]]:
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as where:
        import runstore

        runstore.Store(where, durable=False).close()
        out = ctx.Queue()
        workers = [ctx.Process(target=_worker, args=(where, seconds, i, timed, durable, out))
                   for i in range(procs)]
        for w in workers:
            w.start()
        results = [out.get() for _ in workers]
        for w in workers:
            w.join()
    total: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])
    for _, spent in results:
        for name, figures in spent.items():
            total[name] = [a + b for a, b in zip(total[name], figures, strict=True)]
    return sum(ops for ops, _ in results) / seconds, dict(total)


def _turns(rounds: int, durable: bool = False) -> int:
    import runstore

    with tempfile.TemporaryDirectory() as where:
        stores = [runstore.Store(where, durable=durable), runstore.Store(where, durable=durable)]
        rng, ops = random.Random(1), 0
        for _ in range(rounds):
            made = []
            for store in stores:
                machine, digest = f"m{rng.randrange(50)}", ("a", "b")[rng.randrange(2)]
                run, outcome = store.prepare_atomic(machine, digest, functools.partial(
                    runstore.Run, machine, "/t", digest))
                made.append(run if outcome is runstore.PrepareOutcome.CREATED else None)
            ops += 2
            for step in ("start", "get", "finish"):
                for store, run in zip(stores, made, strict=True):
                    if run is None:
                        continue
                    if step == "finish":
                        store.finish(run.id, "completed", exit_code=0)
                    else:
                        getattr(store, step)(run.id)
                    ops += 1
        for store in stores:
            store.close()
    return ops


def _one_round(checkout: str | None, procs: int, seconds: float, durable: bool) -> float:
    """Operations/s of one untimed run in a new interpreter importing runstore from
    ``checkout`` (None: the checkout this file is in)."""
    env = dict(os.environ, BENCH_RUNSTORE=checkout or _HERE)
    argv = [sys.executable, os.path.abspath(__file__), "--procs", str(procs), "--seconds",
            str(seconds), "--untimed", *(["--durable"] if durable else [])]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_inlock",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--against", metavar="DIR", help="a checkout of another commit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, help="one process, two stores taking turns")
    parser.add_argument("--durable", action="store_true",
                        help="durable stores (timed: also the time in fdatasync)")
    parser.add_argument("--untimed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.environ.get("BENCH_RUNSTORE", _HERE))  # which runstore to measure
    if args.turns is not None:
        print(f"{_turns(args.turns, args.durable)} operations")
        return 0
    if args.untimed:
        print(f"{_processes(args.procs, args.seconds, False, args.durable)[0]:.0f} ops/s")
        return 0
    if args.against:
        pairs = []
        for r in range(args.rounds):
            order = [args.against, None] if r % 2 == 0 else [None, args.against]
            got = {str(c): _one_round(c, args.procs, args.seconds, args.durable)
                   for c in order}
            pairs.append((got[str(args.against)], got["None"]))
            print(f"round {r + 1}: {args.against} {pairs[-1][0]:,.0f}, "
                  f"this {pairs[-1][1]:,.0f} ops/s")
        before = sum(p[0] for p in pairs) / len(pairs)
        after = sum(p[1] for p in pairs) / len(pairs)
        ratios = sorted(p[1] / p[0] for p in pairs)
        print(f"mean: {args.against} {before:,.0f}, this {after:,.0f} ops/s, "
              f"this / that {after / before:.3f}; median of the rounds' ratios "
              f"{statistics.median(ratios):.3f}")
        return 0
    rate, spent = _processes(args.procs, args.seconds, True, args.durable)
    kind = "durable" if args.durable else "not durable"
    print(f"{args.procs} processes, {kind}: {rate:,.0f} ops/s (timed from inside)")
    for name in _CALLS:
        held, whole, count, synced = spent.get(name, [0, 0, 0, 0])
        if count:
            sync = f", in fdatasync {synced / count / 1000:6.1f} us" if args.durable else ""
            print(f"  {name:15s} under the flock {held / count / 1000:6.1f} us{sync}, "
                  f"in all {whole / count / 1000:6.1f} us  ({count:,} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
