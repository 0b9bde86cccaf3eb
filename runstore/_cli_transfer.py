"""The commands of ``runstore`` that move runs between a store and elsewhere: ``export``
(to a JSON file or stdout), ``import`` (from one) and ``migrate`` (copy every run of one
store into another and verify the copy: ``runstore.migrate.copy_runs``)."""

from __future__ import annotations

import argparse
import io
import sys
from typing import IO, Any, cast

from . import _clifmt as fmt, _interchange, _targets
from ._cli_context import (
    EXIT_OK,
    Context,
    UsageError,
    _dumps,
    _plural,
    is_stdout,
    parse_location,
)
from ._location import Location
from .migrate import MigrationReport, copy_runs
from .protocol import RunStore


def _cmd_export(ctx: Context, args: argparse.Namespace) -> int:
    # a FILE that is the file stdout is open on (``export /dev/stdout >> log``) is written
    # as stdout is: through its descriptor, never by a file renamed over it
    to_stdout = args.file in (None, "-") or is_stdout(ctx, args.file)
    if not ctx.location.postgres:
        ctx.require_store()
        # before the store or the target is opened: never write over the store's own files
        if to_stdout:
            _check_stdout(ctx)
        else:
            _targets.check_output(args.file, ctx.state_dir, remedy="write the export to a "
                                  f"file outside {ctx.state_dir}")
    with ctx.store(existing=True) as store:
        if to_stdout and ctx.progress_enabled and fmt.is_terminal(ctx.out):
            buf = io.StringIO()  # kept until the progress bar is gone from the terminal
            with ctx.progress("exporting"):
                store.export(buf)
            ctx.out.write(fmt.json_visible(buf.getvalue()))
            return EXIT_OK
        if to_stdout:  # streamed: the bar, if any, is on another stream than the runs
            with ctx.progress("exporting"):
                store.export(cast(
                    IO[bytes], fmt.JsonVisibleOut(getattr(ctx.out, "buffer", ctx.out))))
            return EXIT_OK
        with ctx.progress(f"exporting to {args.file}"):
            count = _export_to_file(store, args.file)
    ctx.print(f"exported {_plural(count, 'run')} to {fmt.visible(args.file)}")
    return EXIT_OK


def _check_stdout(ctx: Context) -> None:
    """Refuse an export to a stdout redirected onto one of the store's files
    (``export >> runs.jsonl``)."""
    try:
        fd = ctx.out.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: not a file
        return
    _targets.check_output_fd(fd, ctx.state_dir, name="stdout",
                             remedy=f"redirect stdout to a file outside {ctx.state_dir}")


def _export_to_file(store: RunStore, path: str) -> int:
    """Export to the file ``path`` names (``_interchange.export_to_path``): a regular file
    through a temp file renamed over it, replaced whole or not at all; a FIFO or a
    character device written into as it is; a directory, a socket or a block device
    refused."""
    return _interchange.export_to_path(path, store.export)



def _cmd_import(ctx: Context, args: argparse.Namespace) -> int:
    # open the input first: a missing file must not leave a new, empty store behind
    from_stdin = args.file == "-"
    source = sys.stdin.buffer if from_stdin else open(args.file, "rb")  # noqa: SIM115
    try:
        with ctx.store(existing=False) as store, ctx.progress(f"importing {args.file}"):
            count = store.import_runs(source)
    finally:
        if not from_stdin:
            source.close()
    ctx.print(f"imported {_plural(count, 'run')} from {fmt.visible(args.file)} into "
              f"{fmt.visible(ctx.location.display)}")
    return EXIT_OK


def _cmd_copy(ctx: Context, args: argparse.Namespace) -> int:
    source = parse_location(args.source, "--from")
    target = parse_location(args.target, "--to")
    if source.target == target.target:
        raise UsageError(f"--from and --to are the same store ({source.display}); "
                         "name the store to copy into with --to")
    if args.store or args.state_dir:
        ctx.note("runstore: note: migrate copies --from into --to; the global "
                 "--store/--state-dir does not apply")
    ctx.require_store(source)  # never create an empty source to copy from
    if not source.postgres and not target.postgres:
        # before the target is opened (which creates it): never inside the source's directory
        _targets.check_output(target.target, source.target, name=f"--to {target.display}",
                              remedy="name a directory outside it with --to")

    def step(label: str) -> fmt.Progress:
        return ctx.progress(f"migrating: {label}")

    with ctx.open(source) as src, ctx.open(target) as dst:
        report = copy_runs(src, dst, target_name=target.display, progress=step)
    if report.source_changed:
        ctx.note(f"runstore: warning: {source.display} changed while it was copied, so "
                 f"{target.display} may lack its latest changes; stop the dispatchers "
                 "that use it before migrating (a run changed since shows as a conflict "
                 "on the next migrate)")
    if args.json:
        ctx.print(_dumps(_copy_json(report, source, target), indent=True))
        return EXIT_OK
    p = ctx.paint
    ctx.print(f"migrated {fmt.visible(source.display)} -> {fmt.visible(target.display)}")
    ctx.print_lines(fmt.key_values([
        ("source runs", f"{report.source_runs:,}"),
        ("copied", f"{report.copied:,}"),
        ("already there", f"{report.skipped:,} (identical, skipped)"),
        ("target runs", f"{report.target_runs:,}"),
        ("checksum", f"sha256:{report.checksum}"),
    ], p))
    ctx.print(f"{p.good('verified')}: {report.verified:,} of {_plural(report.source_runs, 'run')}"
              " in the target, identical checksum on both sides")
    return EXIT_OK


def _copy_json(report: MigrationReport, source: Location,
                    target: Location) -> dict[str, Any]:
    return {"source": source.display, "target": target.display, "ok": report.ok,
            "source_runs": report.source_runs, "copied": report.copied,
            "skipped": report.skipped, "target_runs": report.target_runs,
            "verified": report.verified, "checksum": f"sha256:{report.checksum}",
            "target_checksum": f"sha256:{report.target_checksum}",
            "source_changed": report.source_changed}
