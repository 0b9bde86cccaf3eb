"""Whole-store reads at 100,000 and 1,000,000 runs: wall time and peak memory of the CLI's
`list`, `list --json`, `export`, `check` and `prune --archive`, beside SQLite doing the same job.

Each store is built once per size (the runs imported in batches of 20,000 through the library,
then compacted: a freshly compacted store), in a temp directory removed at the end; SQLite
gets the same runs in one table. Every command runs in a child process, measured with
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper that runs only it, its output
to /dev/null (`list` through a pipe is the same program). Each result is checked: the
output's run count (SQLite's too) must be the store's.

The SQLite jobs: `list` and `list --json` and `export` are a SELECT of every row in insertion
order written as JSON (one array, via orjson, the way runstore writes it), `check` is
`PRAGMA integrity_check`, `prune --archive` writes the oldest half as JSON lines to a file,
fsyncs it and deletes them in one transaction.

    python -m benchmarks.bench_million --sizes 100k,1M --rounds 3 --plot

writes ``results/million.json``, ``results/million.md`` and, with ``--plot``,
``results/million.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_BASE = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)

_BUILD = textwrap.dedent("""
    import datetime as dt, sys
    from runstore import Run, Status, Store
    n, where, compact = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "compact"
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with Store(where, durable=False) as store:
        for k in range(0, n, 20000):
            store.import_runs([
                Run(f"m{i % 97}", f"/srv/tests/suite-{i % 13}", f"{i % 31:020x}",
                    status=Status.COMPLETED if i % 9 else Status.FAILED, exit_code=i % 2,
                    started_at=base + dt.timedelta(seconds=i),
                    ended_at=base + dt.timedelta(seconds=i + 5), batch_id=f"b{i // 1000}",
                    logs_path=f"/srv/logs/{i}.log", id=f"20260101T000000.000000Z-{i:016x}")
                for i in range(k, min(n, k + 20000))])
        if compact:
            store.compact()
""")

_MEASURE = textwrap.dedent("""
    import resource, subprocess, sys, time
    t = time.perf_counter()
    with open(sys.argv[1], "wb") as out:
        subprocess.run(sys.argv[2:], stdout=out, check=True)
    print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")

_SQLITE_JOB = textwrap.dedent("""
    import os, sqlite3, sys, orjson
    db, job, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    con = sqlite3.connect(db)
    cols = ("id machine test_dir test_dir_hash status exit_code started_at ended_at "
            "artifacts_path logs_path error_code error_msg batch_id revision").split()
    out = sys.stdout.buffer
    if job == "check":
        print(con.execute("PRAGMA integrity_check").fetchone()[0])
    elif job == "prune":
        rows = con.execute(f"SELECT {','.join(cols)} FROM runs ORDER BY rowid LIMIT ?", [n // 2])
        fd = os.open(sys.argv[4], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            ids = []
            while batch := rows.fetchmany(2000):
                f.write(b"".join(orjson.dumps(dict(zip(cols, r))) + b"\\n" for r in batch))
                ids.extend(r[0] for r in batch)
            f.flush()
            os.fsync(f.fileno())
        with con:
            con.executemany("DELETE FROM runs WHERE id = ?", ((i,) for i in ids))
    else:
        rows = con.execute(f"SELECT {','.join(cols)} FROM runs ORDER BY rowid")
        first = True
        out.write(b"[")
        while batch := rows.fetchmany(2000):
            items = b",\\n".join(orjson.dumps(dict(zip(cols, r))) for r in batch)
            out.write((b"\\n" if first else b",\\n") + items)
            first = False
        out.write(b"\\n]\\n")
""")


def _parse_size(text: str) -> int:
    text = text.strip().lower()
    for suffix, mult in (("k", 1000), ("m", 1000_000)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * mult)
    return int(text)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _measure(argv: list[str], out: str) -> tuple[float, int]:
    done = subprocess.run([sys.executable, "-c", _MEASURE, out, *argv], env=_env(),
                          capture_output=True, text=True, check=True)
    seconds, kib = done.stdout.split()
    return float(seconds), int(kib)


def _build_sqlite(db: str, store_dir: str) -> None:
    """The store's runs, as exported, into one SQLite table (not timed)."""
    export = os.path.join(os.path.dirname(db), "seed.json")
    subprocess.run([sys.executable, "-m", "runstore", "--state-dir", store_dir, "export",
                    export], env=_env(), check=True, capture_output=True)
    with open(export, "rb") as f:
        runs = json.load(f)
    os.unlink(export)
    cols = ["id", "machine", "test_dir", "test_dir_hash", "status", "exit_code",
            "started_at", "ended_at", "artifacts_path", "logs_path", "error_code",
            "error_msg", "batch_id", "revision"]
    con = sqlite3.connect(db)
    con.execute(f"CREATE TABLE runs ({', '.join(cols)})")
    con.execute("CREATE UNIQUE INDEX runs_id ON runs (id)")
    with con:
        con.executemany(f"INSERT INTO runs VALUES ({','.join('?' * len(cols))})",
                        ([r.get(c, "") for c in cols] for r in runs))
    con.close()


def _count(path: str, kind: str) -> int:
    with open(path, "rb") as f:
        if kind == "json":
            return len(json.load(f))
        if kind == "lines":
            return sum(1 for line in f if line.strip())
        return sum(1 for line in f if line.startswith(b"2026"))


