"""``runstore.open(url_or_path)``: pick the backend from a location, so that moving from one
host to several is a change of URL, not of code.

- a filesystem path, or a ``file://`` URL -> ``Store`` (the JSON-lines journal)
- ``postgresql://`` or ``postgres://`` -> ``PostgresStore`` (needs ``runstore[postgres]``)

The forms accepted and refused are those of ``runstore._location.parse``, which the command
line uses too: anything else raises ``RunstoreError`` (``LocationError``) without echoing a
password.
"""

from __future__ import annotations

import os
from typing import Any

from ._location import is_postgres_url, parse
from .protocol import RunStore

__all__ = ["is_postgres_url", "open_store"]


def open_store(location: str | os.PathLike[str], **options: Any) -> RunStore:
    """The store at ``location``; ``options`` go to the backend's constructor
    (e.g. ``durable=``, ``lock_timeout=`` for a file store, ``table=`` for PostgreSQL)."""
    where = parse(location)
    if where.postgres:
        from .postgres import PostgresStore  # imports psycopg: only when asked for

        return PostgresStore(where.target, **options)
    from .store import Store

    return Store(where.target, **options)
