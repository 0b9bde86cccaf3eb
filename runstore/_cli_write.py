"""The writing commands of ``runstore``: ``mark``, ``reap``, ``prune`` and ``compact``. Each
creates the store when there is none yet, as ``Store`` does."""

from __future__ import annotations

import argparse
import os

from . import _clifmt as fmt, _fields, _transitions
from ._cli_context import EXIT_OK, Context, UsageError, _dumps, _json_array, _plural, is_stdout
from .model import Status


def _cmd_reap(ctx: Context, args: argparse.Namespace) -> int:
    with ctx.store(existing=False) as store:
        runs = store.reap(stale_after=args.stale_after, dry_run=args.dry_run)
    if args.json:
        ctx.print(_json_array([_fields.run_to_json(run) for run in runs]))
        return EXIT_OK
    if not runs:
        ctx.print("no runs to reap")
        return EXIT_OK
    verb = "would reap" if args.dry_run else "reaped"
    ctx.print(f"{verb} {_plural(len(runs), 'run')}"
              + (" (dry run: nothing was changed):" if args.dry_run else " (now interrupted):"))
    rows = [[fmt.visible(run.id), fmt.visible(run.machine), fmt.ago(run.started_at, ctx.now),
             fmt.visible(run.error_code), fmt.visible(run.error_msg)] for run in runs]
    ctx.print_lines(fmt.table(("ID", "MACHINE", "STARTED", "REASON", "DETAIL"), rows, ctx.paint))
    return EXIT_OK


def _cmd_prune(ctx: Context, args: argparse.Namespace) -> int:
    with ctx.store(existing=False) as store, ctx.progress("pruning"):
        count = store.prune(older_than=args.older_than, keep_last=args.keep_last,
                            archive=args.archive, dry_run=args.dry_run)
    if args.dry_run:
        ctx.print(f"would prune {_plural(count, 'run')} (dry run: nothing was changed)")
    elif count and args.archive:
        done = f"pruned {_plural(count, 'run')}, archived to {fmt.visible(args.archive)}"
        if is_stdout(ctx, args.archive):  # on stdout, it would be written into the archive
            ctx.note(done)
        else:
            ctx.print(done)
    else:
        ctx.print(f"pruned {_plural(count, 'run')}")
    return EXIT_OK


def _cmd_compact(ctx: Context, args: argparse.Namespace) -> int:
    ctx.require_file_store("compact", "it rewrites a journal file; a PostgreSQL store updates "
                           "each run's row in place and the server reclaims space (VACUUM); "
                           "use `prune` to remove old runs")
    with ctx.store(existing=False) as store:
        before = os.stat(ctx.journal_path).st_size
        with ctx.progress(f"compacting {ctx.journal_path}"):
            store.compact()
        after = os.stat(ctx.journal_path).st_size
    ctx.print(f"compacted {fmt.visible(ctx.journal_path)}: {fmt.size(before)} -> "
              f"{fmt.size(after)}")
    return EXIT_OK


def _cmd_mark(ctx: Context, args: argparse.Namespace) -> int:
    target = Status(args.status)
    if not target.is_terminal and (args.exit_code is not None or args.error_code
                                   or args.error_msg):
        raise UsageError(f"--exit-code, --error-code and --error-msg go with a terminal "
                         f"status, not {target.value}")
    with ctx.store(existing=False) as store:
        before = store.get(args.run_id)
        if before.status is target:
            after = before
        elif target is Status.RUNNING:
            after = store.start(args.run_id)
        elif target.is_terminal:
            after = store.finish(args.run_id, target, exit_code=args.exit_code,
                                 error_code=args.error_code, error_msg=args.error_msg)
        else:  # back to pending: the state machine refuses it, in its own words
            _transitions.check_transition(args.run_id, before.status, target)
            after = before
    if args.json:
        ctx.print(_dumps(_fields.run_to_json(after), indent=True))
    elif after.revision == before.revision:
        ctx.print(f"run {fmt.visible(after.id)} is already "
                  f"{ctx.paint.status(after.status.value)}; nothing changed")
    else:
        ctx.print(f"run {fmt.visible(after.id)}: {ctx.paint.status(before.status.value)} -> "
                  f"{ctx.paint.status(after.status.value)}")
    return EXIT_OK
