"""The durable dispatcher cycle with 1, 2, 4, 8 and 16 client processes against one
throwaway PostgreSQL server: how each implementation scales with dispatchers.

One cycle: ``prepare_atomic`` on one of the client's own machines (so it CREATES), then
``start``, ``get`` and ``finish`` of that run: 4 operations. Side by side in the same run:

- ``postgres-lock``: the anchor, hand-written SQL keeping the contract (a partial unique index
  on ``machine`` for pending/running rows; ``prepare_atomic`` in one transaction under an
  advisory lock on the machine: a ``SELECT`` of its active run, then ``make()`` and an
  ``INSERT`` only when it is free; ``UPDATE ... WHERE status = ...``; ``SELECT``): 5 round
  trips to create, 1 for each other call;
- ``postgres``: the same, but ``prepare_atomic`` is one ``INSERT ... ON CONFLICT DO
  NOTHING`` with the run ``make()`` returned before anything was known about the machine
  (which the contract does not allow: ``make()`` may allocate resources); the floor for a
  create, 1 round trip;
- ``runstore-pg``: ``runstore.PostgresStore`` (one database per implementation, same server):
  2 round trips to create (a read, then ``make()`` and the insert), 1 for each other call;
- ``runstore``: the file store (``runstore.Store``) in a temporary directory on local disk.

Each case (implementation x client count) runs ``--rounds`` times for ``--seconds`` each,
the order of the implementations rotating from round to round; ops/s = all clients'
operations / the summed wall time. ``--proxy-delay-ms D`` also runs the PostgreSQL
implementations at ``--proxy-clients`` clients through a TCP proxy of this module that
delays every chunk by D ms each way (a stand-in for a network; the file store has none).

Run from the repository root::

    python -m benchmarks.bench_pg_clients                       # 1..16 clients, durable
    python -m benchmarks.bench_pg_clients --proxy-delay-ms 1    # plus 8 clients via proxy
    python -m benchmarks.bench_pg_clients --quick               # a smoke test

Writes ``pg_clients.json``, ``pg_clients.md`` and ``pg_clients.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runstore import PrepareOutcome, Run

from . import impls, pg_server

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ANCHOR = "postgres-lock"
IMPLS = (ANCHOR, "postgres", "runstore-pg", "runstore")
PG_IMPLS = (ANCHOR, "postgres", "runstore-pg")
_CTX = multiprocessing.get_context("fork")
#: terminal runs each store holds before the measurement
_HISTORY = 1000


# -- the delaying TCP proxy -------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk sent ``delay`` seconds after it arrived
    (chunks stay in order; a chunk does not wait for the one before it to be delayed)."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await pending.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(65536):
            pending.put_nowait((loop.time() + delay, data))
    except OSError:
        pass
    pending.put_nowait((loop.time() + delay, b""))
    with contextlib.suppress(OSError):
        await sender


def _serve_proxy(socket_path: str, delay: float, ready: Any, port_out: Any) -> None:
    """The proxy process: 127.0.0.1:<free port> -> the server's unix socket."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_unix_connection(socket_path)
        await asyncio.gather(_pipe(client_r, server_w, delay), _pipe(server_r, client_w, delay))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_out.value = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


@contextlib.contextmanager
def delaying_proxy(dsn: str, delay_ms: float) -> Iterator[str]:
    """A TCP proxy to the server of ``dsn`` (a unix-socket DSN of ``pg_server``) adding
    ``delay_ms`` each way; yields a DSN of the same database through it."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    socket_path = os.path.join(str(params["host"]), f".s.PGSQL.{params.get('port', 5432)}")
    ready, port = _CTX.Event(), _CTX.Value("i", 0)
    proc = _CTX.Process(target=_serve_proxy, args=(socket_path, delay_ms / 1000, ready, port),
                        daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the delaying proxy did not start")
        yield make_conninfo(dsn, host="127.0.0.1", port=str(port.value))
    finally:
        proc.terminate()
        proc.join(10)


def _through(proxy_dsn: str, where: str) -> str:
    """``where`` (a DSN on the server) reached through the proxy of ``proxy_dsn``."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    return make_conninfo(proxy_dsn, dbname=str(conninfo_to_dict(where)["dbname"]))


# -- one case -------------------------------------------------------------------------------


