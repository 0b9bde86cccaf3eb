"""The reading commands of ``runstore``: ``list``, ``show``, ``active``, ``stats`` and
``check``. None of them creates a store: with none at the location they exit 3."""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from . import _clifmt as fmt, _fields, _ids, _location, _runscan, _sound, verify
from ._cli_context import EXIT_FAILURE, EXIT_OK, Context, UsageError, _dumps, _json_array, _plural
from .model import Run, Status
from .store import Store

#: the fields of a run in the order ``show`` prints them (the order of the JSON record)
SHOW_FIELDS = ("id", *(name for name in _fields.RUN_FIELDS if name != "id"))
#: the keys of ``stats --json`` that come from ``Store.stats()``
STATS_FIELDS = ("location", "size_bytes", "runs_by_status", "runs_by_machine",
                "retained_changes", "superseded_lines", "last_seq", "oldest_seq",
                "torn_tail_offset", "torn_tail_bytes")
#: how many runs ``list`` formats and writes at a time
_BLOCK = 1000
_TERMINAL = frozenset(s.value for s in Status if s.is_terminal)


def _run_time(run: Run) -> _dt.datetime | None:
    """When a run started; for one never started, when it was created (its id says)."""
    return run.started_at or _ids.time_of(run.id) or run.ended_at


def _run_duration(run: Run, now: _dt.datetime) -> str:
    if run.started_at is None:
        return "-"
    end = run.ended_at or (None if run.is_terminal else now)
    return "-" if end is None else fmt.duration(end - run.started_at)


def _run_table(ctx: Context, runs: Sequence[Run]) -> list[str]:
    headers = ("ID", "MACHINE", "STATUS", "HASH", "STARTED", "DURATION", "EXIT")
    rows = [
        [fmt.visible(run.id), fmt.visible(run.machine), ctx.paint.status(run.status.value),
         fmt.visible(run.test_dir_hash[:12]),
         fmt.ago(run.started_at, ctx.now), _run_duration(run, ctx.now),
         "-" if run.exit_code is None else str(run.exit_code)]
        for run in runs
    ]
    return fmt.table(headers, rows, ctx.paint, right=frozenset({5, 6}))


def _emit_runs(ctx: Context, runs: Sequence[Run], as_json: bool, empty: str) -> int:
    if as_json:
        ctx.print(_json_array([_fields.run_to_json(run) for run in runs]))
    elif runs:
        ctx.print_lines(_run_table(ctx, runs))
    else:
        ctx.print(empty)
    return EXIT_OK


def _cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    if args.json and args.jsonl:
        raise UsageError("list takes --json or --jsonl, not both")
    filtered = any(v is not None for v in (args.machine, args.status, args.batch, args.since))
    with ctx.store(existing=True) as store:
        mode = "json" if args.json else "jsonl" if args.jsonl else ""
        empty = "no runs match" if filtered else "no runs"
        if args.since is None and isinstance(store, Store):  # --limit read from the end
            if mode and not filtered and args.limit is None:  # every run, as export reads
                return _stream_json_text(ctx, _every_run_json(store), mode)
            if mode:  # and no Run needed
                return _stream_json(ctx, store._iter_json(
                    machine=args.machine, status=args.status, batch_id=args.batch,
                    limit=args.limit), mode)
            if not filtered and args.limit is None:
                return _stream_table(ctx, _exported_rows(ctx, _every_run(store, _runscan.listed)),
                                     empty)
            return _stream_table(ctx, _exported_rows(ctx, store._iter_json(
                machine=args.machine, status=args.status, batch_id=args.batch,
                limit=args.limit)), empty)
        runs: Iterable[Run] = store.iter_runs(machine=args.machine, status=args.status,
                                              batch_id=args.batch)
        if args.since is not None:
            since = args.since
            runs = (r for r in runs if (t := _run_time(r)) is not None and t >= since)
        if args.limit is not None:  # the N most recent: only N are ever held
            runs = collections.deque(runs, maxlen=args.limit)
        return _stream_runs(ctx, runs, mode, empty)


def _stream_runs(ctx: Context, runs: Iterable[Run], mode: str, empty: str) -> int:
    """Print ``runs`` as they come (a table, one JSON array, or JSON lines: ``mode``), a
    block at a time, so that the first rows show at once and memory stays bounded."""
    if mode:
        return _stream_json(ctx, (_fields.run_to_json(run) for run in runs), mode)
    visible = fmt.visible  # the columns are sized on the cells as printed
    rows = ([visible(run.id), visible(run.machine), ctx.paint.status(run.status.value),
             visible(run.test_dir_hash[:12]), fmt.ago(run.started_at, ctx.now),
             _run_duration(run, ctx.now),
             "-" if run.exit_code is None else str(run.exit_code)] for run in runs)
    return _stream_table(ctx, rows, empty)


