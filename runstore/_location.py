"""Where a store is: the one parser of store locations and the one hider of their passwords,
used by ``runstore.open``, ``PostgresStore`` (``safe_dsn``) and the command line alike.

A location is one of

- a directory path (``~`` expanded, made absolute) -> a file store;
- ``file:///path/to/dir`` or ``file://localhost/path/to/dir`` (percent-escapes decoded to
  bytes, then to a file name as ``os.fsdecode`` does) -> a file store;
- ``postgresql://...`` or ``postgres://...`` (any case) -> a PostgreSQL store, passed to
  libpq as written.

``parse`` refuses anything else with ``LocationError`` (a ``RunstoreError``): an empty
location, another URL scheme, a ``file`` URL that names another host, no directory, a query,
a fragment or a NUL byte (``%00``), a URL that does not parse. No message, and no
``Location.display``, holds the password the location was written with (``redact``).

The file store's directory layout and the PostgreSQL schema stay private to their backends:
``journal_file`` and ``missing_store`` are what a caller (the command
line) asks of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from .errors import RunstoreError

if TYPE_CHECKING:
    pass

_PG_SCHEMES = ("postgresql", "postgres")
#: the table a PostgreSQL store uses unless told otherwise (``PostgresStore``'s default)
DEFAULT_TABLE = "runs"
#: what every refusal suggests instead
ACCEPTED = "use a directory path, file:///path/to/dir or postgresql://user@host/dbname"


class LocationError(RunstoreError, ValueError):
    """A store location that names no store this library can open; the message names where
    it came from (``source``), shows it without its password and says what is accepted."""

    def __init__(self, message: str, source: str = "") -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class Location(NamedTuple):
    """Where a store is: ``target`` is an absolute directory or a PostgreSQL URL (passed to
    the backend as it is); ``source`` is what named it (an option, a variable, or empty)."""

    target: str
    source: str
    postgres: bool

    @property
    def display(self) -> str:
        """``target`` fit to print: its password replaced by ``***``."""
        return redact(self.target)

    @property
    def backend(self) -> str:
        """``"postgresql"`` or ``"file"``."""
        return "postgresql" if self.postgres else "file"


def is_postgres_url(location: str | os.PathLike[str]) -> bool:
    """True when ``location`` names a PostgreSQL database rather than a directory."""
    text = os.fspath(location)
    return text.split("://", 1)[0].lower() in _PG_SCHEMES if "://" in text else False


def parse(location: str | os.PathLike[str], source: str = "") -> Location:
    """The store ``location`` names (see the module docstring for the accepted forms);
    ``LocationError``, prefixed by ``source`` when given, for any other."""
    text = os.fspath(location)
    if not text:
        raise LocationError(f"the store location is empty; {ACCEPTED}", source)
    if is_postgres_url(text):
        return Location(text, source, True)
    if "://" in text:
        text = _file_url_path(text, source)
    elif _has_nul(text):
        raise LocationError(f"the directory {text!r} holds a NUL character, which no file "
                            f"name can hold; {ACCEPTED}", source)
    return Location(os.path.abspath(os.path.expanduser(text)), source, False)


def _has_nul(path: str) -> bool:
    """True when ``path`` holds a NUL character, which no file name can hold (the system
    calls would refuse it with ``ValueError``)."""
    return "\x00" in path


def _file_url_path(text: str, source: str) -> str:
    """The directory a ``file://`` URL names."""
    import urllib.parse  # only for URLs: keeps ``import runstore`` light

    shown = redact(text)
    try:
        parsed = urllib.parse.urlsplit(text)
    except ValueError as exc:
        raise LocationError(f"{shown!r} is not a valid URL ({exc}); {ACCEPTED}", source) from None
    if parsed.scheme.lower() != "file":
        raise LocationError(f"unsupported store URL {shown!r} (scheme {parsed.scheme!r}); "
                            f"{ACCEPTED}", source)
    host = parsed.netloc.rpartition("@")[2]  # never the user info, which may hold a password
    if parsed.netloc not in ("", "localhost"):
        raise LocationError(f"file URL {shown!r} names host {host!r}; a file store must be on "
                            "this host (use postgresql://... to share one between hosts)",
                            source)
    if parsed.query or parsed.fragment or text.endswith(("?", "#")):
        raise LocationError(f"file URL {shown!r} has a query or a fragment, which name no "
                            "directory; percent-encode '?' and '#' in the path "
                            "(file:///path/to/dir)", source)
    # percent-escapes are bytes of the file name, decoded as the file system does: every
    # byte round-trips (``%ff`` is byte 0xff, never U+FFFD)
    path = os.fsdecode(urllib.parse.unquote_to_bytes(parsed.path))
    if not path:
        raise LocationError("file URL names no directory; use file:///path/to/dir", source)
    if _has_nul(path):
        raise LocationError(f"file URL {shown!r} holds a NUL byte (%00), which no file name can "
                            "hold; use file:///path/to/dir", source)
    return path


