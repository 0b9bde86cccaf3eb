"""The backends the contract tests run on: ``Backend("file", dir)`` and
``Backend("postgres", dsn, table)``, and whether PostgreSQL tests can run here.

A ``Backend`` names one store location and opens handles on it; it is picklable, so a forked
or spawned worker process can open its own handle on the same store.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import attrs

from runstore import RunStore, Store

#: the repository's root directory
ROOT = Path(__file__).resolve().parents[1]
#: set to 1 (``.ci/run`` does) to turn "PostgreSQL unavailable" from a skip into a failure
REQUIRE_ENV = "RUNSTORE_REQUIRE_POSTGRES"


@attrs.frozen
class Backend:
    """One store location: a state directory (``file``) or a DSN plus table (``postgres``)."""

    kind: str
    location: str
    table: str = ""

    def open(self, **options: Any) -> RunStore:
        """A new handle on this store (``durable=``, ``lock_timeout=``...)."""
        if self.kind == "file":
            return Store(self.location, **options)
        from runstore.postgres import PostgresStore

        return PostgresStore(self.location, table=self.table, **options)

    def sibling(self, name: str) -> Backend:
        """Another, empty store of the same kind (a second directory or table)."""
        if self.kind == "file":
            return attrs.evolve(self, location=f"{self.location}-{name}")
        return attrs.evolve(self, table=f"{self.table}_{name}")


def fresh_table() -> str:
    """A table name no other test uses, so tests share one server without interfering."""
    return f"runs_{uuid.uuid4().hex[:8]}"


def pg_server() -> Any:
    """The ``pg_server`` module (the throwaway PostgreSQL server beside this file)."""
    import pg_server

    return pg_server


def postgres_unavailable() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    try:
        import psycopg  # noqa: F401  (only checking that the driver is installed)
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        return f"the PostgreSQL driver is not installed ({exc}; pip install -e '.[test]')"
    if not pg_server().available():
        return ("no PostgreSQL server binaries (looked for /usr/lib/postgresql/*/bin/initdb; "
                "apt-get install postgresql, or set RUNSTORE_PG_BIN)")
    return None


def postgres_required() -> bool:
    """True when a missing PostgreSQL must fail the tests instead of skipping them."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")