def _client(impl: str, where: str, index: int, seconds: float, barrier: Any,
            out: Any) -> None:
    """One dispatcher process: cycles on its own machines until its time is up."""
    try:
        store = impls.open_impl(impl, where, True)
        machines = [f"c{index}-m{i}" for i in range(4)]
        ops = cycles = 0
        barrier.wait(120)
        cpu = time.process_time()
        deadline = time.monotonic() + seconds
        k = 0
        while time.monotonic() < deadline:
            machine = machines[k % len(machines)]
            k += 1
            run_id, outcome = store.prepare_atomic(
                machine, "h", lambda m=machine: Run(m, f"/tests/{m}", "h"))
            ops += 1
            if outcome is not PrepareOutcome.CREATED:
                raise RuntimeError(f"{machine}: {outcome.name} of {run_id}, expected CREATED")
            store.start(run_id)
            got = store.get(run_id)
            if got.id != run_id or got.status.value != "running":
                raise RuntimeError(f"get({run_id}) returned {got!r}")
            store.finish(run_id)
            ops += 3
            cycles += 1
        cpu = time.process_time() - cpu
        store.close()
        out.put({"ops": ops, "cycles": cycles, "cpu": cpu, "error": None})
    except Exception:
        out.put({"ops": 0, "cycles": 0, "cpu": 0.0, "error": traceback.format_exc()})


def run_case(impl: str, where: str, clients: int,
             seconds: float) -> tuple[int, float, float, list[str]]:
    """(operations, wall seconds, client CPU seconds, errors) of ``clients`` processes for
    ``seconds``."""
    barrier = _CTX.Barrier(clients + 1)
    out: Any = _CTX.Queue()
    procs = [_CTX.Process(target=_client, args=(impl, where, i, seconds, barrier, out))
             for i in range(clients)]
    for p in procs:
        p.start()
    try:
        barrier.wait(180)
        began = time.monotonic()
        results = [out.get(timeout=seconds + 180) for _ in procs]
        wall = time.monotonic() - began
    finally:
        impls.join_or_kill(procs)
    errors = [r["error"] for r in results if r["error"]]
    return sum(r["ops"] for r in results), wall, sum(r["cpu"] for r in results), errors


# -- the whole run ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,2,4,8,16", help="client process counts")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per case and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--proxy-delay-ms", type=float, default=0.0,
                   help="also run the PostgreSQL implementations through a TCP proxy "
                        "delaying this much each way")
    p.add_argument("--proxy-clients", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="1 and 2 clients, 0.5 s, 1 round")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in str(args.clients).split(",")]
    args.impls = [i for i in str(args.impls).split(",") if i]
    if args.quick:
        args.clients, args.seconds, args.rounds = [1, 2], 0.5, 1
        args.proxy_clients = min(args.proxy_clients, 2)
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown implementations {sorted(unknown)}; choose from {IMPLS}")
    return args


def _measure(args: argparse.Namespace, wheres: dict[str, str], label: str,
             counts: list[int], names: list[str]) -> list[dict[str, Any]]:
    totals: dict[tuple[str, int], list[float]] = {}
    problems: dict[tuple[str, int], list[str]] = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for clients in counts:
            for impl in order:
                ops, wall, cpu, errors = run_case(impl, wheres[impl], clients, args.seconds)
                t = totals.setdefault((impl, clients), [0, 0.0, 0.0])
                t[0] += ops
                t[1] += wall
                t[2] += cpu
                problems.setdefault((impl, clients), []).extend(errors[:2])
                print(f"  [{label}] round {r + 1} {impl:12} {clients:2} clients: "
                      f"{ops / wall:8.0f} ops/s" + (f"  ERRORS: {errors[0]}" if errors else ""),
                      flush=True)
    return [{"impl": impl, "clients": c, "via": label, "ops": int(t[0]), "seconds": t[1],
             "ops_per_s": t[0] / t[1], "client_cpu_us_per_op": 1e6 * t[2] / max(t[0], 1),
             "problems": problems[(impl, c)]}
            for (impl, c), t in totals.items()]


