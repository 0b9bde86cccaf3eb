"""``runstore`` / ``python -m runstore``: inspect and operate a store from the shell.

::

    runstore [--store URL | --state-dir DIR] [--lock-timeout SECONDS] [--color WHEN] COMMAND

    reading   list, show RUN_ID, active [MACHINE], stats, watch, check, export [FILE]
    writing   mark RUN_ID STATUS, reap, prune, compact, import FILE
    other     migrate --from STORE --to STORE   (copy runs: runstore.migrate.copy_runs)
              stress [ARGS...]   (runstore.stress.main, arguments passed through)

The store is the first of: ``--store URL`` (a directory, ``file:///dir`` or
``postgresql://...``) or ``--state-dir DIR`` (both together is a usage error), then
``$RUNSTORE_URL``, then ``$RUNSTORE_DIR`` (a variable set to "" counts as unset), then the
user's state directory
(``platformdirs.user_state_dir("runstore")``; without platformdirs, ``$XDG_STATE_HOME/runstore``
or ``~/.local/state/runstore``). Every command goes through ``runstore.open``, so it works on
either backend, except the ones about the journal file (``check``, ``compact``), which refuse a
PostgreSQL store (exit 2). A password in a URL is never printed. Reading commands never create
a file store: with no journal at DIR they report ``no store at DIR`` (exit 3). Writing commands
create it, as ``Store`` does.

Exit codes (``main`` is the one place that turns errors into them and into one line on
stderr, ``runstore: error: <what went wrong>; <what to do>``, never a traceback):

====  =====================================================================================
0     success; ``check``: the file is healthy
1     failure: the store refused the operation (a forbidden transition, an invalid record on
      import, an unsafe directory, an I/O error; ``migrate``: a conflicting run), a file
      could not be read or written, the PostgreSQL server failed or refused us, or ``check``
      found the file damaged
2     usage: unknown command or option, bad option or argument value (each typed value is
      checked before any store is opened: an unsupported store URL, an empty ``--store`` or
      ``--state-dir``, ``--store`` with ``--state-dir``, an empty name, text that is not
      UTF-8, a date out of range), stdout closed at the start, a file-only command on a
      PostgreSQL store, an
      output (``export FILE``, ``prune --archive FILE``, ``migrate --to``) that is one of
      the store's own files, its state directory or inside it (nothing is written)
3     not found: no run with that id, no store at the state directory, or (``watch --since``)
      changes that compaction already dropped
4     the store's lock was not acquired within ``--lock-timeout`` seconds
5     damaged store: a command other than ``check`` hit ``CorruptStoreError`` (the file was
      left untouched; run ``runstore check`` for the report); ``migrate``: the copy failed
      its verification (count or checksum)
130   interrupted (Ctrl-C); ``watch`` exits 0 instead, Ctrl-C being how it is meant to end
====  =====================================================================================

Every text the commands print - run fields, paths, error messages - shows control
characters, escape sequences and bidi controls as escapes (``\\x1b``, ``\\n``, ``\\u202e``;
``_clifmt.visible``), so what a store holds cannot drive the terminal; JSON output writes them
as JSON escapes.

The command line is in parts, each private: this module is the entry point (``main``, the
parser, the global options); ``_cli_context`` the exit codes, the errors and ``Context``
(which store, the streams); ``_cli_args`` the types of option values; the commands by
idea in ``_cli_read`` (list, show, active, stats, check), ``_cli_write`` (mark, reap, prune,
compact), ``_cli_transfer`` (export, import, migrate) and ``_cli_watch`` (watch, stress);
``_clifmt`` the formatting. Store locations are read by ``runstore._location``, as
``runstore.open`` reads them.

Why argparse and not click: it is in the standard library, so the CLI adds no dependency to a
library whose only job is a file format and a lock, and ``import runstore`` stays as cheap as
it is (nothing here is imported by the package). It has everything these commands need
(sub-commands, repeatable and mutually exclusive options, a pass-through remainder for
``stress``); the one thing changed is ``error()``, so that usage errors are one line and exit
code 2 like every other error, and ``main(argv)`` returns an exit code tests can call.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from . import _clifmt as fmt
from ._cli_args import (
    _batch,
    _duration,
    _int64,
    _location,
    _machine,
    _non_negative_int,
    _path,
    _positive_int,
    _run_id,
    _seconds,
    _since,
    _utf8,
)
from ._cli_context import (
    EXIT_CODES,
    EXIT_DAMAGED,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    POSTGRES_TABLE,
    Context,
    NoStoreError,
    UsageError,
    default_state_dir,
    exit_code_for,
    message_for,
    parse_location,
    resolve_location,
    resolve_state_dir,
)
from ._cli_read import (
    SHOW_FIELDS,
    STATS_FIELDS,
    _cmd_active,
    _cmd_check,
    _cmd_list,
    _cmd_show,
    _cmd_stats,
)
from ._cli_transfer import _cmd_copy, _cmd_export, _cmd_import
from ._cli_watch import WATCH_SLICE, _cmd_stress, _cmd_watch
from ._cli_write import _cmd_compact, _cmd_mark, _cmd_prune, _cmd_reap
from ._location import Location, passwords_in, redact, scrub
from .errors import RunstoreError
from .model import Status

__all__ = [
    "COMMAND_HELP", "EXIT_CODES", "EXIT_DAMAGED", "EXIT_FAILURE", "EXIT_INTERRUPTED",
    "EXIT_LOCKED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE", "GLOBAL_OPTIONS",
    "POSTGRES_TABLE", "SHOW_FIELDS", "STATS_FIELDS", "WATCH_SLICE", "Context", "Location",
    "NoStoreError", "UsageError", "build_parser", "default_state_dir", "exit_code_for",
    "main", "message_for", "misplaced_global_options", "parse_location", "passwords_in",
    "redact", "resolve_location", "resolve_state_dir", "scrub",
]


# -- the parser ------------------------------------------------------------------------------

#: what ``runstore COMMAND --help`` says about each command
COMMAND_HELP = {
    "list": "List the runs of the store, oldest first, as a table (id, machine, status, hash,\n"
            "when started, duration, exit code), or every field with --json. The filters\n"
            "combine; --limit keeps the most recent of the runs that match.",
    "show": "Show every field of one run, named by its id, with times in UTC and relative\n"
            "to now, and how long it ran. Exit 3 when no run has that id.",
    "active": "List the non-terminal (pending or running) runs, at most one per machine;\n"
              "with MACHINE, only that machine's run (or a line saying it has none).",
    "stats": "Which store this is and where its name came from, its size, its live and\n"
             "superseded lines (rows, for PostgreSQL), the last and the oldest retained\n"
             "sequence numbers, and the runs by status and by machine.",
    "watch": "Print each change to the store as it happens, from any process (one line per\n"
             "change: seq, time, change type, status, machine, run id), until Ctrl-C (exit\n"
             "0) or --timeout. --since SEQ first replays the retained changes after SEQ;\n"
             "when SEQ is older than what compaction kept, it exits 3 naming the oldest\n"
             "retained change (--since 0 starts at that one instead).",
    "reap": "Interrupt the non-terminal runs whose owner process is gone (error_code\n"
            "owner_gone) or whose last heartbeat or change is older than --stale-after\n"
            "(heartbeat_stale), unless their owner process on this host still runs; print\n"
            "them. --dry-run only shows which runs that would be.",
    "prune": "Remove terminal runs - those that ended more than --older-than ago, or all\n"
             "but the --keep-last newest - never a pending or running one; first append\n"
             "them to --archive FILE (JSON lines, synced), then compact the file.",
    "compact": "Rewrite the journal file keeping the latest version of each run and the\n"
               "last 4,096 changes (for `watch --since`), through a synced temp file renamed\n"
               "over it, and print its size before and after. File stores only.",
    "check": "Read and verify the whole journal file - each line's checksum and sequence\n"
             "number, the compacted part's checksum - without modifying it, and report\n"
             "each problem with its line, byte offset and remedy. Exit 0 when healthy, 1\n"
             "when damaged. File stores only.",
    "export": "Write every run, oldest first, as one JSON array (one run per line) to FILE,\n"
              "through a temp file renamed over it, or to stdout. `import` reads it back.\n"
              "A symlink is followed; a FIFO or a character device is written into as it\n"
              "is; a directory, a socket or a block device is refused (exit 2).",
    "import": "Add the runs in FILE (a JSON array, as `export` writes, or JSON lines),\n"
              "keeping their ids. All or nothing: a duplicate id, an invalid record or a\n"
              "second active run for a machine refuses the whole file.",
    "mark": "Move one run to STATUS by hand, through the state machine: pending ->\n"
            "running, or to a terminal status (completed, failed, interrupted, timeout)\n"
            "with an optional exit code, error code and message. A run already in STATUS\n"
            "is left as it is.",
    "migrate": "Copy every run of the --from store into the --to store (e.g. a directory\n"
               "into PostgreSQL), skipping runs already there unchanged, then verify that\n"
               "both hold the same count and checksum. The global --store/--state-dir do\n"
               "not apply.",
    "stress": "Run the concurrency stress test (its arguments are passed through; see\n"
              "`stress --help`).",
}

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises ``UsageError`` (one line, exit 2) instead of
    printing the usage and calling ``sys.exit``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("runstore")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser(prog: str = "runstore") -> argparse.ArgumentParser:
    """The whole command line; each sub-command sets ``func`` to its implementation."""
    parser = _Parser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Inspect and operate a runstore store (the state of test/job runs):\n"
                    "a journal file or a PostgreSQL database.\n\n"
                    "Which store: --store URL or --state-dir DIR (not both), else "
                    "$RUNSTORE_URL,\nelse $RUNSTORE_DIR, else the user's state directory; "
                    "`stats` says which one.\nAn empty variable counts as unset.",
        epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 not found (run or store), "
               "4 lock timeout, 5 damaged store, 130 interrupted")
    parser.add_argument("--store", metavar="URL", type=_location,
                        help="the store: a directory, file:///dir or "
                             "postgresql://user@host/dbname (default: $RUNSTORE_URL); "
                             "not together with --state-dir")
    parser.add_argument("--state-dir", metavar="DIR", type=_location,
                        help="the store's directory (default: $RUNSTORE_DIR, else the user's "
                             "state directory, e.g. ~/.local/state/runstore)")
    parser.add_argument("--lock-timeout", metavar="SECONDS", type=_seconds, default=30.0,
                        help="give up (exit 4) when the store's lock is busy this long "
                             "(default: %(default)g)")
    parser.add_argument("--color", "--colour", choices=("auto", "always", "never"),
                        default="auto", help="colour the output: auto (a terminal, unless "
                        "NO_COLOR is set), always or never")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[Context, argparse.Namespace], int], text: str,
                **kwargs: Any) -> argparse.ArgumentParser:
        """``text``: the line in the list of commands; its ``--help`` shows
        ``COMMAND_HELP[name]``, which says what this command does and prints."""
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=text, description=COMMAND_HELP[name],
            formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        p.set_defaults(func=func)
        return p

    def json_flag(p: argparse.ArgumentParser, what: str, records: bool = True) -> None:
        tail = " with the record fields exactly as in the file" if records else ""
        p.add_argument("--json", action="store_true", help=f"print {what}{tail}")

    p = command("list", _cmd_list, "list runs (oldest first), optionally filtered")
    p.add_argument("--machine", metavar="NAME", type=_machine, help="only runs of this machine")
    p.add_argument("--status", action="append", choices=[s.value for s in Status],
                   help="only runs in this status (repeatable)")
    p.add_argument("--batch", metavar="ID", type=_batch, help="only runs of this batch")
    p.add_argument("--since", metavar="WHEN", type=_since,
                   help="only runs started (or, never started, created) since WHEN: a "
                        "duration ago (2h, 30m, 7d) or a date (2026-01-31[T12:00][Z])")
    p.add_argument("--limit", metavar="N", type=_positive_int,
                   help="only the N most recent of the matching runs")
    json_flag(p, "one JSON array")
    p.add_argument("--jsonl", action="store_true",
                   help="print one JSON object per run and line (the fields as with --json)")

    p = command("show", _cmd_show, "every field of one run")
    p.add_argument("run_id", metavar="RUN_ID", type=_run_id)
    json_flag(p, "one JSON object")

    p = command("active", _cmd_active, "the non-terminal (pending or running) runs")
    p.add_argument("machine", metavar="MACHINE", nargs="?", type=_machine,
                   help="only this machine's run")
    json_flag(p, "one JSON array")

    p = command("stats", _cmd_stats, "counts, sizes and sequence numbers of the store")
    json_flag(p, "one JSON object", records=False)

    p = command("watch", _cmd_watch, "follow changes live until interrupted (Ctrl-C exits 0)")
    p.add_argument("--since", metavar="SEQ", type=_non_negative_int,
                   help="first replay the retained changes after SEQ (0: from the oldest "
                        "retained change, also after a compaction dropped older ones); "
                        "default: only changes from now on")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds,
                   help="stop after this many seconds (default: follow until interrupted)")
    json_flag(p, "one JSON object per change and line (seq, time, change and the run)")

    p = command("reap", _cmd_reap,
                "interrupt non-terminal runs whose owner process is gone or that are stale")
    p.add_argument("--stale-after", metavar="DURATION", type=_duration, required=True,
                   help="also reap runs with no heartbeat or change for this long (10m, 2h), "
                   "unless their owner process on this host still runs")
    p.add_argument("--dry-run", action="store_true", help="only show what would be reaped")
    json_flag(p, "the reaped runs as one JSON array")

    p = command("prune", _cmd_prune, "remove old terminal runs (then compact the file)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--older-than", metavar="DURATION", type=_duration,
                       help="remove terminal runs that ended longer ago than this (30d)")
    which.add_argument("--keep-last", metavar="N", type=_non_negative_int,
                       help="remove all but the N newest terminal runs")
    p.add_argument("--archive", metavar="FILE", type=_path,
                   help="first append the removed runs to FILE (JSON lines)")
    p.add_argument("--dry-run", action="store_true", help="only count what would be removed")

    command("compact", _cmd_compact,
            "rewrite the file with only the latest version of each run (file stores)")

    p = command("check", _cmd_check, "verify the whole file without modifying it (exit 0 "
                "healthy, 1 damaged; file stores)")
    json_flag(p, "the report as one JSON object", records=False)

    p = command("export", _cmd_export, "write every run as one JSON array document")
    p.add_argument("file", metavar="FILE", nargs="?", type=_path,
                   help="where to write (a file is replaced atomically); default or -: stdout")

    p = command("import", _cmd_import,
                "add runs, keeping their ids, from a JSON array or JSON lines (all or nothing)")
    p.add_argument("file", metavar="FILE", type=_path, help="the file to read; -: stdin")

    p = command("mark", _cmd_mark,
                "move a run to STATUS by hand, through the state machine")
    p.add_argument("run_id", metavar="RUN_ID", type=_run_id)
    p.add_argument("status", metavar="STATUS", choices=[s.value for s in Status],
                   help="running (from pending), or completed, failed, interrupted, timeout")
    p.add_argument("--exit-code", metavar="N", type=_int64,
                   help="the exit code (terminal only)")
    p.add_argument("--error-code", metavar="CODE", default="", type=_utf8,
                   help="a machine-readable error code (terminal only)")
    p.add_argument("--error-msg", metavar="TEXT", default="", type=_utf8,
                   help="a human-readable error message (terminal only)")
    json_flag(p, "the run after the change as one JSON object")

    p = command("migrate", _cmd_copy,
                "copy every run of one store into another (e.g. a directory into PostgreSQL),"
                " skipping runs already there, then verify count and checksum")
    p.add_argument("--from", dest="source", metavar="STORE", required=True, type=_location,
                   help="the store to copy: a directory, file:///dir or postgresql://... "
                        "(it must exist)")
    p.add_argument("--to", dest="target", metavar="STORE", required=True, type=_location,
                   help="where to copy it (created when missing)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")

    # prefix_chars that no argument uses: every argument after `stress`, options included,
    # lands in the remainder (argparse.REMAINDER alone stops at the first option, bpo-17050)
    p = command("stress", _cmd_stress, "the concurrency stress run (runstore.stress)",
                add_help=False, prefix_chars="\x00")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to runstore.stress")
    return parser


# -- the entry point ---------------------------------------------------------------------------

def _default_prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m runstore" if name in ("", "__main__.py", "-c") else "runstore"


def _report(err: TextIO, paint: fmt.Painter, prog: str, message: str) -> None:
    err.write(f"{prog}: {paint.error('error:')} {fmt.visible(message)}\n")
    err.flush()


def _from_database_driver(exc: BaseException) -> bool:
    """True for an error of the PostgreSQL driver (psycopg), without importing it."""
    return any(kind.__module__.split(".")[0] in ("psycopg", "psycopg_pool")
               for kind in type(exc).__mro__)


def _database_message(exc: BaseException) -> str:
    first = message_for(exc) or type(exc).__name__
    return (f"PostgreSQL: {first}; check the store URL, that the server is up and that it "
            "accepts this user and database")


def _secrets(args: argparse.Namespace) -> list[str]:
    """Every password the command line or the environment holds, never to be printed."""
    places = [getattr(args, name, None) for name in ("store", "state_dir", "source", "target")]
    places.append(os.environ.get("RUNSTORE_URL"))
    return [secret for place in places for secret in passwords_in(place)]


def _silence_stdout() -> None:
    """After a broken pipe (``runstore list | head``): point stdout at /dev/null so the
    interpreter's final flush does not complain."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


