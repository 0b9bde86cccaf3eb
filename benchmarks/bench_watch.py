"""Delay from commit to delivery of ``Store.watch`` across processes.

A writer process stamps each change with ``time.time_ns()`` in ``logs_path`` right before
committing it; a watcher process records when each arrives. Prints the median and p99 delay
(target: median <= 50 ms).

    python benchmarks/bench_watch.py --changes 500 --interval 0.005
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time

import attrs

import runstore


def _writer(state: str, changes: int, interval: float, go: str) -> None:
    while not os.path.exists(go):
        time.sleep(0.001)
    with runstore.Store(state) as store:
        run = store.create(runstore.Run("m1", "/t", "h"))
        for _ in range(changes):
            run = store.update(attrs.evolve(run, logs_path=str(time.time_ns())))
            time.sleep(interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=500)
    parser.add_argument("--interval", type=float, default=0.005)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state, go = os.path.join(tmp, "s"), os.path.join(tmp, "go")
        runstore.Store(state).close()
        writer = multiprocessing.get_context("spawn").Process(
            target=_writer, args=(state, args.changes, args.interval, go))
        writer.start()
        delays = []
        with runstore.Store(state) as store:
            open(go, "w").close()
            for change in store.watch(0, timeout=60 + args.changes * args.interval):
                if change.type is runstore.ChangeType.RUN_UPDATED:
                    delays.append((time.time_ns() - int(change.run.logs_path)) / 1e6)
                    if len(delays) == args.changes:
                        break
        writer.join()
    delays.sort()
    median = statistics.median(delays)
    p99 = delays[int(len(delays) * 0.99) - 1]
    print(f"watch delivery delay over {len(delays)} changes: median {median:.2f} ms, "
          f"p99 {p99:.2f} ms, max {delays[-1]:.2f} ms "
          f"(target median <= 50 ms: {'PASS' if median <= 50 else 'FAIL'})")


if __name__ == "__main__":
    main()
