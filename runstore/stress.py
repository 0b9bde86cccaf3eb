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

Memory does not grow with the number of operations, only with the number of runs: the
histories are read line by line (twice: the second pass checks each REUSE/BUSY answer against
what the whole first pass learned), latencies go into a histogram of bounded size, each run is
kept as a few numbers (its first and last events, its acknowledged revision), as is the
reopened store's version of it, and ``runstore.check``, which holds the whole file, runs in a
child process. ``stress --seconds 100`` (4 x 2, 1.5 million operations, 40,000 runs) peaks at
76 MB, 12 s at 32 MB; keeping every history line and latency took 1.7 GB at 100 s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import functools
import importlib
import json
import multiprocessing
import multiprocessing.sharedctypes
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NamedTuple

import attrs
import orjson

from . import codec, owner
from .errors import InvalidTransitionError, RunstoreError
from .model import PrepareOutcome, Run, Status
from .store import Store

_INF = 1 << 62
_OPS = ("prepare", "start", "heartbeat", "finish")


@attrs.frozen
class Config:
    """What to run. ``attempts`` bounds the prepare attempts of the whole run (split over the
    threads) and ``seconds`` bounds its time; ``setup`` ("module:function") is called in every
    worker process before it opens the store (the fault suite uses it to break locking)."""

    procs: int = 4
    threads: int = 2
    machines: int = 4
    seconds: float = 10.0
    durable: bool = True
    state_dir: str | None = None
    kill: bool = False
    attempts: int | None = None
    setup: str | None = None
    lock_timeout: float = 30.0
    #: seconds a thread waits after REUSE/BUSY before its next attempt (a polling dispatcher)
    backoff: float = 0.0


@attrs.define
class Check:
    """One verified property: how many items were checked and how many violated it."""

    name: str
    checked: int = 0
    violations: int = 0
    examples: list[str] = attrs.Factory(list)

    def fail(self, example: str) -> None:
        self.violations += 1
        if len(self.examples) < 5:
            self.examples.append(example)


@attrs.define
class JournalCheck:
    """What ``check_journal`` found in a journal file."""

    records: int = 0
    base_records: int = 0
    marks: int = 0
    first_seq: int = 0
    last_seq: int = 0
    problems: list[str] = attrs.Factory(list)
    duplicate_ids: list[str] = attrs.Factory(list)
    #: the offset of an incomplete last line (a write a crash cut short, which the next
    #: write to the store cuts off; reads leave it), else None
    torn_tail: int | None = None


def check_journal(path: str) -> JournalCheck:
    """Re-check a journal file from scratch, independently of the store's reader: every line
    ends in a newline and passes its checksum; the compacted base (the latest version of each
    run) holds each run and each sequence number once; after it (retained history, then
    appends) sequence numbers run on from ``compacted_through + 1`` without a gap and no run
    has two ``run_created`` lines."""
    out = JournalCheck()
    with open(path, "rb") as f:  # read a line at a time: the file may be large
        first = f.readline()
        if not first:
            out.problems.append("empty file")
            return out
        if not first.endswith(b"\n"):
            out.problems.append("incomplete last line at byte 0")
            return out
        try:
            head = codec.decode_line(first[:-1])
            through, base = int(head["compacted_through"]), int(head["base_bytes"])
            legacy = int(head["version"]) < codec.KINDS_BY_FIRST_KEY
        except (codec.BadLine, KeyError, TypeError, ValueError, IndexError) as exc:
            out.problems.append(f"bad header: {exc}")
            return out
        _check_journal_lines(f, len(first), through, base, legacy, out)
    return out


def _check_journal_lines(f: BinaryIO, offset: int, through: int, base: int, legacy: bool,
                         out: JournalCheck) -> None:
    base_end = offset + base
    expected = through + 1
    base_seqs: set[int] = set()
    base_ids: set[str] = set()
    created: set[str] = set()
    out.first_seq = expected
    for raw in f:
        if not raw.endswith(b"\n"):
            out.torn_tail = offset
            break
        line = raw[:-1]
        try:
            rec = codec.decode_line(line)
            mark = codec.is_mark(line, rec, legacy)
        except codec.BadLine as exc:
            out.problems.append(f"byte {offset}: {exc.reason}")
            offset += len(line) + 1
            continue
        seq, rid = rec.get("seq"), str(rec.get("id"))
        if mark:
            out.marks += 1
        elif not isinstance(seq, int):
            out.problems.append(f"byte {offset}: no seq")
        elif offset < base_end:
            out.base_records += 1
            if seq in base_seqs or rid in base_ids:
                out.problems.append(f"byte {offset}: seq {seq} or run {rid} twice in the base")
                out.duplicate_ids.append(rid)
            base_seqs.add(seq)
            base_ids.add(rid)
        else:
            out.records += 1
            if seq != expected:
                kind = "gap" if seq > expected else "repeat"
                out.problems.append(f"byte {offset}: seq {seq} where {expected} expected ({kind})")
            expected = seq + 1
            out.last_seq = seq
            if rec.get("change") == "run_created":
                if rid in created:
                    out.duplicate_ids.append(rid)
                created.add(rid)
        offset += len(line) + 1