#: the global options (those that go before the command) and the placeholder of their value
GLOBAL_OPTIONS = {"--store": "URL", "--state-dir": "DIR", "--lock-timeout": "SECONDS",
                  "--color": "WHEN", "--colour": "WHEN"}


def misplaced_global_options(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """(the command, the global options written after it) when ``argv`` puts any there
    (``list --state-dir DIR``), else None. ``stress`` takes its own options, ``--state-dir``
    among them, so nothing after it is misplaced."""
    command, i = None, 0
    while i < len(argv):
        token = argv[i]
        if token in GLOBAL_OPTIONS:
            i += 2
            continue
        if not token.startswith("-"):
            command = token
            break
        i += 1
    if command is None or command == "stress":
        return None
    found = [name for token in argv[i + 1:] for name in GLOBAL_OPTIONS
             if token == name or token.startswith(name + "=")]
    return (command, list(dict.fromkeys(found))) if found else None


def _usage_hint(argv: Sequence[str], prog: str) -> str:
    """For a usage error: where global options go, when some were put after the command."""
    misplaced = misplaced_global_options(argv)
    if misplaced is None:
        return ""
    command, names = misplaced
    example = " ".join(f"{name} {GLOBAL_OPTIONS[name]}" for name in names)
    what = "is a global option: put it" if len(names) == 1 else "are global options: put them"
    return (f"; {', '.join(names)} {what} before the command, as in "
            f"`{prog} {example} {command} ...`")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run one command line (``sys.argv[1:]`` by default) and return its exit code."""
    out, err = sys.stdout, sys.stderr
    prog = prog or _default_prog()
    if out is None or err is None:  # started with the descriptor closed (`>&-`)
        if err is not None:
            _report(err, fmt.Painter(False), prog, "standard output is closed; run the "
                    "command with stdout open (redirect it to /dev/null to discard it)")
        return EXIT_USAGE
    err_paint = fmt.Painter(fmt.colour_wanted(err))
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(prog).parse_args(words)
    except UsageError as exc:
        # the arguments may hold a password (--store postgresql://u:pw@host/db)
        secrets = [secret for word in words for secret in passwords_in(word)]
        _report(err, err_paint, prog,
                scrub(message_for(exc) + _usage_hint(words, prog), secrets))
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    err_paint = fmt.Painter(fmt.colour_wanted(err, args.color))
    secrets = _secrets(args)
    if args.store is not None and args.state_dir is not None:
        _report(err, err_paint, prog, "--store and --state-dir both name the store; pass only "
                f"one (see `{prog} --help`)")
        return EXIT_USAGE

    def show_warning(message: Warning | str, category: type[Warning], filename: str,
                     lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
        err.write(f"{prog}: warning: {fmt.visible(message_for(Exception(str(message))))}\n")

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return int(args.func(Context(args, out, err), args))
        except KeyboardInterrupt:
            if args.command == "watch":
                return EXIT_OK
            _report(err, err_paint, prog, "interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_OK
        except (UsageError, NoStoreError, RunstoreError, OSError) as exc:
            _report(err, err_paint, prog, scrub(message_for(exc), secrets))
            return exit_code_for(exc)
        except Exception as exc:
            if not _from_database_driver(exc):
                raise
            _report(err, err_paint, prog, scrub(_database_message(exc), secrets))
            return EXIT_FAILURE
