"""The dispatcher cycle, P processes sharing one store of N terminal runs, against the
alternatives (``impls``), with correctness checked while it measures.

One cycle: ``prepare_atomic`` on a random machine out of M; when it CREATED a run, ``start``,
``get`` and ``finish`` it. Every call is one operation (a created cycle is 4, a REUSE/BUSY
prepare is 1). A case's ``--seconds`` are split into ``--rounds``: in each round every
implementation runs once (the order rotating from round to round, so that the machine's
drift weighs on all alike); its workers open the store, start together at a barrier, run
cycles for their share of the time and report their per-operation latencies. Operations
per second = all workers' operations / the rounds' summed wall time.

Checks (a fast but wrong implementation must not win): no worker error; ``get`` returns the
run just started; run ids are unique; per machine the intervals [prepare returned CREATED,
finish called] never overlap across workers (same system-wide monotonic clock); a REUSE/BUSY
answer names a run of that machine that may have been active during the call, with a hash
that agrees with the outcome; and afterwards a fresh process finds every created run,
terminal, N + created runs in all and none left active.

Run from the repository root::

    python -m benchmarks.bench_cycle --sizes 1k,10k,100k,1M --seconds 5 --plot

Writes ``results.json`` (and ``results.md``, ``cycle.png`` with ``--plot``) under ``--out``.
"""

from __future__ import annotations

import argparse
import array
import concurrent.futures
import contextlib
import datetime as _dt
import functools
import itertools
import json
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import queue
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from runstore import PrepareOutcome, Run, Status

from . import impls, pg_server

T = TypeVar("T")