# -- the workers ----------------------------------------------------------------------------


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


def _worker(cfg: Config, state_dir: str, hist_dir: str, slot: int, gen: int, prefix: str,
            deadline_ns: int, attempts: Any, ops: Any, stop: Any) -> None:
    """One worker process: ``cfg.threads`` threads sharing one Store."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    if cfg.setup:
        module, _, func = cfg.setup.partition(":")
        getattr(importlib.import_module(module), func)()
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
            elif cfg.kill and owner.is_gone(run.owner_host, run.owner_pid, run.owner_start):
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


# -- running and checking -------------------------------------------------------------------


@attrs.define
class _Proc:
    slot: int
    gen: int
    process: Any
    pid: int = 0
    killed_ns: int = 0
    dead_ns: int = 0


@attrs.define
class _RunInfo:
    machine: str = ""
    create_ack: int | None = None
    creates: int = 0
    finish_inv: int = _INF
    finish_ack: int = _INF
    rev: int = 0
    status: str = ""


class Latencies:
    """Percentiles of latencies (ns) in a histogram of bounded size, however many are added:
    a value under 256 ns has a bucket of its own, a larger one shares its bucket with the
    values that agree with it in their 8 leading bits (under 0.4 % apart), at most ~7,000
    buckets in all."""

    def __init__(self) -> None:
        self.count = 0
        self._buckets: dict[int, int] = {}

    def add(self, ns: int) -> None:
        ns = max(ns, 0)
        shift = max(ns.bit_length() - 8, 0)
        key = (shift << 8) | (ns >> shift)
        self._buckets[key] = self._buckets.get(key, 0) + 1
        self.count += 1

    def percentile(self, q: float) -> float:
        """The value (us) below which a fraction ``q`` of the latencies lie (0 for none)."""
        if not self.count:
            return 0.0
        rank = min(self.count - 1, int(q * self.count))
        seen = 0
        for key in sorted(self._buckets):
            seen += self._buckets[key]
            if seen > rank:
                shift, top = key >> 8, key & 0xFF
                return ((top << shift) + ((1 << shift) >> 1)) / 1000.0  # the bucket's middle
        raise AssertionError("unreachable: the counts add up to count")


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
    procs: list[_Proc] = []
    live: dict[int, _Proc] = {}

    def spawn(slot: int, gen: int) -> None:
        p = ctx.Process(target=_worker, name=f"runstore-stress-{slot}-{gen}",
                        args=(cfg, state_dir, hist_dir, slot, gen, prefix, deadline,
                              attempts, ops, stop))
        p.start()
        rec = _Proc(slot, gen, p, pid=p.pid or 0)
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
    report = _analyse(cfg, state_dir, hist_dir, prefix, procs)
    report["seconds"] = round(elapsed, 3)
    report["kills"] = kills
    report["ops_per_second"] = round(report["operations"] / max(elapsed, 1e-9), 1)
    report["crashed_workers"] = sum(
        1 for r in procs if not r.killed_ns and r.process.exitcode != 0)
    if report["crashed_workers"]:
        report["ok"] = False
    return report


def _histories(hist_dir: str) -> Iterator[Iterator[list[Any]]]:
    """Each history file's items, read a line at a time."""
    for name in sorted(os.listdir(hist_dir)):
        yield _history_items(os.path.join(hist_dir, name))


def _history_items(path: str) -> Iterator[list[Any]]:
    with open(path, "rb") as f:
        for line in f:
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a killed worker's unfinished last line


class _Stored(NamedTuple):
    """What the checks use of a run as the reopened store has it."""

    machine: str
    revision: int
    status: Status
    owner_pid: int | None


