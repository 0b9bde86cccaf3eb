"""``runstore`` / ``python -m runstore``: inspect and operate a store from the shell.

::

    runstore [--store URL | --state-dir DIR] [--lock-timeout SECONDS] [--color WHEN] COMMAND

    reading   list, show RUN_ID, active [MACHINE], stats, watch, check, export [FILE]
    writing   mark RUN_ID STATUS, reap, prune, compact, import FILE
    other     migrate --from STORE --to STORE   (runstore.migrate)
              stress [ARGS...]   (runstore.stress.main, arguments passed through)

The store is the first of: ``--store URL`` (a directory, ``file:///dir`` or
``postgresql://...``) or ``--state-dir DIR`` (both together is a usage error), then
``$RUNSTORE_URL``, then ``$RUNSTORE_DIR``, then the user's state directory
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
2     usage: unknown command or option, bad option value (an unsupported store URL,
      ``--store`` with ``--state-dir``), a file-only command on a PostgreSQL store, an
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

Why argparse and not click: it is in the standard library, so the CLI adds no dependency to a
library whose only job is a file format and a lock, and ``import runstore`` stays as cheap as
it is (nothing here is imported by the package). It has everything these commands need
(sub-commands, repeatable and mutually exclusive options, a pass-through remainder for
``stress``); the one thing changed is ``error()``, so that usage errors are one line and exit
code 2 like every other error, and ``main(argv)`` returns an exit code tests can call.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import importlib
import io
import itertools
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, NamedTuple, NoReturn, TextIO, cast

import orjson

from . import _clifmt as fmt
from . import _targets, _validate, codec, interchange, journal, opener, transitions, verify
from .errors import (
    CorruptStoreError,
    HistoryTruncatedError,
    InvalidRunError,
    LockTimeoutError,
    OutputTargetError,
    RunNotFoundError,
    RunstoreError,
    TableLockTimeoutError,
)
from .migrate import MigrationReport, MigrationVerifyError, migrate
from .model import Change, Run, Status
from .protocol import RunStore
from .store import Store

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_LOCKED = 4
EXIT_DAMAGED = 5
EXIT_INTERRUPTED = 130

#: the fields of a run in the order ``show`` prints them (the order of the JSON record)
SHOW_FIELDS = ("id", *(name for name in codec.RUN_FIELDS if name != "id"))
#: the keys of ``stats --json`` that come from ``Store.stats()``
STATS_FIELDS = ("path", "file_size", "runs_by_status", "runs_by_machine", "live_lines",
                "superseded_lines", "last_seq", "oldest_seq", "torn_tail_offset",
                "torn_tail_bytes")
#: the table the CLI uses in a PostgreSQL database (``PostgresStore``'s default)
POSTGRES_TABLE = "runs"
_ID_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"  # the time prefix of ids made by runstore.ids
_ID_TIME_LEN = len("20260101T000000.000000Z")
#: how many runs ``list`` formats and writes at a time
_BLOCK = 1000


# -- errors the CLI itself raises ----------------------------------------------------------

class UsageError(Exception):
    """Bad command-line arguments (exit code 2)."""


class NoStoreError(LookupError):
    """A reading command pointed at a directory that holds no store (exit code 3)."""

    def __init__(self, state_dir: str, reason: str) -> None:
        self.state_dir = state_dir
        self.reason = reason
        super().__init__(
            f"no store at {state_dir} ({reason}); pass --state-dir DIR or set RUNSTORE_DIR "
            "to the directory of an existing store, or --store URL / RUNSTORE_URL (writing "
            "commands such as `import` create one)")


#: the one table from error classes to exit codes (first match wins)
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UsageError, EXIT_USAGE),
    (OutputTargetError, EXIT_USAGE),
    (RunNotFoundError, EXIT_NOT_FOUND),
    (HistoryTruncatedError, EXIT_NOT_FOUND),
    (NoStoreError, EXIT_NOT_FOUND),
    (LockTimeoutError, EXIT_LOCKED),
    (CorruptStoreError, EXIT_DAMAGED),
    (MigrationVerifyError, EXIT_DAMAGED),
    (RunstoreError, EXIT_FAILURE),
    (OSError, EXIT_FAILURE),
)


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of an error."""
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return EXIT_FAILURE


