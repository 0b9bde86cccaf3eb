"""``runstore.open(url_or_path)``: pick the backend from a location, so that moving from one
host to several is a change of URL, not of code.

- a filesystem path, or a ``file://`` URL -> ``Store`` (the JSON-lines journal)
- ``postgresql://`` or ``postgres://`` -> ``PostgresStore`` (needs ``runstore[postgres]``)
"""

from __future__ import annotations

import os
from typing import Any

from .errors import RunstoreError
from .protocol import RunStore

_PG_SCHEMES = ("postgresql", "postgres")


def is_postgres_url(location: str | os.PathLike[str]) -> bool:
    """True when ``location`` names a PostgreSQL database rather than a directory."""
    text = os.fspath(location)
    return text.split("://", 1)[0].lower() in _PG_SCHEMES if "://" in text else False


def open_store(location: str | os.PathLike[str], **options: Any) -> RunStore:
    """The store at ``location``; ``options`` go to the backend's constructor
    (e.g. ``durable=``, ``lock_timeout=`` for a file store, ``table=`` for PostgreSQL)."""
    text = os.fspath(location)
    if is_postgres_url(text):
        from .postgres import PostgresStore  # imports psycopg: only when asked for

        return PostgresStore(text, **options)
    if "://" in text:
        import urllib.parse  # only for URLs: keeps ``import runstore`` light

        parsed = urllib.parse.urlsplit(text)
        if parsed.scheme.lower() != "file":
            raise RunstoreError(
                f"unsupported store URL {text!r}: use a directory path, file:///path/to/dir "
                "or postgresql://user@host/dbname")
        if parsed.netloc not in ("", "localhost"):
            raise RunstoreError(f"file URL {text!r} names host {parsed.netloc!r}; "
                                "a file store must be on this host (use postgresql:// to share)")
        text = urllib.parse.unquote(parsed.path)
    from .store import Store

    return Store(text, **options)