def _reopened(cfg: Config, state_dir: str, prefix: str, check: Check) -> dict[str, _Stored]:
    """The stress runs of the store, reopened by a fresh process-local Store. Listed one
    machine at a time (each listing still reads every run), so that only one machine's
    runs are whole ``Run`` objects at once."""
    final: dict[str, _Stored] = {}
    check.checked = 1
    try:
        with Store(state_dir, durable=cfg.durable) as store:
            for m in range(cfg.machines):
                for r in store.list(machine=f"{prefix}m{m}"):
                    final[r.id] = _Stored(r.machine, r.revision, r.status, r.owner_pid)
    except (RunstoreError, OSError) as exc:
        check.fail(f"{type(exc).__name__}: {exc}")
    return final


def _analyse(cfg: Config, state_dir: str, hist_dir: str, prefix: str,
             procs: list[_Proc]) -> dict[str, Any]:
    latencies = {op: Latencies() for op in _OPS}
    outcomes: dict[str, int] = {o.value: 0 for o in PrepareOutcome}
    errors: dict[str, int] = {}
    invoked: dict[str, int] = {op: 0 for op in _OPS}
    runs: dict[str, _RunInfo] = {}
    duplicates = Check("no duplicate run ids")
    # first pass: what each run went through; the REUSE/BUSY answers wait for the second
    for items in _histories(hist_dir):
        pending: list[Any] | None = None
        for item in items:
            if item[0] == "i":
                pending = item
                invoked[item[1]] += 1
                if item[1] == "finish":
                    info = runs.setdefault(item[3], _RunInfo())
                    info.finish_inv = min(info.finish_inv, item[2])
                continue
            if pending is None:
                continue
            op, t_inv, t_done = pending[1], pending[2], item[2]
            pending = None
            if item[0] == "e":
                errors[item[3]] = errors.get(item[3], 0) + 1
                continue
            latencies[op].add(t_done - t_inv)
            run_id, machine, rev, status = item[3], item[4], item[5], item[6]
            info = runs.setdefault(run_id, _RunInfo())
            info.machine = machine
            if op == "prepare":
                outcomes[item[7]] += 1
                if item[7] == PrepareOutcome.CREATED.value:
                    info.creates += 1
                    duplicates.checked += 1
                    if info.creates > 1:
                        duplicates.fail(f"run {run_id} was CREATED {info.creates} times")
                    info.create_ack = t_done
                else:
                    continue
            if op == "finish":
                info.finish_ack = min(info.finish_ack, t_done)
            if rev > info.rev:
                info.rev, info.status = rev, status

    # the store, reopened by a fresh process-local Store
    reopen = Check("the store reopens and lists every run")
    final = _reopened(cfg, state_dir, prefix, reopen)
    _external_check(state_dir, reopen)

    journal = check_journal(os.path.join(state_dir, "runs.jsonl"))
    seqs = Check("sequence numbers unique and gap-free, checksums valid",
                 checked=journal.records + journal.base_records + journal.marks)
    for problem in journal.problems:
        seqs.fail(problem)
    if journal.torn_tail is not None:  # no process was killed: every write completed
        seqs.fail(f"incomplete last line at byte {journal.torn_tail}")
    duplicates.checked += journal.records
    for rid in journal.duplicate_ids:
        duplicates.fail(f"run {rid} has two run_created lines in the journal")

    lost = Check("every acknowledged change is in the reopened store")
    for rid, info in runs.items():
        if not info.rev:
            continue
        lost.checked += 1
        got = final.get(rid)
        if got is None:
            if not reopen.violations:
                lost.fail(f"run {rid} (acknowledged revision {info.rev}) is missing")
        elif got.revision < info.rev or (
            got.revision == info.rev and got.status.value != info.status
        ) or (Status(info.status).is_terminal and got.revision != info.rev):
            lost.fail(f"run {rid}: acknowledged revision {info.rev} ({info.status}), stored "
                      f"revision {got.revision} ({got.status.value})")
    stale = _check_stale_reads(hist_dir, runs, final, reopen)

    overlap = _check_overlaps(runs, final, procs)
    checks = [overlap, duplicates, seqs, lost, stale, reopen]
    if errors:
        errs = Check("no errors in the workers", checked=sum(invoked.values()))
        for name, count in errors.items():
            errs.violations += count
            errs.examples.append(f"{count} x {name}")
        checks.append(errs)
    operations = sum(v.count for v in latencies.values())
    return {
        "config": attrs.asdict(cfg),
        "operations": operations,
        "prepare_attempts": invoked["prepare"],
        "latency_us": {
            op: {"count": v.count, "p50": round(v.percentile(0.50), 1),
                 "p99": round(v.percentile(0.99), 1)}
            for op, v in latencies.items()
        },
        "outcomes": outcomes,
        "errors": errors,
        "runs": len(final),
        "checks": [attrs.asdict(c) for c in checks],
        "violations": sum(c.violations for c in checks),
        "ok": not any(c.violations for c in checks),
    }


