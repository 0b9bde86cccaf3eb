"""The stress run's checks: the histories the workers wrote, the journal file and a freshly
opened store, against the store's guarantees (see ``runstore.stress``), in memory that grows
with the number of runs, not of operations."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.sharedctypes
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import attrs
import orjson

from ._stress_journal import check_journal
from ._stress_work import Config
from .errors import RunstoreError
from .model import PrepareOutcome, Status
from .store import Store

_INF = 1 << 62
_OPS = ("prepare", "start", "heartbeat", "finish")


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
class Proc:
    """A worker process of the run: its slot, generation, and when it was killed or died."""

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


def analyse(cfg: Config, state_dir: str, hist_dir: str, prefix: str,
             procs: list[Proc]) -> dict[str, Any]:
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
    """Run ``runstore.check`` too (the store's own file checker). It runs in a child
    process: the memory it takes is given back when it ends instead of staying with this
    process for the rest of the run."""
    from .verify import check as verify

    check.checked += 1
    ctx = multiprocessing.get_context("forkserver")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            result = pool.submit(verify, state_dir).result()
    except (RunstoreError, OSError) as exc:
        check.fail(f"runstore.check: {type(exc).__name__}: {exc}")
        return
    if not result.ok:
        check.fail(f"runstore.check: {result!r}")


def _check_overlaps(runs: dict[str, _RunInfo], final: dict[str, _Stored],
                    procs: list[Proc]) -> Check:
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