# -- passwords ---------------------------------------------------------------------------------

#: a URL's user info, as libpq reads it: up to the first '@' before any '/'
_USERINFO_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@]*):([^@/]*)@", re.IGNORECASE)
#: a ``password=`` query parameter of a URL
_URL_PASSWORD = re.compile(r"(?i)([?&]password=)([^&#]*)")
#: a ``password`` key of a libpq key/value DSN: quoted ('...', backslash escapes, to the end
#: when the quote is never closed) or a run of non-blanks (backslash escapes a blank)
_DSN_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|(?:[^\s\\]|\\.)+)")
_DSN_ESCAPE = re.compile(r"\\(.)")


def redact(location: str) -> str:
    """``location`` without its password (in the user info of a URL, a ``password=`` query
    parameter or a ``password=`` key of a libpq key/value DSN), replaced by ``***``;
    everything else as written."""
    if "://" in location:
        text = _USERINFO_PASSWORD.sub(r"\1:***@", location)
        return _URL_PASSWORD.sub(r"\1***", text)
    return _DSN_PASSWORD.sub(r"\1***", location)


def passwords_in(location: str | None) -> list[str]:
    """The passwords written in ``location``, as written and as decoded (to scrub them from
    any message, e.g. a driver's)."""
    if not location:
        return []
    found: list[str] = []
    if "://" in location:
        import urllib.parse

        userinfo = _USERINFO_PASSWORD.match(location)
        raw = [userinfo.group(2)] if userinfo else []
        raw += [m.group(2) for m in _URL_PASSWORD.finditer(location)]
        for secret in raw:
            found += [secret, urllib.parse.unquote(secret), urllib.parse.unquote_plus(secret)]
    else:
        for m in _DSN_PASSWORD.finditer(location):
            value = m.group(2)
            if value.startswith("'"):
                value = value[1:-1] if value.endswith("'") and len(value) > 1 else value[1:]
            found += [m.group(2), value, _DSN_ESCAPE.sub(r"\1", value)]
    return list(dict.fromkeys(p for p in found if p))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every one of ``secrets`` replaced by ``***``."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# -- asking the backends -----------------------------------------------------------------------

def journal_file(directory: str) -> str:
    """The journal file of the file store in ``directory``."""
    from ._statedir import DATA_NAME

    return os.path.join(directory, DATA_NAME)


def missing_store(location: Location, *, timeout: float = 30.0,
                  table: str = DEFAULT_TABLE) -> str | None:
    """Why ``location`` holds no store (a sentence), or None when it holds one; never
    creates anything (opening a store would). For PostgreSQL this connects (giving up after
    ``timeout`` seconds) and looks for ``table``'s schema: ``ModuleNotFoundError`` when
    psycopg is not installed."""
    if location.postgres:
        return None if _postgres_schema_version(location.target, timeout, table) > 0 else (
            f"the database holds no runstore table {table!r}")
    directory = location.target
    if not os.path.exists(directory):
        return "the directory does not exist"
    if not os.path.isdir(directory):
        return "it is not a directory"
    path = journal_file(directory)
    if not os.path.lexists(path):
        return f"the directory holds no {os.path.basename(path)}"
    return None


def _postgres_schema_version(dsn: str, timeout: float, table: str) -> int:
    import psycopg

    from . import _pgschema

    with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, round(timeout)),
                         application_name="runstore-cli") as conn:
        return _pgschema.current_version(conn, _pgschema.Names.of(table))