def _check_stale_reads(hist_dir: str, runs: dict[str, _RunInfo], final: dict[str, _Stored],
                       reopen: Check) -> Check:
    """Second pass over the histories: each REUSE/BUSY answer of ``prepare_atomic`` (a run
    it saw active) against the run's first acknowledged finish and the reopened store."""
    stale = Check("no stale or phantom reads")
    for items in _histories(hist_dir):
        t_inv: int | None = None
        for item in items:
            if item[0] == "i":
                t_inv = item[2] if item[1] == "prepare" else None
                continue
            if t_inv is None or item[0] != "a" or item[1] != "prepare":
                t_inv = None
                continue
            started, t_inv = t_inv, None
            if item[7] == PrepareOutcome.CREATED.value:
                continue
            rid, rev = item[3], item[5]
            stale.checked += 1
            info = runs[rid]
            got = final.get(rid)
            if info.finish_ack < started:
                stale.fail(f"run {rid} was returned as active after its finish was acknowledged")
            elif got is None and not reopen.violations:
                stale.fail(f"run {rid} was returned by prepare_atomic but is not in the store")
            elif got is not None and got.revision < rev:
                stale.fail(f"run {rid} was seen at revision {rev}, the store has {got.revision}")
    return stale


def _external_check(state_dir: str, check: Check) -> None:
    """Run ``runstore.check`` too (the store's own file checker). It reads the whole file
    into memory (~8 times its size at its peak), so it runs in a child process: the memory
    it takes is given back when it ends instead of staying with this process for the rest
    of the run."""
    from .verify import check as verify

    check.checked += 1
    ctx = multiprocessing.get_context("forkserver")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            result = pool.submit(verify, state_dir).result()
    except (RunstoreError, OSError) as exc:
        check.fail(f"runstore.check: {type(exc).__name__}: {exc}")
        return
    ok = getattr(result, "ok", True)
    if not ok:
        check.fail(f"runstore.check: {result!r}")


def _check_overlaps(runs: dict[str, _RunInfo], final: dict[str, _Stored],
                    procs: list[_Proc]) -> Check:
    """Each run's provably-active interval: from its acknowledged create (or, when the worker
    died before the acknowledgement, that worker's death) to the first invocation of a finish
    (or forever when it is still active); no two may overlap on one machine."""
    check = Check("one active run per machine (no overlapping active intervals)")
    death = {r.pid: r.dead_ns for r in procs}
    by_machine: dict[str, list[tuple[int, int, str]]] = {}
    for rid in set(runs) | set(final):
        info = runs.get(rid, _RunInfo())
        got = final.get(rid)
        machine = info.machine or (got.machine if got else "")
        start = info.create_ack
        if start is None:
            if got is None or got.owner_pid is None or got.owner_pid not in death:
                continue  # never created (a prepare that saw it is checked elsewhere)
            start = death[got.owner_pid]
        end = info.finish_inv
        if end == _INF and got is not None and got.status.is_terminal:
            end = start  # finished without a recorded call: nothing provable
        if end > start:
            by_machine.setdefault(machine, []).append((start, end, rid))
    for _machine, spans in by_machine.items():
        spans.sort()
        reach, holder = 0, ""
        for start, end, rid in spans:
            check.checked += 1
            if start < reach:
                check.fail(f"run {rid} was active while {holder} still was")
            if end > reach:
                reach, holder = end, rid
    return check


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runstore stress",
        description="Run the dispatcher cycle from many processes and threads on one store, "
                    "then check the store's guarantees; exits 1 on any violation.")
    p.add_argument("--procs", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--threads", type=int, default=2, help="threads per process (default 2)")
    p.add_argument("--machines", type=int, default=4, help="machines to contend for (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--attempts", type=int, default=None,
                   help="stop after this many prepare attempts in total (default: no limit)")
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True,
                   help="fdatasync every change (default: on)")
    p.add_argument("--state-dir", default=None,
                   help="the store to use (default: a fresh temporary one, removed afterwards)")
    p.add_argument("--kill", action="store_true",
                   help="SIGKILL random workers during the run and start replacements")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def main(argv: list[str]) -> int:
    """``python -m runstore stress [options]``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    for name in ("procs", "threads", "machines"):
        if getattr(args, name) < 1:
            print(f"runstore stress: --{name} must be at least 1", file=sys.stderr)
            return 2
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