def message_for(exc: BaseException) -> str:
    """One line saying what went wrong and what to do, in the CLI's own terms."""
    if isinstance(exc, TableLockTimeoutError):  # its own hint: pg_locks, not fuser
        text = f"{exc}; or retry with a larger --lock-timeout"
    elif isinstance(exc, LockTimeoutError):
        text = (f"could not lock {exc.lock_path} within {exc.timeout:g} s: another process "
                f"holds it; find it with `fuser {exc.lock_path}`, or retry with a larger "
                "--lock-timeout")
    elif isinstance(exc, HistoryTruncatedError):
        text = (f"changes after seq {exc.since_seq} are no longer retained (the oldest "
                f"retained change is seq {exc.oldest_seq}); read the current state with "
                f"`list`, then follow with `watch --since {exc.oldest_seq - 1}`")
    elif isinstance(exc, OSError) and not isinstance(exc, RunstoreError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


# -- where the store is ----------------------------------------------------------------------

def default_state_dir() -> str:
    """The embedded default: the user's state directory for runstore."""
    try:
        import platformdirs
    except ImportError:  # platformdirs comes with the optional `cli` extra
        base = os.environ.get("XDG_STATE_HOME") or os.path.join("~", ".local", "state")
        return os.path.join(os.path.expanduser(base), "runstore")
    return platformdirs.user_state_dir("runstore")


def resolve_state_dir(option: str | None) -> tuple[str, str]:
    """(directory, where it came from): ``--state-dir``, ``RUNSTORE_DIR`` or ``default``."""
    if option:
        found, source = option, "--state-dir"
    elif os.environ.get("RUNSTORE_DIR"):
        found, source = os.environ["RUNSTORE_DIR"], "RUNSTORE_DIR"
    else:
        found, source = default_state_dir(), "default"
    return os.path.abspath(os.path.expanduser(found)), source


class Location(NamedTuple):
    """Where a store is: ``target`` is an absolute directory or a PostgreSQL URL (passed to
    ``runstore.open`` as it is); ``source`` is the option or variable that named it."""

    target: str
    source: str
    postgres: bool

    @property
    def display(self) -> str:
        """``target`` fit to print: a URL's password replaced by ``***``."""
        return redact(self.target)


def parse_location(text: str, source: str) -> Location:
    """A location as ``runstore.open`` understands it: a path, ``file://`` URL or
    ``postgresql://`` URL; ``UsageError`` (exit 2) for any other scheme."""
    if opener.is_postgres_url(text):
        return Location(text, source, True)
    if "://" in text:
        try:
            parsed = urllib.parse.urlsplit(text)
        except ValueError as exc:
            raise UsageError(f"{source}: {redact(text)!r} is not a valid URL ({exc})") from None
        if parsed.scheme.lower() != "file":
            raise UsageError(
                f"{source}: unsupported store URL {redact(text)!r} (scheme {parsed.scheme!r}); "
                "use a directory path, file:///path/to/dir or postgresql://user@host/dbname")
        if parsed.netloc not in ("", "localhost"):
            raise UsageError(
                f"{source}: file URL {text!r} names host {parsed.netloc!r}; a file store must "
                "be on this host (use postgresql://... to share one between hosts)")
        text = urllib.parse.unquote(parsed.path)
        if not text:
            raise UsageError(f"{source}: file URL names no directory; use file:///path/to/dir")
    return Location(os.path.abspath(os.path.expanduser(text)), source, False)


def resolve_location(store: str | None, state_dir: str | None) -> Location:
    """The store the global options and the environment name, first of: ``--store``,
    ``--state-dir`` (not both: a usage error), ``RUNSTORE_URL``, ``RUNSTORE_DIR``, default."""
    if store and state_dir:
        raise UsageError("--store and --state-dir both name the store; pass only one")
    if store:
        return parse_location(store, "--store")
    if not state_dir and os.environ.get("RUNSTORE_URL"):
        return parse_location(os.environ["RUNSTORE_URL"], "RUNSTORE_URL")
    found, source = resolve_state_dir(state_dir)  # always a directory, never a URL
    return Location(found, source, False)


_URL_PASSWORD = re.compile(r"(?i)([?&]password=)[^&#]*")
_DSN_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
_USERINFO_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/?#@]*):[^@/?#]*@", re.IGNORECASE)


def redact(location: str) -> str:
    """``location`` without its password (in the user info of a URL, a ``password=`` query
    parameter or a ``password=`` key of a libpq key/value DSN), replaced by ``***``."""
    if "://" in location:
        text = _USERINFO_PASSWORD.sub(r"\1:***@", location)
        return _URL_PASSWORD.sub(r"\1***", text)
    return _DSN_PASSWORD.sub(r"\1***", location)


def passwords_in(location: str | None) -> list[str]:
    """The passwords written in ``location`` (to scrub them from any message)."""
    if not location:
        return []
    found: list[str] = []
    if "://" in location:
        try:
            parsed = urllib.parse.urlsplit(location)
            if parsed.password:  # as written (percent-encoded) and as the server sees it
                found.append(parsed.password)
                found.append(urllib.parse.unquote(parsed.password))
            for key, value in urllib.parse.parse_qsl(parsed.query):
                if key.lower() == "password" and value:
                    found.append(value)
        except ValueError:
            pass
    else:
        found += [m.group(2).strip("'") for m in _DSN_PASSWORD.finditer(location)]
    return [p for p in found if p]


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every one of ``secrets`` replaced by ``***``."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# -- argument types ----------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= _validate.INT64_MAX:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 0 (at most 2**63 - 1), got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A number of seconds the library accepts (``_validate.seconds``): finite, 0 to
    ``MAX_SECONDS``; ``inf`` and ``nan`` are usage errors."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= _validate.MAX_SECONDS:  # False for nan, too
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds >= 0 (finite, at most {_validate.MAX_SECONDS:.0f}, "
            f"about 24.8 days), got {text!r}")
    return value


def _too_long(text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(
        f"{text!r} reaches back before the year 1; use a shorter duration")


def _duration(text: str) -> _dt.timedelta:
    """A duration the library accepts (``_validate.duration``): one that reaches back from
    now no further than the year 1."""
    try:
        value = fmt.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except OverflowError:  # more days than a timedelta holds
        raise _too_long(text) from None
    try:
        return _validate.duration("duration", value)
    except InvalidRunError:
        raise _too_long(text) from None


def _since(text: str) -> _dt.datetime:
    """``2h`` (that long ago) or a date/time (ISO 8601; without an offset: local time)."""
    try:
        return fmt.utcnow() - fmt.parse_duration(text)
    except ValueError:
        pass
    except OverflowError:  # more days than a timedelta holds, or before the year 1
        raise _too_long(text) from None
    try:
        moment = _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (2h, 30m, 7d) nor a date "
            "(2026-01-31, 2026-01-31T12:00, 2026-01-31T12:00Z)") from None
    return moment.astimezone(_dt.UTC)  # a naive time is taken as local time


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
              "through a temp file renamed over it, or to stdout. `import` reads it back.",
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
                    "`stats` says which one.",
        epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 not found (run or store), "
               "4 lock timeout, 5 damaged store, 130 interrupted")
    parser.add_argument("--store", metavar="URL",
                        help="the store: a directory, file:///dir or "
                             "postgresql://user@host/dbname (default: $RUNSTORE_URL); "
                             "not together with --state-dir")
    parser.add_argument("--state-dir", metavar="DIR",
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
    p.add_argument("--machine", metavar="NAME", help="only runs of this machine")
    p.add_argument("--status", action="append", choices=[s.value for s in Status],
                   help="only runs in this status (repeatable)")
    p.add_argument("--batch", metavar="ID", help="only runs of this batch")
    p.add_argument("--since", metavar="WHEN", type=_since,
                   help="only runs started (or, never started, created) since WHEN: a "
                        "duration ago (2h, 30m, 7d) or a date (2026-01-31[T12:00][Z])")
    p.add_argument("--limit", metavar="N", type=_positive_int,
                   help="only the N most recent of the matching runs")
    json_flag(p, "one JSON array")
    p.add_argument("--jsonl", action="store_true",
                   help="print one JSON object per run and line (the fields as with --json)")

    p = command("show", _cmd_show, "every field of one run")
    p.add_argument("run_id", metavar="RUN_ID")
    json_flag(p, "one JSON object")

    p = command("active", _cmd_active, "the non-terminal (pending or running) runs")
    p.add_argument("machine", metavar="MACHINE", nargs="?", help="only this machine's run")
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
    p.add_argument("--archive", metavar="FILE",
                   help="first append the removed runs to FILE (JSON lines)")
    p.add_argument("--dry-run", action="store_true", help="only count what would be removed")

    command("compact", _cmd_compact,
            "rewrite the file with only the latest version of each run (file stores)")

    p = command("check", _cmd_check, "verify the whole file without modifying it (exit 0 "
                "healthy, 1 damaged; file stores)")
    json_flag(p, "the report as one JSON object", records=False)

    p = command("export", _cmd_export, "write every run as one JSON array document")
    p.add_argument("file", metavar="FILE", nargs="?",
                   help="where to write (replaced atomically); default or -: stdout")

    p = command("import", _cmd_import,
                "add runs, keeping their ids, from a JSON array or JSON lines (all or nothing)")
    p.add_argument("file", metavar="FILE", help="the file to read; -: stdin")

    p = command("mark", _cmd_mark,
                "move a run to STATUS by hand, through the state machine")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("status", metavar="STATUS", choices=[s.value for s in Status],
                   help="running (from pending), or completed, failed, interrupted, timeout")
    p.add_argument("--exit-code", metavar="N", type=int, help="the exit code (terminal only)")
    p.add_argument("--error-code", metavar="CODE", default="",
                   help="a machine-readable error code (terminal only)")
    p.add_argument("--error-msg", metavar="TEXT", default="",
                   help="a human-readable error message (terminal only)")
    json_flag(p, "the run after the change as one JSON object")

    p = command("migrate", _cmd_migrate,
                "copy every run of one store into another (e.g. a directory into PostgreSQL),"
                " skipping runs already there, then verify count and checksum")
    p.add_argument("--from", dest="source", metavar="STORE", required=True,
                   help="the store to copy: a directory, file:///dir or postgresql://... "
                        "(it must exist)")
    p.add_argument("--to", dest="target", metavar="STORE", required=True,
                   help="where to copy it (created when missing)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")

    # prefix_chars that no argument uses: every argument after `stress`, options included,
    # lands in the remainder (argparse.REMAINDER alone stops at the first option, bpo-17050)
    p = command("stress", _cmd_stress, "the concurrency stress run (runstore.stress)",
                add_help=False, prefix_chars="\x00")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to runstore.stress")
    return parser


# -- the context commands run in -----------------------------------------------------------------

class Context:
    """What every command needs: the store's location, the streams, colour and progress."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self._args = args
        self._location: Location | None = None
        self.lock_timeout: float = args.lock_timeout
        self.out = out
        self.err = err
        self.paint = fmt.Painter(fmt.colour_wanted(out, args.color))
        self.now = fmt.utcnow()
        self.progress_enabled = fmt.is_terminal(err)

    @property
    def location(self) -> Location:
        """The store named by the global options or the environment (resolved on first use:
        ``migrate`` and ``stress`` never need it)."""
        if self._location is None:
            self._location = resolve_location(self._args.store, self._args.state_dir)
        return self._location

    @property
    def state_dir(self) -> str:
        return self.location.target

    @property
    def source(self) -> str:
        return self.location.source

    @property
    def journal_path(self) -> str:
        return os.path.join(self.state_dir, journal.DATA_NAME)

    def print(self, text: str = "") -> None:
        """Write ``text`` and a newline to stdout, each of its lines shown by
        ``fmt.visible`` (the values in it were passed through it before being painted)."""
        self.print_lines(text.split("\n"))

    def print_lines(self, lines: Sequence[str]) -> None:
        styles = self.paint.enabled
        self.out.write("".join(fmt.visible(line, styles=styles) + "\n" for line in lines))

    def note(self, text: str) -> None:
        """Write one line (a note or a warning) to stderr, shown by ``fmt.visible``."""
        self.err.write(fmt.visible(text) + "\n")

    def require_store(self, location: Location | None = None) -> None:
        """Raise ``NoStoreError`` unless the location holds a store: a journal file, or a
        runstore table in the database (opening a ``PostgresStore`` would create it)."""
        where = location or self.location
        if where.postgres:
            if not self._postgres_store_exists(where):
                raise NoStoreError(where.display, f"the database holds no runstore table "
                                                  f"{POSTGRES_TABLE!r}")
            return
        state_dir = where.target
        if not os.path.exists(state_dir):
            raise NoStoreError(state_dir, "the directory does not exist")
        if not os.path.isdir(state_dir):
            raise NoStoreError(state_dir, "it is not a directory")
        if not os.path.lexists(os.path.join(state_dir, journal.DATA_NAME)):
            raise NoStoreError(state_dir, f"the directory holds no {journal.DATA_NAME}")

    def require_file_store(self, command: str, why: str) -> None:
        """Refuse (usage error, exit 2) a command that only makes sense for a journal file."""
        if self.location.postgres:
            raise UsageError(f"`{command}` works on a file store only, and "
                             f"{self.location.display} (from {self.location.source}) is a "
                             f"PostgreSQL store: {why}")

    def store(self, *, existing: bool) -> RunStore:
        """Open the store; with ``existing`` refuse (exit 3) rather than create a file store."""
        if existing:
            self.require_store()
        return self.open(self.location)

    def open(self, location: Location) -> RunStore:
        """``runstore.open`` on ``location``, with a missing PostgreSQL driver explained."""
        try:
            return opener.open_store(location.target, lock_timeout=self.lock_timeout)
        except ModuleNotFoundError as exc:
            if not location.postgres:
                raise
            raise _no_driver(location, exc) from None

    def _postgres_store_exists(self, location: Location) -> bool:
        """Whether the database at ``location`` holds runstore's table (read-only check)."""
        try:
            import psycopg

            from . import pgschema
        except ModuleNotFoundError as exc:
            raise _no_driver(location, exc) from None
        timeout = max(1, round(self.lock_timeout))
        with psycopg.connect(location.target, autocommit=True, connect_timeout=timeout,
                             application_name="runstore-cli") as conn:
            return pgschema.current_version(conn, pgschema.Names.of(POSTGRES_TABLE)) > 0

    def progress(self, label: str) -> fmt.Progress:
        return fmt.Progress(self.err, fmt.visible(label), enabled=self.progress_enabled)


def _no_driver(location: Location, exc: ModuleNotFoundError) -> RunstoreError:
    if exc.name == "runstore.postgres":
        return RunstoreError(f"{location.display} is a PostgreSQL store, but this installation "
                             "of runstore has no PostgreSQL backend (runstore.postgres); "
                             "upgrade runstore")
    return RunstoreError(f"{location.display} is a PostgreSQL store, which needs psycopg 3 "
                         f"(missing module {exc.name!r}): pip install 'runstore[postgres]'")


def _dumps(data: Any, *, indent: bool = False) -> str:
    return fmt.json_visible(
        orjson.dumps(data, option=orjson.OPT_INDENT_2 if indent else 0).decode())


def _json_array(items: Sequence[dict[str, Any]]) -> str:
    """One JSON array, one element per line (like ``export``): readable and greppable."""
    if not items:
        return "[]"
    return "[\n" + ",\n".join(_dumps(item) for item in items) + "\n]"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n:,} {word}s"