def _summarise(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(c["impl"], c["clients"], c["via"]): c for c in cases}
    rows = []
    for (impl, clients, via), case in sorted(by.items()):
        anchor = by.get((ANCHOR, clients, via))
        one = by.get((impl, 1, via))
        rows.append({**{k: case[k] for k in ("impl", "clients", "via", "ops_per_s",
                                             "client_cpu_us_per_op")},
                     "vs_anchor": case["ops_per_s"] / anchor["ops_per_s"] if anchor else None,
                     "vs_one_client": case["ops_per_s"] / one["ops_per_s"] if one else None})
    return rows


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"# Dispatcher cycle vs client processes (durable) — {result['when']}", "",
             f"{result['machine']}; {result['seconds']} s x {result['rounds']} rounds per "
             f"case; PostgreSQL {result['server_version']}.", "",
             "| via | clients | implementation | ops/s | vs anchor | vs 1 client "
             "| client CPU µs/op |",
             "|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        ratio = "" if row["vs_anchor"] is None else f"{row['vs_anchor']:.2f}"
        scale = "" if row["vs_one_client"] is None else f"{row['vs_one_client']:.2f}"
        lines.append(f"| {row['via']} | {row['clients']} | {row['impl']} | "
                     f"{row['ops_per_s']:,.0f} | {ratio} | {scale} | "
                     f"{row['client_cpu_us_per_op']:.0f} |")
    lines += ["", "8/1 scaling ratio relative to the anchor's own: "
              + ", ".join(f"{k}: {v:.2f}" for k, v in result["scaling_vs_anchor"].items()), ""]
    return "\n".join(lines)


_LABELS = {ANCHOR: " (anchor: hand-written SQL, make() once free)",
           "postgres": " (hand-written SQL, make() first)"}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in IMPLS:
        rows = [r for r in result["summary"] if r["impl"] == impl and r["via"] == "direct"]
        if rows:
            ax.plot([r["clients"] for r in rows], [r["ops_per_s"] for r in rows],
                    marker="o", label=impl + _LABELS.get(impl, ""))
    for row in (r for r in result["summary"] if r["via"] != "direct"):
        ax.scatter([row["clients"]], [row["ops_per_s"]], marker="x",
                   label=f"{row['impl']} via {row['via']}")
    ax.set_xscale("log", base=2)
    counts = sorted({r["clients"] for r in result["summary"]})
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel("client processes")
    ax.set_ylabel("operations per second")
    ax.set_title("Dispatcher cycle, durable, one PostgreSQL server")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for impl in args.impls:
        reason = impls.IMPLS[impl].unavailable()
        if reason:
            print(f"cannot run {impl}: {reason}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="runstore-pgclients-"))
    try:
        with pg_server.throwaway_postgres({"max_connections": "200"}) as dsn:
            wheres = {}
            for impl in args.impls:
                cls = impls.IMPLS[impl]
                base = dsn if not cls.file_based else str(work)
                wheres[impl] = cls.locate(base, f"bench_{impl}")
                cls.preload(wheres[impl], _HISTORY)
            import psycopg

            with psycopg.connect(dsn) as db:
                row = db.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row else "?"
            print(f"direct, clients {args.clients}", flush=True)
            cases = _measure(args, wheres, "direct", args.clients, args.impls)
            if args.proxy_delay_ms > 0:
                pg_names = [i for i in args.impls if i in PG_IMPLS]
                label = f"proxy {args.proxy_delay_ms:g} ms"
                with delaying_proxy(dsn, args.proxy_delay_ms) as proxied:
                    via = {i: _through(proxied, wheres[i]) for i in pg_names}
                    print(f"{label}, {args.proxy_clients} clients", flush=True)
                    cases += _measure(args, via, label, [args.proxy_clients], pg_names)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = _summarise(cases)
    scaling: dict[str, float] = {}
    rates = {(r["impl"], r["clients"]): r["ops_per_s"] for r in summary if r["via"] == "direct"}
    if (ANCHOR, 1) in rates and (ANCHOR, 8) in rates:
        anchor_scale = rates[(ANCHOR, 8)] / rates[(ANCHOR, 1)]
        for impl in args.impls:
            if (impl, 1) in rates and (impl, 8) in rates:
                scaling[impl] = rates[(impl, 8)] / rates[(impl, 1)] / anchor_scale
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"Python {platform.python_version()}",
              "server_version": version, "seconds": args.seconds, "rounds": args.rounds,
              "proxy_delay_ms": args.proxy_delay_ms, "cases": cases, "summary": summary,
              "scaling_vs_anchor": scaling}
    (args.out / "pg_clients.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "pg_clients.md").write_text(_markdown(result))
    if not args.no_plot:
        _plot(result, args.out / "pg_clients.png")
    print(_markdown(result))
    return 1 if any(c["problems"] for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
