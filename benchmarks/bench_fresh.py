"""A fresh process: open a store of N runs, do one ``prepare_atomic``, exit (what a CLI call or
a short-lived dispatcher pays every time), runstore against stdlib SQLite; and the resident
memory of a process holding the store open.

Each measurement is a new ``python -c`` process (same interpreter and flags for both), timed
whole from the parent: interpreter start, imports, open, one durable prepare (a new pending
run on a machine of its own), close. The child also reports its own breakdown and its peak
resident memory (``VmHWM`` of ``/proc/self/status``; ``ru_maxrss``). The SQLite child is plain
stdlib code using the same SQL as ``impls.SqliteImpl``; the stores are preloaded by ``impls``.
Then the runstore store is given a long tail, ``min(N, --tail-max)`` dispatcher cycles (three
lines each) since its last compaction, as a busy store has before its next automatic one,
and the fresh runstore process is measured again on it (SQLite has no such state: its row is
the same). Last, one more runstore process keeps the store open through a thousand cycles, a
full index and a compaction, and reports its resident memory at each step
(``LIFETIME_CHILD``).

Run from the repository root::

    python -m benchmarks.bench_fresh --sizes 1k,10k,100k,1M --repeat 5

Writes ``fresh.json`` and ``fresh.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import compileall
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import runstore

from . import impls
from .bench_cycle import DEFAULT_OUT, in_child, parse_size, size_label

_MEMORY_PROBE = '''
def _memory():
    import resource
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                status[key] = int(value.split()[0])
    return {"vmhwm_kb": status.get("VmHWM", 0), "vmrss_kb": status.get("VmRSS", 0),
            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
'''

RUNSTORE_CHILD = _MEMORY_PROBE + '''
import json, sys, time
t0 = time.perf_counter()
import runstore
t1 = time.perf_counter()
where, machine = sys.argv[1], sys.argv[2]
store = runstore.Store(where, durable=True)
t2 = time.perf_counter()
after_open = _memory()
run, outcome = store.prepare_atomic(
    machine, "fresh-hash", lambda: runstore.Run(machine, "/srv/ci/fresh", "fresh-hash"))
t3 = time.perf_counter()
store.close()
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "open_s": t2 - t1, "prepare_s": t3 - t2,
                  "close_s": t4 - t3, "outcome": outcome.value, "run_id": run.id,
                  "after_open": after_open, **_memory()}))
'''

# A process that keeps the store open through the heaviest things it may do: take in a
# thousand dispatcher cycles, index every run (a get of the oldest one), then compact (what
# an automatic compaction does, under the lock here).
_CYCLES = '''
import runstore
def cycles(store, count, prefix):
    for i in range(count):
        machine = f"{prefix}-{i % 50}"
        run, _ = store.prepare_atomic(machine, "h",
                                      lambda m=machine: runstore.Run(m, "/srv/ci", "h"))
        store.start(run.id)
        store.finish(run.id, runstore.Status.COMPLETED, exit_code=0)
'''

# ``count`` dispatcher cycles on the store, not durable: the lines a busy store has written
# since its last compaction (``add_tail``)
TAIL_CHILD = _CYCLES + '''
import sys
with runstore.Store(sys.argv[1], durable=False) as store:
    cycles(store, int(sys.argv[2]), "tail")
'''

LIFETIME_CHILD = _MEMORY_PROBE + _CYCLES + '''
import json, sys, time
where = sys.argv[1]
store = runstore.Store(where, durable=False)
after_open = _memory()
cycles(store, 1000, "lifetime")
t0 = time.perf_counter()
with open(f"{where}/runs.jsonl", "rb") as f:  # the first run of the compacted base
    f.readline()
    oldest = json.loads(f.readline())["id"]
store.get(oldest)
t1 = time.perf_counter()
after_index = _memory()
store.compact()
t2 = time.perf_counter()
store.close()
print(json.dumps({"index_s": t1 - t0, "compact_s": t2 - t1, "after_open": after_open,
                  "after_index": after_index, **_memory()}))
'''

SQLITE_CHILD = _MEMORY_PROBE + f'''
import json, os, secrets, socket, sys, time
t0 = time.perf_counter()
import sqlite3
t1 = time.perf_counter()
where, machine = sys.argv[1], sys.argv[2]
db = sqlite3.connect(os.path.join(where, {impls.SQLITE_FILE!r}), isolation_level=None,
                     timeout=30.0)
db.execute("PRAGMA journal_mode = WAL")
db.execute("PRAGMA synchronous = FULL")
t2 = time.perf_counter()
after_open = _memory()
db.execute("BEGIN IMMEDIATE")
row = db.execute({impls.SQLITE_SELECT_ACTIVE!r}, (machine,)).fetchone()
if row is None:
    run_id = f"{{time.time_ns():x}}-{{secrets.token_hex(6)}}"
    fields = dict(machine=machine, test_dir="/srv/ci/fresh", test_dir_hash="fresh-hash",
                  id=run_id, status="pending", exit_code=None, started_at=None, ended_at=None,
                  artifacts_path="", logs_path="", error_code="", error_msg="", batch_id="",
                  plan_entry="", revision=1, owner_host=socket.gethostname(),
                  owner_pid=os.getpid(), owner_start="", heartbeat_at=None)
    db.execute({impls.SQLITE_INSERT!r}, tuple(fields[k] for k in {impls.RUN_FIELDS!r}))
    outcome = "created"
else:
    run_id, outcome = row[0], ("reuse" if row[1] == "fresh-hash" else "busy")
db.execute("COMMIT")
t3 = time.perf_counter()
db.close()
t4 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "open_s": t2 - t1, "prepare_s": t3 - t2,
                  "close_s": t4 - t3, "outcome": outcome, "run_id": run_id,
                  "after_open": after_open, **_memory()}}))
'''

CHILDREN = {"runstore": RUNSTORE_CHILD, "sqlite": SQLITE_CHILD}


def fresh_process(impl_name: str, where: str, machine: str) -> dict[str, Any]:
    """One fresh process doing one prepare; its whole wall time and its own report."""
    argv = [sys.executable, "-c", CHILDREN[impl_name], where, machine]
    t = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"the {impl_name} child failed ({done.returncode}):\n{done.stderr}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    report["process_s"] = wall
    return report


def add_tail(where: str, cycles: int) -> None:
    """``cycles`` dispatcher cycles on the store in a child process (``TAIL_CHILD``)."""
    subprocess.run([sys.executable, "-c", TAIL_CHILD, where, str(cycles)], check=True)


def lifetime(where: str) -> dict[str, Any]:
    """The resident memory of one process holding the runstore store open through cycles,
    a full index and a compaction (``LIFETIME_CHILD``)."""
    argv = [sys.executable, "-c", LIFETIME_CHILD, where]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the lifetime child failed ({done.returncode}):\n{done.stderr}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return {"index_s": report["index_s"], "compact_s": report["compact_s"],
            "open_vmrss_mb": report["after_open"]["vmrss_kb"] / 1024,
            "index_vmrss_mb": report["after_index"]["vmrss_kb"] / 1024,
            "vmhwm_mb": report["vmhwm_kb"] / 1024}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    # An installed runstore has bytecode (pip compiles it at install). A source checkout run
    # under PYTHONDONTWRITEBYTECODE=1 (as in some CI setups) would recompile every module in
    # every child, ~40 ms that no user pays: compile it once, as an install would.
    compileall.compile_dir(os.path.dirname(runstore.__file__ or "."), quiet=1)
    if args.workdir:  # a directory that is not there yet is made, not an error
        os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="runstore-fresh-", dir=args.workdir)
    rows: list[dict[str, Any]] = []
    lifetimes: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        for n in args.sizes:
            stores = {}
            for name in CHILDREN:
                where = os.path.join(work, f"{name}-{size_label(n)}")
                t = time.perf_counter()
                in_child(impls.IMPLS[name].preload, where, n)
                os.sync()
                print(f"preloaded {name} with {n:,} runs in {time.perf_counter() - t:.1f} s",
                      flush=True)
                stores[name] = where
            reports: dict[str, list[dict[str, Any]]] = {name: [] for name in CHILDREN}
            for k in range(args.repeat):  # alternate, so drift hits both alike
                for name, where in stores.items():
                    report = fresh_process(name, where, f"fresh-machine-{k}")
                    if report["outcome"] != "created":
                        problems.append(f"{name} N={n}: fresh prepare #{k} said "
                                        f"{report['outcome']}, expected created")
                    reports[name].append(report)
            for name, runs in reports.items():
                rows.append(_reported(summarize(name, n, runs)))
            cycles = min(n, args.tail_max)
            if cycles:
                t = time.perf_counter()
                add_tail(stores["runstore"], cycles)
                print(f"added a tail of {cycles:,} cycles in {time.perf_counter() - t:.1f} s",
                      flush=True)
                runs = []
                for k in range(args.repeat):
                    report = fresh_process("runstore", stores["runstore"],
                                           f"fresh-tail-machine-{k}")
                    if report["outcome"] != "created":
                        problems.append(f"runstore N={n} with its tail: fresh prepare #{k} "
                                        f"said {report['outcome']}, expected created")
                    runs.append(report)
                rows.append(_reported({**summarize("runstore", n, runs),
                                       "tail_lines": 3 * cycles}))
            life = {"n": n, **lifetime(stores["runstore"])}  # last: it compacts the store
            lifetimes.append(life)
            print(f"  N={n:>9,} runstore  kept open: {life['open_vmrss_mb']:.0f} MB after "
                  f"open, {life['index_vmrss_mb']:.0f} MB indexed, peak {life['vmhwm_mb']:.0f}"
                  f" MB through a compaction ({life['compact_s']:.1f} s)", flush=True)
            for where in stores.values():
                shutil.rmtree(where, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"meta": _meta(args), "rows": rows, "lifetime": lifetimes, "problems": problems,
            "targets": targets(rows, lifetimes)}


def _reported(row: dict[str, Any]) -> dict[str, Any]:
    tail = f" +{row['tail_lines']:,} lines" if row.get("tail_lines") else ""
    print(f"  N={row['n']:>9,}{tail} {row['impl']:<9} process {row['process_s']:.3f} s (open "
          f"{row['open_s']:.3f} s), peak RSS {row['vmhwm_mb']:.0f} MB", flush=True)
    return row


def summarize(name: str, n: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the repeated fresh processes (memory: the largest peak)."""

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    return {
        "impl": name, "n": n, "tail_lines": 0, "repeat": len(runs),
        "process_s": med("process_s"), "process_min_s": min(r["process_s"] for r in runs),
        "import_s": med("import_s"), "open_s": med("open_s"), "prepare_s": med("prepare_s"),
        "close_s": med("close_s"),
        "vmhwm_mb": max(r["vmhwm_kb"] for r in runs) / 1024,
        "open_vmrss_mb": max(r["after_open"]["vmrss_kb"] for r in runs) / 1024,
        "maxrss_mb": max(r["maxrss_kb"] for r in runs) / 1024,
    }


