"""``python -m runstore stress``: many processes x threads run the dispatcher cycle on one store,
then the history they recorded is checked against the store's guarantees.

Each worker thread loops: ``prepare_atomic`` on a random machine (two hashes per machine, so
REUSE and BUSY happen too); when it CREATED a run it calls ``start``, ``heartbeat`` and
``finish``. Before each call it writes an *invoke* line and after it an *ack* (or *error*)
line to its own history file, flushed at once, with ``time.monotonic_ns`` (one clock for the
whole host), so a worker killed with SIGKILL (``--kill``) leaves behind exactly what it had
acknowledged. Afterwards the histories, the journal file and a freshly opened store are checked:

* one active run per machine: the interval in which a run was provably active (from the
  acknowledgement of its create to the first invocation of its finish) never overlaps another
  run's on the same machine;
* no run id created twice (histories and journal);
* the journal's sequence numbers are unique and gap-free after the compacted base, every line
  passes its checksum;
* every acknowledged change is in the reopened store (the run's revision is the acknowledged
  one or later; a finished run is exactly as acknowledged);
* no stale read: REUSE/BUSY never returns a run whose finish had been acknowledged before the
  ``prepare_atomic`` was called;
* the reopened store lists every run without error.

The exit status is 1 when any check found a violation. ``main(argv)`` is what the CLI calls.
The workers live in ``_stress_work``, the checks in ``_stress_check`` and the independent
journal checker in ``_stress_journal``; this module runs them and reports.

Memory does not grow with the number of operations, only with the number of runs: the
histories are read line by line (twice: the second pass checks each REUSE/BUSY answer against
what the whole first pass learned), latencies go into a histogram of bounded size, each run is
kept as a few numbers (its first and last events, its acknowledged revision), as is the
reopened store's version of it, and ``runstore.check``, runs in a
child process. ``stress --seconds 100`` (4 x 2, 1.5 million operations, 40,000 runs) peaks at
76 MB, 12 s at 32 MB; keeping every history line and latency took 1.7 GB at 100 s.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NoReturn

from . import _stress_work
from ._cli_args import _location, _positive_int
from ._stress_check import Check, Latencies, Proc, analyse
from ._stress_journal import JournalCheck, check_journal
from ._stress_work import Config
from .errors import RunstoreError
from .store import Store

__all__ = ["Check", "Config", "JournalCheck", "Latencies", "check_journal", "main", "run"]


def run(cfg: Config, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the stress test described by ``cfg`` and return its report (a JSON-ready dict with
    ``ok`` False when any check found a violation)."""
    base = tempfile.mkdtemp(prefix="runstore-stress-")
    try:
        state_dir = cfg.state_dir or os.path.join(base, "state")
        hist_dir = os.path.join(base, "history")
        os.mkdir(hist_dir)
        return _run(cfg, state_dir, hist_dir, progress)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(cfg: Config, state_dir: str, hist_dir: str,
         progress: Callable[[str], None] | None) -> dict[str, Any]:
    prefix = f"s{os.getpid()}-{random.randrange(1 << 32):08x}-"
    Store(state_dir, durable=cfg.durable).close()  # create it before the workers race
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["runstore.stress"])
    slots = cfg.procs * cfg.threads
    attempts = ctx.RawArray(ctypes.c_long, slots)
    ops = ctx.RawArray(ctypes.c_long, slots)
    stop = ctx.RawValue(ctypes.c_int, 0)
    started = time.monotonic_ns()
    deadline = started + int(cfg.seconds * 1e9)
    procs: list[Proc] = []
    live: dict[int, Proc] = {}

    def spawn(slot: int, gen: int) -> None:
        p = ctx.Process(target=_stress_work.worker, name=f"runstore-stress-{slot}-{gen}",
                        args=(cfg, state_dir, hist_dir, slot, gen, prefix, deadline,
                              attempts, ops, stop))
        p.start()
        rec = Proc(slot, gen, p, pid=p.pid or 0)
        procs.append(rec)
        live[slot] = rec

    rng = random.Random()
    kills = 0
    try:
        for slot in range(cfg.procs):
            spawn(slot, 0)
        next_kill = time.monotonic_ns() + int(rng.uniform(0.1, 0.5) * 1e9)
        next_note = 0
        while any(r.process.is_alive() for r in live.values()):
            now = time.monotonic_ns()
            if cfg.kill and now < deadline - 200_000_000 and now >= next_kill:
                victim = live[rng.randrange(cfg.procs)]
                if victim.process.is_alive():
                    victim.killed_ns = time.monotonic_ns()
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim.pid, signal.SIGKILL)
                    victim.process.join()
                    victim.dead_ns = time.monotonic_ns()
                    kills += 1
                    spawn(victim.slot, victim.gen + 1)
                next_kill = now + int(rng.uniform(0.1, 0.5) * 1e9)
            if progress is not None and now >= next_note:
                elapsed = (now - started) / 1e9
                total = sum(ops)
                progress(f"{elapsed:5.1f}/{cfg.seconds:g} s  {total} ops  "
                         f"{total / max(elapsed, 1e-9):,.0f} ops/s  kills {kills}")
                next_note = now + 250_000_000
            time.sleep(0.02)
    except BaseException:
        stop.value = 1
        for r in procs:
            r.process.join(5)
            if r.process.is_alive():
                r.process.kill()
                r.process.join()
        raise
    for r in procs:
        r.process.join()
        if not r.dead_ns:
            r.dead_ns = time.monotonic_ns()
    elapsed = (time.monotonic_ns() - started) / 1e9
    report = analyse(cfg, state_dir, hist_dir, prefix, procs)
    report["seconds"] = round(elapsed, 3)
    report["kills"] = kills
    report["ops_per_second"] = round(report["operations"] / max(elapsed, 1e-9), 1)
    report["crashed_workers"] = sum(
        1 for r in procs if not r.killed_ns and r.process.exitcode != 0)
    if report["crashed_workers"]:
        report["ok"] = False
    return report