def _exported_rows(ctx: Context, items: Iterable[dict[str, Any] | _sound.SoundRow]
                   ) -> Iterator[list[str]]:
    """``_stream_runs``'s rows, made from runs as ``codec.run_to_json`` gives them (no
    ``Run`` is built: a third of the cost of a row), or from the fields a sound line holds
    (``_sound.sound_row``: nothing in them to escape): the same cells."""
    now, parse, duration, ago = ctx.now, _dt.datetime.fromisoformat, fmt.duration, fmt.ago
    status_cell = ctx.paint.status if ctx.paint.enabled else str
    visible = fmt.visible  # the columns are sized on the cells as printed
    for item in items:
        if type(item) is tuple:
            run_id, machine, status, digest, start, end, code = item
            digest = digest[:12]
        else:
            assert isinstance(item, dict)
            run_id, machine, status = visible(item["id"]), visible(item["machine"]), item["status"]
            digest = visible(item["test_dir_hash"][:12])
            started, ended, number = item.get("started_at"), item.get("ended_at"), item.get(
                "exit_code")
            start = None if started is None else parse(started)
            end = None if ended is None else parse(ended)
            code = None if number is None else str(number)
        if start is None:
            took = "-"
        else:
            if end is None and status not in _TERMINAL:
                end = now
            took = "-" if end is None else duration(end - start)
        yield [run_id, machine, status_cell(status), digest, ago(start, now), took,
               "-" if code is None else code]


def _stream_table(ctx: Context, rows: Iterable[Sequence[str]], empty: str) -> int:
    """``list``'s table of ``rows``, printed a block at a time (``_stream_runs``)."""
    out, count = ctx.out, 0
    headers = ("ID", "MACHINE", "STATUS", "HASH", "STARTED", "DURATION", "EXIT")
    for block in fmt.table_stream(headers, rows, ctx.paint, right=frozenset({5, 6}),
                                  block=_BLOCK):
        ctx.print_lines(block)
        out.flush()
        count += 1
    if not count:
        ctx.print(empty)
    return EXIT_OK


def _stream_json(ctx: Context, items: Iterable[dict[str, Any]], mode: str) -> int:
    """``_stream_runs`` of runs as ``_fields.run_to_json`` makes them: one JSON array
    (``mode`` "json") or JSON lines ("jsonl")."""
    return _stream_json_text(ctx, (_dumps(item) for item in items), mode)


def _every_run(store: Store, read: Callable[..., Any]) -> Iterator[Any]:
    """Every run (no filter), insertion order, as ``read`` gives the base's sound lines
    (``runscan.exported``: the run's JSON made from its bytes, which ``orjson.loads`` makes
    the dict; ``runscan.listed``: the fields ``list``'s table shows), and any other as the
    dict ``Store._iter_json()`` yields."""
    for offset, data in store._stream_records(read):
        if not isinstance(data, dict):
            yield data
        else:
            fields = _fields.exported_dict(data, extras=False)
            yield fields if fields is not None else _fields.run_to_json(store._run_of(data, offset))


def _every_run_json(store: Store) -> Iterator[str]:
    """``_dumps`` of each run ``_every_run`` gives as ``export`` reads it (a sound line's
    is ASCII, so ``json_visible`` has only DEL-like characters to escape, as for any
    item)."""
    for item in _every_run(store, _runscan.exported):
        yield fmt.json_visible(item.decode()) if isinstance(item, bytes) else _dumps(item)


def _stream_json_text(ctx: Context, lines: Iterable[str], mode: str) -> int:
    """``_stream_json`` of items already dumped (``_dumps``)."""
    out, count = ctx.out, 0
    lines = iter(lines)
    sep, first, last = (",\n", "[\n", "\n]\n") if mode == "json" else ("\n", "", "\n")
    while block := list(itertools.islice(lines, _BLOCK)):
        out.write((first if not count else sep) + sep.join(block))
        out.flush()
        count += len(block)
    if count:
        out.write(last)
    elif mode == "json":
        out.write("[]\n")
    return EXIT_OK


def _field_text(ctx: Context, run: Run, name: str) -> str:
    value = getattr(run, name)
    if name == "status":
        return ctx.paint.status(str(value))
    if isinstance(value, _dt.datetime):
        return fmt.timestamp(value, ctx.now)
    if value is None or value == "":
        return ctx.paint.dim("-")
    return fmt.visible(str(value))


def _cmd_show(ctx: Context, args: argparse.Namespace) -> int:
    with ctx.store(existing=True) as store:
        run = store.get(args.run_id)
    if args.json:
        ctx.print(_dumps(_fields.run_to_json(run), indent=True))
    else:
        pairs = [(name, _field_text(ctx, run, name)) for name in SHOW_FIELDS]
        pairs.append(("duration", _run_duration(run, ctx.now)))
        ctx.print_lines(fmt.key_values(pairs, ctx.paint))
    return EXIT_OK