def targets(rows: Sequence[dict[str, Any]],
            lifetimes: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The targets: each fresh-process target on the compacted store and, when it was
    measured, on the same store with its long tail."""
    idx = {(r["impl"], r["n"], bool(r.get("tail_lines"))): r for r in rows}
    out: list[dict[str, Any]] = []

    def target(name: str, need: str, value: float | None, ok: bool) -> None:
        out.append({"target": name, "status": "not measured"} if value is None else
                   {"target": name, "need": need, "value": round(value, 2),
                    "status": "PASS" if ok else "FAIL"})

    sqlite = idx.get(("sqlite", 100_000, False))
    for tail in (False, True):
        also = " with its tail" if tail else ""
        mine = idx.get(("runstore", 100_000, tail))
        if tail and mine is None:
            continue
        ratio = mine["process_s"] / sqlite["process_s"] if mine and sqlite else None
        target(f"fresh process, one prepare_atomic at N=100k{also}: runstore / SQLite",
               "<= 3.0x", ratio, ratio is not None and ratio <= 3.0)
    for tail in (False, True):
        also = " with its tail" if tail else ""
        mine = idx.get(("runstore", 1_000_000, tail))
        if tail and mine is None:
            continue
        seconds = mine["process_s"] if mine else None
        target(f"fresh process, one prepare_atomic at N=1M{also}: runstore seconds",
               "<= 3.0 s", seconds, seconds is not None and seconds <= 3.0)
    big = idx.get(("runstore", 1_000_000, False))
    peak = big["vmhwm_mb"] if big else None
    target("peak resident memory of a process holding a 1M-run runstore open", "< 1024 MB",
           peak, peak is not None and peak < 1024)
    life = {r["n"]: r for r in lifetimes}.get(1_000_000)
    peak = life["vmhwm_mb"] if life else None
    target("peak resident memory of a process keeping a 1M-run runstore open through a full "
           "index and a compaction", "< 1024 MB", peak, peak is not None and peak < 1024)
    return out


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": "python -m benchmarks.bench_fresh " + " ".join(args.argv),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "sizes": args.sizes,
    }


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    idx = {(r["impl"], r["n"]): r for r in results["rows"] if r["impl"] == "sqlite"}
    lines = [f"Fresh process: open a store of N runs, one durable prepare_atomic, close "
             f"(median of {meta['repeat']}; seconds; memory = peak RSS).",
             f"Command: `{meta['command']}`", "",
             "| N | store | lines since compaction | whole process | import | open | prepare "
             "| close | RSS after open | peak RSS | runstore / SQLite |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        other = idx.get(("sqlite", r["n"]))
        ratio = (f"{r['process_s'] / other['process_s']:.2f}x"
                 if r["impl"] == "runstore" and other else "")
        lines.append(
            f"| {r['n']:,} | {r['impl']} | {r.get('tail_lines', 0):,} | {r['process_s']:.3f} | "
            f"{r['import_s']:.3f} | "
            f"{r['open_s']:.3f} | {r['prepare_s']:.4f} | {r['close_s']:.4f} | "
            f"{r['open_vmrss_mb']:.0f} MB | {r['vmhwm_mb']:.0f} MB | {ratio} |")
    if results.get("lifetime"):
        lines += ["", "A process keeping the store open (not durable): 1,000 dispatcher "
                  "cycles, then every run indexed (a get of the oldest), then `compact()`; "
                  "resident memory (MB) and seconds:", "",
                  "| N | RSS after open | RSS indexed | index | compaction | peak RSS |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['n']:,} | {r['open_vmrss_mb']:.0f} | {r['index_vmrss_mb']:.0f} | "
                  f"{r['index_s']:.2f} s | {r['compact_s']:.2f} s | {r['vmhwm_mb']:.0f} |"
                  for r in results["lifetime"]]
    lines += ["", "Targets:", ""]
    for t in results["targets"]:
        detail = f" (measured {t['value']}, need {t['need']})" if "value" in t else ""
        lines.append(f"- {t['status']}: {t['target']}{detail}")
    if results["problems"]:
        lines += ["", "Problems:", ""] + [f"- {p}" for p in results["problems"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fresh",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="1k,10k,100k,1M",
                        help="preloaded run counts, comma separated (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="fresh processes per store (default: %(default)s)")
    parser.add_argument("--tail-max", type=int, default=100_000,
                        help="most cycles added as the long tail (default: %(default)s; "
                             "0: no tail case)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results directory (default: benchmarks/results)")
    parser.add_argument("--workdir", default=None,
                        help="where the stores are built (default: the system temp dir)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run it; exit status 1 when a fresh prepare misbehaved (never on speed)."""
    args = parse_args(argv)
    results = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fresh.json").write_text(json.dumps(results, indent=1) + "\n")
    text = render(results)
    (args.out / "fresh.md").write_text(text)
    print()
    print(text)
    print(f"wrote {args.out / 'fresh.json'}")
    return 0 if not results["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