KINDS = ("prepare", "start", "get", "finish")
#: the implementations measured unless --impls says otherwise (``postgres-lock``, the
#: contract-keeping SQL of ``bench_pg_clients``, is left to that benchmark)
DEFAULT_IMPLS = ("runstore", "sqlite", "wholefile", "postgres", "runstore-pg")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: the whole-file store rewrites everything per operation (about 2 s per operation at 100k
#: runs, minutes per case beyond): skipped above this size unless --wholefile-max says more
WHOLEFILE_MAX = 100_000
_OPEN_TIMEOUT = 1800.0  # seconds a worker may take to open a big store before the barrier
_CTX = multiprocessing.get_context("fork")


def _pick_clock() -> Callable[[], int]:
    # Intervals from different processes are compared, so the clock must be system-wide:
    # CLOCK_MONOTONIC. perf_counter is that clock on Linux; otherwise fall back to monotonic.
    same = (time.get_clock_info("perf_counter").implementation
            == time.get_clock_info("monotonic").implementation)
    return time.perf_counter_ns if same else time.monotonic_ns


clock = _pick_clock()


def parse_size(text: str) -> int:
    """``1k`` -> 1000, ``1M`` -> 1000000, ``250`` -> 250."""
    text = text.strip()
    scale = {"k": 1_000, "K": 1_000, "m": 1_000_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def size_label(n: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def machine_names(count: int) -> list[str]:
    return [f"machine-{i:03d}" for i in range(count)]


# -- one worker process ---------------------------------------------------------------------


def worker(impl_name: str, where: str, durable: bool, machines: int, seconds: float,
           seed: int, barrier: multiprocessing.synchronize.Barrier,
           results: multiprocessing.Queue[dict[str, Any]]) -> None:
    """Open the store, wait at the barrier, run cycles until the deadline, report."""
    out: dict[str, Any] = {"pid": os.getpid(), "errors": []}
    try:
        t_open = time.perf_counter()
        store = impls.open_impl(impl_name, where, durable)
        out["open_s"] = time.perf_counter() - t_open
        try:
            barrier.wait(_OPEN_TIMEOUT)
            out.update(_cycles(store, machines, seconds, seed))
        finally:
            store.close()
    except Exception as exc:  # reported to the parent, which fails the case
        out["errors"].append(f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(Exception):
            barrier.abort()  # do not leave the other workers waiting
    results.put(out)


def _cycles(store: impls.Impl, machines: int, seconds: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    names = machine_names(machines)
    hashes = ("hash-a", "hash-b")
    lat = {kind: array.array("q") for kind in KINDS}
    l_prep, l_start, l_get, l_fin = (lat[k].append for k in KINDS)
    # created: (run id, machine, hash, prepare called, prepare returned, finish called,
    # finish returned); others: (run id, machine, hash, outcome, prepare called, returned);
    # incomplete: created runs whose cycle an error cut short (run id, machine, hash,
    # prepare called, prepare returned)
    created: list[tuple[str, int, int, int, int, int, int]] = []
    others: list[tuple[str, int, int, str, int, int]] = []
    incomplete: list[tuple[str, int, int, int, int]] = []
    errors: list[str] = []
    outcomes: Counter[str] = Counter()
    ops = 0
    t_start = clock()
    deadline = t_start + int(seconds * 1e9)
    while clock() < deadline and len(errors) < 5:
        m = rng.randrange(machines)
        h = rng.randrange(2)
        machine, test_dir_hash = names[m], hashes[h]
        make = functools.partial(Run, machine, f"/srv/ci/{machine}/{test_dir_hash}",
                                 test_dir_hash)
        made: tuple[str, int, int, int, int] | None = None
        try:
            t0 = clock()
            run_id, outcome = store.prepare_atomic(machine, test_dir_hash, make)
            t1 = clock()
            l_prep(t1 - t0)
            ops += 1
            outcomes[outcome.value] += 1
            if outcome is not PrepareOutcome.CREATED:
                others.append((run_id, m, h, outcome.value, t0, t1))
                continue
            made = (run_id, m, h, t0, t1)
            store.start(run_id)
            t2 = clock()
            got = store.get(run_id)
            t3 = clock()
            store.finish(run_id)
            t4 = clock()
            l_start(t2 - t1)
            l_get(t3 - t2)
            l_fin(t4 - t3)
            ops += 3
            created.append((run_id, m, h, t0, t1, t3, t4))
            made = None
            if (got.id, got.machine, got.status) != (run_id, machine, Status.RUNNING):
                errors.append(f"get({run_id}) after start returned {got.id} on {got.machine} "
                              f"in status {got.status.value}")
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if made is not None:
                incomplete.append(made)
    t_end = clock()
    return {"t_start": t_start, "t_end": t_end, "ops": ops, "outcomes": dict(outcomes),
            "lat": {k: v.tobytes() for k, v in lat.items()}, "created": created,
            "others": others, "incomplete": incomplete, "errors": errors}


# -- checks -------------------------------------------------------------------------------


def check_concurrency(reports: Sequence[dict[str, Any]]) -> list[str]:
    """Problems visible from the workers' own records (see the module docstring)."""
    problems: list[str] = []
    created = [c for r in reports for c in r.get("created", [])]
    ids = Counter(c[0] for c in created)
    problems += [f"run id {i} created {k} times" for i, k in ids.items() if k > 1]
    by_machine: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    by_id = {}
    for run_id, m, h, p_call, p_ret, f_call, f_ret in created:
        by_machine[m].append((p_ret, f_call, run_id))
        by_id[run_id] = (m, h, p_call, f_ret)
    for r in reports:  # cut short by an error: the run may have stayed active for good
        for run_id, m, h, p_call, _p_ret in r.get("incomplete", []):
            by_id[run_id] = (m, h, p_call, sys.maxsize)
    for m, spans in sorted(by_machine.items()):
        spans.sort()
        for (_a_from, a_to, a_id), (b_from, _b_to, b_id) in itertools.pairwise(spans):
            if b_from <= a_to:
                problems.append(f"machine {m}: run {b_id} was created at {b_from} while run "
                                f"{a_id} was active (until at least {a_to})")
    for r in reports:
        for run_id, m, h, outcome, t0, t1 in r.get("others", []):
            known = by_id.get(run_id)
            if known is None:
                problems.append(f"{outcome} on machine {m} named run {run_id}, "
                                "which no worker created")
                continue
            om, oh, p_call, f_ret = known
            if om != m:
                problems.append(f"{outcome} on machine {m} named run {run_id} of machine {om}")
            elif not (p_call < t1 and f_ret > t0):
                problems.append(f"{outcome} on machine {m} named run {run_id}, which cannot "
                                "have been active during the call")
            elif (outcome == PrepareOutcome.REUSE.value) != (oh == h):
                problems.append(f"{outcome} on machine {m} for hash {h}: the occupant "
                                f"{run_id} has hash {oh}")
    return problems


def verify_store(impl_name: str, where: str, n: int, created: list[str],
                 incomplete: Sequence[str] = ()) -> list[str]:
    """Problems found by a fresh opening of the store after the measurement: every
    ``created`` run completed, every ``incomplete`` one (its cycle cut short by an error)
    present, nothing else added, nothing else left active."""
    try:
        return _verify_store(impl_name, where, n, created, incomplete)
    except Exception as exc:  # a store that cannot be reopened or read fails the case
        return [f"reopening the store after the run failed: {type(exc).__name__}: {exc}"]


def _verify_store(impl_name: str, where: str, n: int, created: list[str],
                  incomplete: Sequence[str]) -> list[str]:
    store = impls.open_impl(impl_name, where, True)
    try:
        wanted, cut_short = set(created), set(incomplete)
        total = active = found = found_cut = 0
        bad: list[str] = []
        for run in store.runs():
            total += 1
            if not run.is_terminal and run.id not in cut_short:
                active += 1
            if run.id in wanted:
                found += 1
                if run.status is not Status.COMPLETED or run.exit_code != 0:
                    bad.append(f"run {run.id} is {run.status.value}, not completed")
            found_cut += run.id in cut_short
        problems = bad[:10]
        if found != len(wanted):
            problems.append(f"{len(wanted) - found} of {len(wanted)} created runs are missing")
        if found_cut != len(cut_short):
            problems.append(f"{len(cut_short) - found_cut} of {len(cut_short)} runs created "
                            "before an error are missing")
        if active:
            problems.append(f"{active} runs are still active")
        expected = n + len(wanted) + len(cut_short)
        if total != expected:
            problems.append(f"{total} runs stored; expected {n} preloaded + {len(wanted)} "
                            f"created + {len(cut_short)} created before an error")
        return problems
    finally:
        store.close()


# -- one case -----------------------------------------------------------------------------


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """The q-quantile (nearest rank) in microseconds; NaN when empty."""
    if not sorted_ns:
        return float("nan")
    rank = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[rank] / 1000.0


def in_child(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a forked child (keeps big stores out of this process's memory)."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=_CTX) as pool:
        return pool.submit(fn, *args).result()


def run_round(impl_name: str, where: str, durable: bool, seconds: float,
              args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """One round of one implementation: ``args.procs`` workers open the store, start
    together and run cycles for ``seconds``; their reports."""
    barrier = _CTX.Barrier(args.procs)
    results: multiprocessing.Queue[dict[str, Any]] = _CTX.Queue()
    procs = [
        _CTX.Process(target=worker, name=f"bench-{impl_name}-{i}",
                     args=(impl_name, where, durable, args.machines, seconds,
                           seed * 1000 + i, barrier, results))
        for i in range(args.procs)
    ]
    for p in procs:
        p.start()
    reports: list[dict[str, Any]] = []
    try:
        while len(reports) < len(procs):
            try:
                reports.append(results.get(timeout=1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode is not None]
                if len(dead) > len(reports) and results.empty():
                    time.sleep(1.0)  # a report may still be in the pipe
                    if results.empty():
                        raise RuntimeError(f"a worker of {impl_name} died without a report "
                                           f"(exit codes {[p.exitcode for p in procs]})"
                                           ) from None
    finally:
        impls.join_or_kill(procs)
    return reports


def run_rounds(names: Sequence[str], wheres: dict[str, str], n: int, durable: bool,
               args: argparse.Namespace) -> dict[str, list[list[dict[str, Any]]]]:
    """``args.rounds`` rounds of ``args.seconds / args.rounds`` each: in every round each
    implementation runs once, the order rotating from round to round, so that a drift in
    the machine's speed (a third within minutes here) weighs on all of them alike. The
    reports of each implementation, round by round."""
    rounds: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in names}
    seconds = args.seconds / args.rounds
    for r in range(args.rounds):
        turn = r % len(names)
        for name in [*names[turn:], *names[:turn]]:
            seed = n + 100 * r + names.index(name)
            rounds[name].append(run_round(name, wheres[name], durable, seconds, args, seed))
    return rounds


def summarize(impl_name: str, n: int, durable: bool,
              rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One case from its rounds' reports: operations per second over the rounds' summed
    wall time (first start to last end in each round), latencies over every operation."""
    reports = [r for round_reports in rounds for r in round_reports]
    errors = [e for r in reports for e in r["errors"]]
    measured = [r for r in reports if "t_start" in r]
    case: dict[str, Any] = {"impl": impl_name, "n": n, "durable": durable,
                            "rounds": len(rounds), "errors": errors[:20]}
    if len(measured) != len(reports):
        case.update(ops=0, ops_per_s=0.0, wall_s=0.0, latency_us={}, outcomes={},
                    problems=errors or ["a worker did not measure"], created_ids=[],
                    incomplete_ids=[])
        return case
    wall_ns = sum(max(r["t_end"] for r in each) - min(r["t_start"] for r in each)
                  for each in rounds)
    ops = sum(r["ops"] for r in measured)
    latency: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        values = array.array("q")
        for r in measured:
            values.frombytes(r["lat"][kind])
        ordered = sorted(values)
        latency[kind] = {"count": len(ordered), "p50": percentile(ordered, 0.50),
                         "p99": percentile(ordered, 0.99)}
    outcomes: Counter[str] = Counter()
    for r in measured:
        outcomes.update(r["outcomes"])
    case.update(
        ops=ops, wall_s=wall_ns / 1e9, ops_per_s=ops / (wall_ns / 1e9) if wall_ns else 0.0,
        latency_us=latency, outcomes=dict(outcomes),
        open_s=max(r["open_s"] for r in reports),
        problems=errors[:20] + check_concurrency(measured),
        created_ids=[c[0] for r in measured for c in r["created"]],
        incomplete_ids=[c[0] for r in measured for c in r["incomplete"]],
    )
    return case


# -- the whole run ------------------------------------------------------------------------


def _timed(fn: Callable[..., None], *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _preload(impl_name: str, where: str, n: int) -> float:
    cls = impls.IMPLS[impl_name]
    seconds = _timed(cls.preload, where, n)
    if cls.file_based:
        os.sync()
    return seconds


@contextlib.contextmanager
def _sites(names: Sequence[str], args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """The base location per implementation: a work directory, or a PostgreSQL server."""
    with contextlib.ExitStack() as stack:
        if args.workdir:  # a directory that is not there yet is made, not an error
            os.makedirs(args.workdir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="runstore-bench-", dir=args.workdir)
        stack.callback(shutil.rmtree, work, True)
        sites = {name: work for name in names if impls.IMPLS[name].file_based}
        servers = [name for name in names if not impls.IMPLS[name].file_based]
        if servers:  # one server for postgres and runstore-pg: one database per case
            dsn = stack.enter_context(pg_server.throwaway_postgres())
            sites.update((name, dsn) for name in servers)
        yield sites


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    names: list[str] = []
    skipped: list[dict[str, Any]] = []
    for name in args.impls:
        reason = impls.IMPLS[name].unavailable()
        if reason:
            skipped.append({"impl": name, "n": None, "reason": reason})
            print(f"skipping {name}: {reason}", flush=True)
        else:
            names.append(name)
    cases: list[dict[str, Any]] = []
    preload_s: dict[str, dict[str, float]] = defaultdict(dict)
    t_all = time.perf_counter()
    with _sites(names, args) as sites:
        for n in args.sizes:
            here = [x for x in names if not (x == "wholefile" and n > args.wholefile_max)]
            for x in sorted(set(names) - set(here)):
                reason = (f"the whole-file store rewrites all {n:,} runs per operation (about "
                          f"{n / 50_000:.0f} s each): skipped above {args.wholefile_max:,}")
                skipped.append({"impl": x, "n": n, "reason": reason})
                print(f"skipping {x} at N={n:,}: {reason}", flush=True)
            templates = {}
            for name in here:
                cls = impls.IMPLS[name]
                templates[name] = cls.locate(sites[name], f"{name}-{size_label(n)}-template")
                seconds = in_child(_preload, name, templates[name], n)
                preload_s[name][str(n)] = seconds
                print(f"preloaded {name} with {n:,} runs in {seconds:.1f} s", flush=True)
            for durable in args.modes:
                mode = "durable" if durable else "nodurable"
                wheres: dict[str, str] = {}
                try:
                    for name in here:
                        cls = impls.IMPLS[name]
                        wheres[name] = cls.locate(sites[name], f"{name}-{size_label(n)}-{mode}")
                        cls.clone(templates[name], wheres[name])
                    rounds = run_rounds(here, wheres, n, durable, args)
                    for name in here:
                        case = summarize(name, n, durable, rounds[name])
                        if case["ops"]:
                            case["problems"] += in_child(verify_store, name, wheres[name], n,
                                                         case["created_ids"],
                                                         case["incomplete_ids"])
                        case["preload_s"] = preload_s[name][str(n)]
                        case["problem_count"] = len(case["problems"])
                        case["problems"] = case["problems"][:50]  # keep results.json readable
                        del case["created_ids"], case["incomplete_ids"]
                        cases.append(case)
                        _print_progress(case)
                finally:
                    for name, where in wheres.items():
                        impls.IMPLS[name].discard(where)
            for name, where in templates.items():
                impls.IMPLS[name].discard(where)
    return {
        "meta": _meta(args, time.perf_counter() - t_all),
        "cases": cases,
        "skipped": skipped,
        "ratios": ratios(cases),
        "targets": targets(cases),
    }


def _meta(args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    return {
        "command": "python -m benchmarks.bench_cycle " + " ".join(args.argv),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "procs": args.procs,
        "machines": args.machines,
        "seconds_per_case": args.seconds,
        "rounds": args.rounds,
        "sizes": args.sizes,
        "total_s": round(seconds, 1),
    }


def _print_progress(case: dict[str, Any]) -> None:
    mode = "durable" if case["durable"] else "not durable"
    status = "ok" if not case["problems"] else f"FAILED: {case['problems'][:3]}"
    print(f"  N={case['n']:>9,} {mode:<11} {case['impl']:<11} {case['ops_per_s']:>10,.0f} ops/s"
          f"  (open {case.get('open_s', 0):.2f} s)  checks {status}", flush=True)


# -- derived figures ----------------------------------------------------------------------


def _index(cases: Sequence[dict[str, Any]]) -> dict[tuple[str, int, bool], dict[str, Any]]:
    return {(c["impl"], c["n"], c["durable"]): c for c in cases}


def ratios(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """runstore's operations/s divided by each other implementation's, per (N, durability)."""
    idx = _index(cases)
    out = []
    for (impl, n, durable), case in sorted(idx.items(), key=lambda kv: (kv[0][1], not kv[0][2])):
        mine = idx.get(("runstore", n, durable))
        if impl == "runstore" or mine is None or not case["ops_per_s"]:
            continue
        out.append({"n": n, "durable": durable, "versus": impl,
                    "ratio": mine["ops_per_s"] / case["ops_per_s"]})
    return out


def targets(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets as pass/fail lines (never asserted by tests)."""
    idx = _index(cases)
    sizes = sorted({c["n"] for c in cases})
    out: list[dict[str, Any]] = []

    def ratio_target(durable: bool, versus: str, need: float, label: str) -> None:
        for n in sizes:
            mine, other = idx.get(("runstore", n, durable)), idx.get((versus, n, durable))
            name = f"{label} at N={size_label(n)}"
            if mine is None or other is None or not other["ops_per_s"]:
                out.append({"target": name, "status": "not measured"})
                continue
            value = mine["ops_per_s"] / other["ops_per_s"]
            status = "PASS" if value >= need else "FAIL"
            if mine["problems"] or other["problems"]:  # a wrong implementation cannot win
                status = "FAIL (correctness checks failed)"
            out.append({"target": name, "need": f">= {need:.1f}x", "value": round(value, 3),
                        "status": status})

    ratio_target(True, "sqlite", 1.0, "durable runstore / SQLite (synchronous=FULL)")
    ratio_target(True, "postgres", 1.5, "durable runstore / PostgreSQL (synchronous_commit=on)")
    ratio_target(False, "sqlite", 1.0, "not durable runstore / SQLite (synchronous=OFF)")
    for durable in (True, False):
        small, big = idx.get(("runstore", 1_000, durable)), idx.get(("runstore", 1_000_000,
                                                                       durable))
        mode = "durable" if durable else "not durable"
        name = f"runstore p50 prepare_atomic N=1M / N=1k ({mode})"
        if small is None or big is None or not small["latency_us"]:
            out.append({"target": name, "status": "not measured"})
            continue
        value = big["latency_us"]["prepare"]["p50"] / small["latency_us"]["prepare"]["p50"]
        status = "PASS" if value <= 1.5 else "FAIL"
        if small["problems"] or big["problems"]:
            status = "FAIL (correctness checks failed)"
        out.append({"target": name, "need": "<= 1.5", "value": round(value, 3),
                    "status": status})
    bad = [c for c in cases if c["problems"]]
    out.append({"target": "correctness checks of every case", "need": "no problem",
                "value": f"{len(bad)} of {len(cases)} cases with problems",
                "status": "PASS" if not bad else "FAIL"})
    return out


# -- output -------------------------------------------------------------------------------


def _fmt_us(value: float) -> str:
    if value != value:  # NaN: that operation never ran
        return "-"
    return f"{value / 1000:.1f}ms" if value >= 10_000 else f"{value:.0f}"


def render_tables(results: dict[str, Any]) -> str:
    """Markdown tables, one per (N, durability), plus the targets."""
    meta = results["meta"]
    lines = [f"Dispatcher cycle: {meta['procs']} processes, {meta['machines']} machines, "
             f"{meta['seconds_per_case']} s per case in {meta.get('rounds', 1)} rounds "
             "(every implementation once per round, in rotating order); latencies in "
             "microseconds (p50 / p99).",
             f"Command: `{meta['command']}`", ""]
    idx = _index(results["cases"])
    groups = sorted({(c["n"], c["durable"]) for c in results["cases"]},
                    key=lambda g: (g[0], not g[1]))
    for n, durable in groups:
        mode = "durable" if durable else "not durable"
        lines += [f"### N = {n:,}, {mode}", "",
                  "| implementation | ops/s | prepare | start | get | finish "
                  "| runstore x | created / reuse / busy | checks |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        mine = idx.get(("runstore", n, durable))
        rows = sorted((c for c in results["cases"] if c["n"] == n and c["durable"] == durable),
                      key=lambda c: -c["ops_per_s"])
        for c in rows:
            lat = c["latency_us"]
            cells = [" / ".join((_fmt_us(lat[k]["p50"]), _fmt_us(lat[k]["p99"])))
                     if k in lat else "-" for k in KINDS]
            ratio = ("-" if c["impl"] == "runstore" or mine is None or not c["ops_per_s"]
                     else f"{mine['ops_per_s'] / c['ops_per_s']:.2f}x")
            oc = c["outcomes"]
            counts = f"{oc.get('created', 0)} / {oc.get('reuse', 0)} / {oc.get('busy', 0)}"
            checks = "ok" if not c["problems"] else f"**{c['problem_count']} problems**"
            lines.append(f"| {c['impl']} | {c['ops_per_s']:,.0f} | {' | '.join(cells)} | "
                         f"{ratio} | {counts} | {checks} |")
        lines.append("")
    if results["skipped"]:
        lines += ["Skipped:", ""]
        lines += [f"- {s['impl']}" + (f" at N={s['n']:,}" if s["n"] else "") + f": {s['reason']}"
                  for s in results["skipped"]]
        lines.append("")
    lines += ["Targets:", ""]
    for t in results["targets"]:
        detail = f" (measured {t['value']}, need {t['need']})" if "value" in t else ""
        lines.append(f"- {t['status']}: {t['target']}{detail}")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """operations/s against N, log-log, one line per implementation and durability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = {"runstore": "tab:blue", "sqlite": "tab:orange", "postgres": "tab:green",
              "wholefile": "tab:red", "runstore-pg": "tab:purple"}
    series: dict[tuple[str, bool], list[tuple[int, float]]] = defaultdict(list)
    failed: list[tuple[int, float]] = []
    for c in results["cases"]:
        if c["ops_per_s"]:
            series[(c["impl"], c["durable"])].append((c["n"], c["ops_per_s"]))
            if c["problems"]:
                failed.append((c["n"], c["ops_per_s"]))
    for (impl, durable), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points],
                color=colors.get(impl), linestyle="-" if durable else "--",
                marker="o" if durable else "s",
                label=f"{impl} ({'durable' if durable else 'not durable'})")
    if failed:
        ax.scatter([p[0] for p in failed], [p[1] for p in failed], marker="x", s=120,
                   color="black", zorder=5, label="correctness checks failed")
    meta = results["meta"]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("runs in the store (N)")
    ax.set_ylabel("operations / s (all processes)")
    ax.set_title(f"Dispatcher cycle, {meta['procs']} processes, {meta['machines']} machines "
                 f"({meta['cpus']} CPUs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cycle",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="1k,10k,100k,1M",
                        help="preloaded run counts, comma separated (default: %(default)s)")
    parser.add_argument("--procs", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--machines", type=int, default=50, help="machines (default: 50)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="measured seconds per case (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds each case's seconds are split into; every implementation "
                             "runs once per round, in rotating order, so that the machine's "
                             "drift weighs on all alike (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--durable", dest="mode", action="store_const", const="durable")
    mode.add_argument("--no-durable", dest="mode", action="store_const", const="nodurable")
    mode.add_argument("--both", dest="mode", action="store_const", const="both",
                      help="durable and not durable (the default)")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                        help="implementations, comma separated (default: %(default)s; "
                             "postgres and runstore-pg are skipped when the server is not "
                             "installed)")
    parser.add_argument("--wholefile-max", type=parse_size, default=WHOLEFILE_MAX,
                        help="largest N for the whole-file store (default: 100k)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results directory (default: benchmarks/results)")
    parser.add_argument("--workdir", default=None,
                        help="where the stores are built (default: the system temp dir)")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=False,
                        help="write cycle.png")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = sorted(set(args.impls) - set(impls.IMPLS))
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {sorted(impls.IMPLS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.modes = {"durable": [True], "nodurable": [False]}.get(args.mode or "both",
                                                               [True, False])
    return args


def _sigterm_exits(_signum: int, _frame: object) -> None:
    raise SystemExit(143)  # unwind, so the PostgreSQL server and temp stores are cleaned up


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when a correctness check failed (not on speed)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_exits)
    results = run_all(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = render_tables(results)
    (args.out / "results.md").write_text(text)
    if args.plot:
        plot(results, args.out / "cycle.png")
    print()
    print(text)
    print(f"wrote {args.out / 'results.json'}" + (", cycle.png" if args.plot else ""))
    return 0 if all(not c["problems"] for c in results["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