def _cmd_active(ctx: Context, args: argparse.Namespace) -> int:
    with ctx.store(existing=True) as store:
        if args.machine is None:
            runs = store.active()
        else:
            one = store.active_by_machine(args.machine)
            runs = [] if one is None else [one]
    empty = "no active runs" if args.machine is None else (
        f"machine {args.machine!r} has no active run")
    return _emit_runs(ctx, runs, args.json, empty)


def _cmd_stats(ctx: Context, args: argparse.Namespace) -> int:
    where = ctx.location
    with ctx.store(existing=True) as store:
        stats = store.stats()
    data: dict[str, Any] = {
        "store": where.display, "backend": "postgresql" if where.postgres else "file",
        "state_dir": None if where.postgres else where.target, "source": where.source}
    data.update((name, getattr(stats, name)) for name in STATS_FIELDS)
    data["location"] = _location.redact(stats.location)  # the backend hides the password too
    data["runs"] = sum(stats.runs_by_status.values())
    if args.json:
        ctx.print(_dumps(data, indent=True))
        return EXIT_OK
    p = ctx.paint
    if where.postgres:
        where_lines = [
            ("database", fmt.visible(data["location"])),
            ("table size", f"{fmt.size(stats.size_bytes)} ({stats.size_bytes:,} bytes)"),
            ("rows", f"{stats.runs:,} runs, {stats.retained_changes:,} retained changes"),
        ]
    else:
        where_lines = [
            ("file", fmt.visible(stats.location)),
            ("file size", f"{fmt.size(stats.size_bytes)} ({stats.size_bytes:,} bytes)"),
            ("lines", f"{stats.runs:,} live, {stats.superseded_lines or 0:,} superseded"),
        ]
    ctx.print_lines(fmt.key_values([
        ("store", f"{fmt.visible(where.display)} {p.dim(f'(from {where.source})')}"),
        *where_lines,
        ("last seq", str(stats.last_seq)),
        ("oldest seq", f"{stats.oldest_seq} (the oldest change kept for `watch --since`)"),
        ("runs", f"{data['runs']:,}"),
        *([("torn tail", f"{stats.torn_tail_bytes:,} bytes from byte "
                         f"{stats.torn_tail_offset:,} (a write a crash cut short; the next "
                         "write cuts them, reads leave them; `check` says more)")]
          if stats.torn_tail_offset is not None else []),
    ], p))
    ctx.print()
    rows = [[p.status(s), f"{n:,}"] for s, n in stats.runs_by_status.items()]
    ctx.print_lines(fmt.table(("STATUS", "RUNS"), rows, p, right=frozenset({1})))
    if stats.runs_by_machine:
        ctx.print()
        rows = [[fmt.visible(m), f"{n:,}"] for m, n in sorted(stats.runs_by_machine.items())]
        ctx.print_lines(fmt.table(("MACHINE", "RUNS"), rows, p, right=frozenset({1})))
    return EXIT_OK



def _cmd_check(ctx: Context, args: argparse.Namespace) -> int:
    ctx.require_file_store("check", "it verifies the bytes of a journal file; PostgreSQL "
                           "checks its own pages and constraints (for a copy, run `migrate` "
                           "again: it verifies count and checksum)")
    ctx.require_store()
    with ctx.progress(f"checking {ctx.journal_path}"):
        report = verify.check(ctx.state_dir, lock_timeout=ctx.lock_timeout)
    torn = report.torn_tail
    if args.json:
        ctx.print(_dumps({
            "path": report.path, "ok": report.ok, "size": report.size,
            "records": report.records, "last_seq": report.last_seq,
            "problems": [{"offset": p.offset, "line": p.line, "message": p.message,
                          "remedy": p.remedy} for p in report.problems],
            "torn_tail": None if torn is None else {
                "offset": torn.offset, "end": torn.end, "bytes": torn.length,
                "reason": torn.reason},
            "synced": report.synced, "notes": list(report.notes),
        }, indent=True))
    else:
        p = ctx.paint
        shown_path = fmt.visible(report.path)
        if report.ok:
            ctx.print(f"{shown_path}: {p.good('ok')} ({report.size:,} bytes, "
                      f"{_plural(report.records, 'record')}, last seq {report.last_seq})")
        else:
            ctx.print(f"{shown_path}: {p.error('DAMAGED')} ({report.size:,} bytes; "
                      f"{_plural(report.records, 'record')} readable before the first problem)")
            for problem in report.problems:
                ctx.print(f"  line {problem.line}, byte {problem.offset}: "
                          f"{fmt.visible(problem.message)}")
                ctx.print(f"    remedy: {fmt.visible(problem.remedy)}")
        for note in report.notes:
            ctx.print(f"  {p.dim('note:')} {fmt.visible(note)}")
    return EXIT_OK if report.ok else EXIT_FAILURE


