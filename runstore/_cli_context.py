"""The context every ``runstore`` command runs in: the exit codes and the one table from
errors to them, the errors the command line itself raises, which store the global options
and the environment name (through ``runstore._location``), and ``Context`` (the store, the
streams, colour and progress), plus the JSON helpers the commands share."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from . import _clifmt as fmt, _ids, _location, _opener
from ._location import Location, LocationError
from .errors import (
    CorruptStoreError,
    HistoryTruncatedError,
    LockTimeoutError,
    OutputTargetError,
    RunNotFoundError,
    RunstoreError,
    StoreNotFoundError,
    TableLockTimeoutError,
)
from .migrate import MigrationVerifyError
from .protocol import RunStore

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_LOCKED = 4
EXIT_DAMAGED = 5
EXIT_INTERRUPTED = 130

#: the table the CLI uses in a PostgreSQL database (``PostgresStore``'s default)
POSTGRES_TABLE = _location.DEFAULT_TABLE


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
    (StoreNotFoundError, EXIT_NOT_FOUND),
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
    """(directory, where it came from): ``--state-dir``, ``RUNSTORE_DIR`` or ``default``.
    An environment variable set to the empty string counts as unset; an empty option is a
    usage error."""
    if option is not None:
        if not option:
            raise UsageError("argument --state-dir: expected a directory, got ''")
        found, source = option, "--state-dir"
    elif os.environ.get("RUNSTORE_DIR"):
        found, source = os.environ["RUNSTORE_DIR"], "RUNSTORE_DIR"
    else:
        found, source = default_state_dir(), "default"
    return _utf8_location(os.path.abspath(os.path.expanduser(found)), source), source


def _utf8_location(target: str, source: str) -> str:
    """``target`` when it is UTF-8; else a usage error naming where it came from (a byte
    that is not arrives as a lone surrogate, and ``Store`` keeps to UTF-8 paths)."""
    try:
        target.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{source}: the store's directory {target!r} is not valid UTF-8; "
                         "runstore keeps its stores at UTF-8 paths") from None
    return target


def parse_location(text: str, source: str) -> Location:
    """A location as ``runstore.open`` understands it (``_location.parse``: a path,
    ``file://`` URL or ``postgresql://`` URL); ``UsageError`` (exit 2) for any other, and
    for a directory that is not UTF-8."""
    try:
        location = _location.parse(text, source)
    except LocationError as exc:
        raise UsageError(str(exc)) from None
    if not location.postgres:
        _utf8_location(location.target, source)
    return location


def resolve_location(store: str | None, state_dir: str | None) -> Location:
    """The store the global options and the environment name, first of: ``--store``,
    ``--state-dir`` (not both: a usage error), ``RUNSTORE_URL``, ``RUNSTORE_DIR``, default.
    An environment variable set to the empty string counts as unset."""
    if store is not None and state_dir is not None:
        raise UsageError("--store and --state-dir both name the store; pass only one")
    if store is not None:
        return parse_location(store, "--store")
    if state_dir is None and os.environ.get("RUNSTORE_URL"):
        return parse_location(os.environ["RUNSTORE_URL"], "RUNSTORE_URL")
    found, source = resolve_state_dir(state_dir)  # always a directory, never a URL
    return Location(found, source, False)


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
        self.now = _ids.utcnow()
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
        return _location.journal_file(self.state_dir)

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
        reason = _location.missing_store(where)
        if reason is not None:
            raise NoStoreError(where.target, reason)

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
            return _opener.open_store(location.target, lock_timeout=self.lock_timeout)
        except ModuleNotFoundError as exc:
            if not location.postgres:
                raise
            raise _no_driver(location, exc) from None

    def _postgres_store_exists(self, location: Location) -> bool:
        """Whether the database at ``location`` holds runstore's table (read-only check)."""
        try:
            return _location.missing_store(location, timeout=self.lock_timeout,
                                           table=POSTGRES_TABLE) is None
        except ModuleNotFoundError as exc:
            raise _no_driver(location, exc) from None

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


def is_stdout(ctx: Context, path: str) -> bool:
    """Whether ``path`` names the file stdout is open on (``/dev/stdout``, or the file it
    was redirected to), by device and inode."""
    try:
        out = os.fstat(ctx.out.fileno())
        there = os.stat(path)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: not a file
        return False
    return (out.st_dev, out.st_ino) == (there.st_dev, there.st_ino)