# -- the command ----------------------------------------------------------------------------


def _format(report: dict[str, Any]) -> str:
    cfg = report["config"]
    out = [
        f"runstore stress: {cfg['procs']} processes x {cfg['threads']} threads, "
        f"{cfg['machines']} machines, {'durable' if cfg['durable'] else 'not durable'}"
        + (", killing workers" if cfg["kill"] else "")
        + f", {report['seconds']:.1f} s",
        f"operations: {report['operations']}  ({report['ops_per_second']:,.0f} ops/s)"
        + (f", {report['kills']} workers killed" if cfg["kill"] else ""),
        "latency (us):   " + "   ".join(
            f"{op} p50 {v['p50']:.0f} p99 {v['p99']:.0f}"
            for op, v in report["latency_us"].items() if v["count"]),
        "outcomes:       " + "  ".join(f"{k} {v}" for k, v in report["outcomes"].items())
        + ("  errors " + ", ".join(f"{k} {v}" for k, v in report["errors"].items())
           if report["errors"] else ""),
        "checks:",
    ]
    for c in report["checks"]:
        mark = "ok  " if not c["violations"] else "FAIL"
        out.append(f"  {mark} {c['name']}: {c['checked']} checked, {c['violations']} violations")
        out.extend(f"         e.g. {e}" for e in c["examples"])
    if report.get("crashed_workers"):
        out.append(f"  FAIL {report['crashed_workers']} workers exited abnormally")
    out.append("result: " + ("OK" if report["ok"] else
                             f"{report['violations']} VIOLATIONS"))
    return "\n".join(out)


def _show_progress(line: str) -> None:
    sys.stderr.write("\r\x1b[K" + line)
    sys.stderr.flush()


#: the upper bounds of the options (``stress --help`` states them)
MAX_PROCS = 256
MAX_THREADS = 256
MAX_MACHINES = 10_000
MAX_SECONDS = 86_400.0


def _count(most: int) -> Callable[[str], int]:
    """The type of an option that counts: an integer from 1 to ``most``."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(
                f"expected an integer from 1 to {most:,}, got {text!r}")
        return value

    count.__name__ = "count"
    return count


def _duration(text: str) -> float:
    """``--seconds``: a finite number above 0, at most ``MAX_SECONDS``."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= MAX_SECONDS:  # False for nan, too
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds above 0, at most {MAX_SECONDS:,.0f}, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), as for the other
    commands."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m runstore stress",
        description="Run the dispatcher cycle from many processes and threads on one store, "
                    "then check the store's guarantees; exits 1 on any violation, 2 on a "
                    "bad option.")
    p.add_argument("--procs", type=_count(MAX_PROCS), default=4,
                   help=f"worker processes, 1 to {MAX_PROCS} (default 4)")
    p.add_argument("--threads", type=_count(MAX_THREADS), default=2,
                   help=f"threads per process, 1 to {MAX_THREADS} (default 2)")
    p.add_argument("--machines", type=_count(MAX_MACHINES), default=4,
                   help=f"machines to contend for, 1 to {MAX_MACHINES:,} (default 4)")
    p.add_argument("--seconds", type=_duration, default=10.0,
                   help=f"how long to run, above 0 and at most {MAX_SECONDS:,.0f} "
                        "(default 10)")
    p.add_argument("--attempts", type=_positive_int, default=None,
                   help="stop after this many prepare attempts in total, at least 1 "
                        "(default: no limit)")
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True,
                   help="fdatasync every change (default: on)")
    p.add_argument("--state-dir", type=_location, default=None,
                   help="the store to use (default: a fresh temporary one, removed afterwards)")
    p.add_argument("--kill", action="store_true",
                   help="SIGKILL random workers during the run and start replacements")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def main(argv: list[str]) -> int:
    """``python -m runstore stress [options]``; returns the exit status (2 for a bad
    option, every option checked before anything runs)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    cfg = Config(procs=args.procs, threads=args.threads, machines=args.machines,
                 seconds=args.seconds, durable=args.durable, state_dir=args.state_dir,
                 kill=args.kill, attempts=args.attempts)
    progress = _show_progress if sys.stderr.isatty() else None
    try:
        report = run(cfg, progress=progress)
    except (RunstoreError, OSError) as exc:
        print(f"runstore stress: {exc}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
    print(json.dumps(report) if args.json else _format(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