def _id_time(run_id: str) -> _dt.datetime | None:
    try:
        moment = _dt.datetime.strptime(run_id[:_ID_TIME_LEN], _ID_TIME_FORMAT)
    except ValueError:
        return None  # an imported id of another shape
    return moment.replace(tzinfo=_dt.UTC)


def _run_time(run: Run) -> _dt.datetime | None:
    """When a run started; for one never started, when it was created (its id says)."""
    return run.started_at or _id_time(run.id) or run.ended_at


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
        ctx.print(_json_array([codec.run_to_json(run) for run in runs]))
    elif runs:
        ctx.print_lines(_run_table(ctx, runs))
    else:
        ctx.print(empty)
    return EXIT_OK


# -- reading commands --------------------------------------------------------------------------

def _cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    if args.json and args.jsonl:
        raise UsageError("list takes --json or --jsonl, not both")
    filtered = any(v is not None for v in (args.machine, args.status, args.batch, args.since))
    with ctx.store(existing=True) as store:
        mode = "json" if args.json else "jsonl" if args.jsonl else ""
        empty = "no runs match" if filtered else "no runs"
        if args.since is None and isinstance(store, Store):  # --limit read from the end
            if mode:  # and no Run needed
                return _stream_json(ctx, store._iter_json(
                    machine=args.machine, status=args.status, batch_id=args.batch,
                    limit=args.limit), mode)
            return _stream_runs(ctx, store._runs(
                machine=args.machine, status=args.status, batch_id=args.batch,
                limit=args.limit), mode, empty)
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
    out, count = ctx.out, 0
    if mode:
        return _stream_json(ctx, (codec.run_to_json(run) for run in runs), mode)
    rows = ([run.id, run.machine, ctx.paint.status(run.status.value), run.test_dir_hash[:12],
             fmt.ago(run.started_at, ctx.now), _run_duration(run, ctx.now),
             "-" if run.exit_code is None else str(run.exit_code)] for run in runs)
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
    """``_stream_runs`` of runs as ``codec.run_to_json`` makes them: one JSON array
    (``mode`` "json") or JSON lines ("jsonl")."""
    out, count = ctx.out, 0
    lines = (_dumps(item) for item in items)
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
        ctx.print(_dumps(codec.run_to_json(run), indent=True))
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
    data["path"] = redact(stats.path)  # the backend leaves the password out; make sure
    data["runs"] = sum(stats.runs_by_status.values())
    if args.json:
        ctx.print(_dumps(data, indent=True))
        return EXIT_OK
    p = ctx.paint
    if where.postgres:
        where_lines = [
            ("database", fmt.visible(data["path"])),
            ("table size", f"{fmt.size(stats.file_size)} ({stats.file_size:,} bytes)"),
            ("rows", f"{stats.live_lines:,} runs, {stats.superseded_lines:,} retained changes"),
        ]
    else:
        where_lines = [
            ("file", fmt.visible(stats.path)),
            ("file size", f"{fmt.size(stats.file_size)} ({stats.file_size:,} bytes)"),
            ("lines", f"{stats.live_lines:,} live, {stats.superseded_lines:,} superseded"),
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


def _change_line(ctx: Context, change: Change) -> str:
    run = change.run
    when = change.time.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    status = ctx.paint.status(run.status.value) + " " * (11 - len(run.status.value))
    extra = []
    if run.exit_code is not None:
        extra.append(f"exit {run.exit_code}")
    if run.error_code:
        extra.append(fmt.visible(run.error_code))
    tail = f"  {', '.join(extra)}" if extra else ""
    return (f"{change.seq:>6}  {ctx.paint.dim(when)}  {change.type.value:<12}  {status}  "
            f"{fmt.visible(run.machine)}  {fmt.visible(run.id)}{tail}")


#: seconds of one ``watch()`` call of ``runstore watch`` on a file store: how soon it sees
#: that Ctrl-C asked it to stop
WATCH_SLICE = 0.1


class _Stop:
    """Set by Ctrl-C (SIGINT) while ``watch`` follows a file store."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def _interrupt_ends_watch(stop: _Stop) -> Iterator[None]:
    """While following, the first Ctrl-C only sets ``stop.requested``; the watch loop ends
    at its next change or within ``WATCH_SLICE``. A second one raises KeyboardInterrupt
    (a watch blocked writing to a full pipe). SIGINT's handler runs wherever the main
    thread is, and a KeyboardInterrupt raised inside a finalizer (the store drops a read
    descriptor in one each time it reads new changes) is printed as "Exception ignored"
    and swallowed, so the watch would go on; the flag leaves that to no place but ours."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum: int, frame: object) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _follow(store: RunStore, since: int | None, timeout: float | None, stop: _Stop,
            slice_seconds: float | None) -> Iterator[Change]:
    """``store.watch`` from ``since`` (None: from now; 0: from the oldest retained change)
    for ``timeout`` seconds (None: until ``stop``), in calls of ``slice_seconds`` (None: one
    call) so that ``stop`` is looked at even when nothing changes.

    ``since`` 0 asks for every retained change: when a compaction dropped the first ones,
    ``watch(0)`` raises ``HistoryTruncatedError`` before delivering any, and the follow
    starts again from the oldest retained change it names. A positive ``since`` older than
    that, or a follower that falls behind a compaction later, still raises it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seq = store.last_seq() if since is None else since
    delivered = False
    while not stop.requested:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        span = left if slice_seconds is None else (
            slice_seconds if left is None else min(slice_seconds, left))
        try:
            for change in store.watch(seq, timeout=span):
                seq, delivered = change.seq, True
                yield change
                if stop.requested:
                    return
        except HistoryTruncatedError as exc:
            if since != 0 or delivered:
                raise
            seq = exc.oldest_seq - 1
            continue
        if deadline is not None and time.monotonic() >= deadline:
            return


def _cmd_watch(ctx: Context, args: argparse.Namespace) -> int:
    stop = _Stop()
    # a PostgreSQL watch opens a listening connection per call: it is followed in one call,
    # and Ctrl-C interrupts it as a KeyboardInterrupt
    file_store = not ctx.location.postgres
    with ctx.store(existing=True) as store, (
            _interrupt_ends_watch(stop) if file_store else contextlib.nullcontext()):
        if not args.json and fmt.is_terminal(ctx.err):
            what = ctx.location.display if ctx.location.postgres else ctx.journal_path
            ctx.note(f"watching {what} (Ctrl-C to stop)")
        for change in _follow(store, args.since, args.timeout, stop,
                              WATCH_SLICE if file_store else None):
            if args.json:
                data = codec.change_to_json(change.seq, change.time, change.type, change.run)
                line = _dumps(data)
            else:
                line = _change_line(ctx, change)
            ctx.print(line)
            ctx.out.flush()
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


def _cmd_export(ctx: Context, args: argparse.Namespace) -> int:
    to_stdout = args.file in (None, "-")
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
    """Export through a temp file renamed over ``path``: a failed export leaves no half
    file, and an existing one is replaced whole or not at all."""
    return interchange.export_to_path(path, store.export)


# -- writing commands --------------------------------------------------------------------------

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


def _cmd_reap(ctx: Context, args: argparse.Namespace) -> int:
    with ctx.store(existing=False) as store:
        runs = store.reap(stale_after=args.stale_after, dry_run=args.dry_run)
    if args.json:
        ctx.print(_json_array([codec.run_to_json(run) for run in runs]))
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
        ctx.print(f"pruned {_plural(count, 'run')}, archived to {fmt.visible(args.archive)}")
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
            transitions.check_transition(args.run_id, before.status, target)
            after = before
    if args.json:
        ctx.print(_dumps(codec.run_to_json(after), indent=True))
    elif after.revision == before.revision:
        ctx.print(f"run {fmt.visible(after.id)} is already "
                  f"{ctx.paint.status(after.status.value)}; nothing changed")
    else:
        ctx.print(f"run {fmt.visible(after.id)}: {ctx.paint.status(before.status.value)} -> "
                  f"{ctx.paint.status(after.status.value)}")
    return EXIT_OK


def _cmd_stress(ctx: Context, args: argparse.Namespace) -> int:
    if (args.state_dir or args.store) and "--state-dir" not in args.args:
        ctx.note("runstore: note: stress makes a fresh temporary store unless you pass "
                 "`stress --state-dir DIR`; the global --state-dir/--store does not apply")
    try:
        stress = importlib.import_module("runstore.stress")
    except ModuleNotFoundError as exc:
        if exc.name != "runstore.stress":
            raise
        raise RunstoreError("the stress command is not available: this installation of "
                            "runstore has no runstore.stress module") from None
    return int(stress.main(list(args.args)))


def _cmd_migrate(ctx: Context, args: argparse.Namespace) -> int:
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
        report = migrate(src, dst, target_name=target.display, progress=step)
    if report.source_changed:
        ctx.note(f"runstore: warning: {source.display} changed while it was copied, so "
                 f"{target.display} may lack its latest changes; stop the dispatchers "
                 "that use it before migrating (a run changed since shows as a conflict "
                 "on the next migrate)")
    if args.json:
        ctx.print(_dumps(_migration_json(report, source, target), indent=True))
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


def _migration_json(report: MigrationReport, source: Location,
                    target: Location) -> dict[str, Any]:
    return {"source": source.display, "target": target.display, "ok": report.ok,
            "source_runs": report.source_runs, "copied": report.copied,
            "skipped": report.skipped, "target_runs": report.target_runs,
            "verified": report.verified, "checksum": f"sha256:{report.checksum}",
            "target_checksum": f"sha256:{report.target_checksum}",
            "source_changed": report.source_changed}


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
    if args.store and args.state_dir:
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