def bench(n: int, tmp: str, compact: bool = True, rounds: int = 1) -> list[dict[str, Any]]:
    """The commands on a store of ``n`` runs: freshly compacted, or (``compact=False``) as
    its imports left it, every run a line of a tail no compaction ever summarised: the
    most a store of ``n`` runs can hold outside a compacted base, since the automatic
    compaction lets superseded lines grow only to about the live ones. Each reading
    command runs ``rounds`` times, alternating with SQLite: the least time and the
    greatest peak of each side count (``prune``, which changes the store, runs once)."""
    store = os.path.join(tmp, f"store-{n}")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", _BUILD, str(n), store,
                    "compact" if compact else "tail"], env=_env(), check=True)
    print(f"  built {n:,} runs in {time.perf_counter() - t:.1f} s", flush=True)
    db = os.path.join(tmp, f"runs-{n}.sqlite")
    _build_sqlite(db, store)
    out = os.path.join(tmp, "out")
    cli = [sys.executable, "-m", "runstore", "--state-dir", store]
    rows = []
    jobs = [("list", [*cli, "list"], "table", "list"),
            ("list --json", [*cli, "list", "--json"], "json", "list"),
            ("export", [*cli, "export"], "json", "export"),
            ("check", [*cli, "check"], None, "check")]
    for name, argv, kind, sql_job in jobs:
        ours, theirs = [], []
        for _ in range(rounds):  # alternated; the best of each side
            ours.append(_measure(argv, out))
            if kind is not None:
                assert _count(out, kind) == n, name
            theirs.append(_measure([sys.executable, "-c", _SQLITE_JOB, db, sql_job, str(n)],
                                   out))
            if kind == "json":
                assert _count(out, "json") == n
        seconds, kib = min(s for s, _ in ours), max(k for _, k in ours)
        sql_s, sql_kib = min(s for s, _ in theirs), max(k for _, k in theirs)
        rows.append({"runs": n, "command": name + ("" if compact else " (tail)"),
                     "seconds": seconds, "peak_mib": kib / 1024,
                     "sqlite_seconds": sql_s, "sqlite_peak_mib": sql_kib / 1024})
        print(f"  {name:<16} {seconds:7.2f} s {kib / 1024:7.1f} MiB   sqlite {sql_s:6.2f} s "
              f"{sql_kib / 1024:6.1f} MiB", flush=True)
    # prune --archive of the oldest half (last: it changes the store)
    archive = os.path.join(tmp, f"archive-{n}.jsonl")  # prune appends to an archive
    seconds, kib = _measure([*cli, "prune", "--keep-last", str(n - n // 2), "--archive",
                             archive], out)
    assert _count(archive, "lines") == n // 2
    sql_s, sql_kib = _measure([sys.executable, "-c", _SQLITE_JOB, db, "prune", str(n),
                               archive + ".sqlite"], out)
    rows.append({"runs": n, "command": "prune --archive" + ("" if compact else " (tail)"),
                 "seconds": seconds,
                 "peak_mib": kib / 1024, "sqlite_seconds": sql_s,
                 "sqlite_peak_mib": sql_kib / 1024})
    print(f"  {'prune --archive':<16} {seconds:7.2f} s {kib / 1024:7.1f} MiB   sqlite "
          f"{sql_s:6.2f} s {sql_kib / 1024:6.1f} MiB", flush=True)
    shutil.rmtree(store)
    os.unlink(db)
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| runs | command | runstore s | runstore peak MiB | SQLite s | SQLite peak MiB "
             "| time ratio |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['runs']:,} | `{r['command']}` | {r['seconds']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['sqlite_seconds']:.2f} | "
                     f"{r['sqlite_peak_mib']:.0f} | {r['seconds'] / r['sqlite_seconds']:.1f}x |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["runs"] for r in rows})
    commands = list(dict.fromkeys(r["command"] for r in rows))
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 7), squeeze=False)
    for col, n in enumerate(sizes):
        mine = {r["command"]: r for r in rows if r["runs"] == n}
        xs = range(len(commands))
        for row, (key, sql_key, label) in enumerate(
                (("seconds", "sqlite_seconds", "wall time (s)"),
                 ("peak_mib", "sqlite_peak_mib", "peak RSS (MiB)"))):
            ax = axes[row][col]
            ax.bar([x - 0.2 for x in xs], [mine[c][key] for c in commands], 0.4,
                   label="runstore")
            ax.bar([x + 0.2 for x in xs], [mine[c][sql_key] for c in commands], 0.4,
                   label="SQLite")
            ax.set_xticks(list(xs), commands, rotation=20, fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{n:,} runs")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100k,1M")
    p.add_argument("--plot", action="store_true")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each reading command and of SQLite's, alternated: the "
                        "least time of each side counts (a busy machine's noise)")
    p.add_argument("--tail", default="",
                   help="sizes also measured uncompacted (every run in the tail): the worst "
                        "case for memory, written to million-tail.md/json")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    tail: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="runstore-million-") as tmp:
        for n in (_parse_size(s) for s in args.sizes.split(",") if s):
            print(f"{n:,} runs", flush=True)
            rows += bench(n, tmp, rounds=args.rounds)
        for n in (_parse_size(s) for s in args.tail.split(",") if s):
            print(f"{n:,} runs, uncompacted", flush=True)
            tail += bench(n, tmp, compact=False, rounds=args.rounds)
    RESULTS.mkdir(exist_ok=True)
    rounds = f" --rounds {args.rounds}" if args.rounds != 1 else ""
    if tail:
        (RESULTS / "million-tail.json").write_text(json.dumps(tail, indent=1) + "\n")
        (RESULTS / "million-tail.md").write_text(
            f"`python -m benchmarks.bench_million --sizes '' --tail {args.tail}{rounds}`\n\n"
            + _markdown(tail))
        print(_markdown(tail))
        if not rows:
            return 0
    (RESULTS / "million.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "million.md").write_text(
        f"`python -m benchmarks.bench_million --sizes {args.sizes}{rounds}`\n\n"
        + _markdown(rows))
    if args.plot:
        _plot(rows, RESULTS / "million.png")
    print(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
