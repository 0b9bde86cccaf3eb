"""The PostgreSQL schema of a ``PostgresStore`` and its migrations, versioned per table.

Every object is named after the store's table (``runs`` by default), so several stores, and
tests, can share one database::

    runs            one row per run: the ``Run`` fields, ``inserted`` (insertion order),
                    ``changed_at`` (time of the latest change, for reaping), ``extra`` (fields
                    this library does not know, kept from an import)
    runs_one_active the partial unique index: one pending/running run per machine, enforced
                    by PostgreSQL whoever writes (even raw SQL)
    runs_seq        the change feed's sequence (version 2; unused since version 3, kept)
    runs_changes    the retained changes: the writing transaction's id and the change's
                    order in it (xid, ord), its position ``seq`` once a follower has
                    assigned it (NULL before), the positions left out before it (skip),
                    time, change, and the run as the change left it, in columns named and
                    typed as the runs table's (version 4; a change written before keeps
                    it as JSON in ``run``) (see ``_pgfeed``)
    runs_feed       one row: ``compacted_through``, the greatest seq trimmed away
    runs_schema     one row per applied migration (version, applied_at)
    runs$name, runs$status, runs$revision, runs$change
                    the domains whose checks keep bad values out of those columns
                    (version 6): a non-empty id, machine and hash; a known status; a
                    revision of at least 1; a known change type

``Statements`` holds every query ``PostgresStore`` runs, rendered once per table.

``upgrade_schema`` brings a table to ``SCHEMA_VERSION`` in one transaction under an advisory
lock, so concurrent first opens from several hosts create it exactly once. Schemas written by
a newer runstore are refused instead of being used half-understood.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs
import psycopg
from psycopg import sql

from ._fields import RUN_FIELDS
from ._pgfeed import last_seq_sql
from .errors import CorruptStoreError, InvalidRunError
from .model import ChangeType, Status

#: the schema this runstore writes and understands
SCHEMA_VERSION = 6
#: a plain lower-case identifier, short enough that every derived name fits in 63 bytes
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")


def _quoted_list(values: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Literal(v) for v in values)


@attrs.frozen
class Names:
    """The identifiers of every object of one store, derived from its table name."""

    table: str

    @classmethod
    def of(cls, table: str) -> Names:
        """Validate ``table`` and return its names; ``InvalidRunError`` if it is not a plain
        identifier (names are never interpolated as text, but a strict rule keeps the
        derived names within PostgreSQL's 63-byte limit and free of surprises)."""
        if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
            raise InvalidRunError(
                f"table name {table!r} is not a plain identifier: use 1 to 40 lower-case "
                "letters, digits and underscores, not starting with a digit")
        return cls(table)

    def ident(self, suffix: str = "") -> sql.Identifier:
        """The identifier ``<table><suffix>``."""
        return sql.Identifier(self.table + suffix)

    @property
    def runs(self) -> sql.Identifier:
        return self.ident()

    @property
    def changes(self) -> sql.Identifier:
        return self.ident("_changes")

    @property
    def seq(self) -> sql.Identifier:
        return self.ident("_seq")

    @property
    def feed(self) -> sql.Identifier:
        return self.ident("_feed")

    @property
    def schema(self) -> sql.Identifier:
        return self.ident("_schema")

    def domain(self, kind: str) -> sql.Identifier:
        """The domain checking one kind of column (``name``: a non-empty text, ``status``,
        ``revision``, ``change``): ``<table>$<kind>`` (version 6; a ``$`` that no table
        name has, so that no store's objects take another's names)."""
        return self.ident(f"${kind}")

    @property
    def one_active(self) -> str:
        """The name of the partial unique index (as PostgreSQL reports it in errors)."""
        return self.table + "_one_active"

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel of the change feed."""
        return self.table + "_changes"


_ACTIVE = _quoted_list([Status.PENDING.value, Status.RUNNING.value])
_STATUSES = _quoted_list([s.value for s in Status])
_CHANGES = _quoted_list([c.value for c in ChangeType])


def _v1_runs(n: Names) -> list[sql.Composed]:
    """Version 1: the runs table, its one-active-run-per-machine index, the version table."""
    return [
        sql.SQL("""CREATE TABLE {schema} (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now())""").format(schema=n.schema),
        sql.SQL("""CREATE TABLE {runs} (
            id text COLLATE "C" PRIMARY KEY CHECK (id <> ''),
            inserted bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
            machine text NOT NULL CHECK (machine <> ''),
            test_dir text NOT NULL,
            test_dir_hash text NOT NULL CHECK (test_dir_hash <> ''),
            status text NOT NULL CHECK (status IN ({statuses})),
            exit_code bigint,
            started_at timestamptz,
            ended_at timestamptz,
            artifacts_path text NOT NULL DEFAULT '',
            logs_path text NOT NULL DEFAULT '',
            error_code text NOT NULL DEFAULT '',
            error_msg text NOT NULL DEFAULT '',
            batch_id text NOT NULL DEFAULT '',
            plan_entry text NOT NULL DEFAULT '',
            revision bigint NOT NULL CHECK (revision >= 1),
            owner_host text NOT NULL DEFAULT '',
            owner_pid bigint,
            owner_start text NOT NULL DEFAULT '',
            heartbeat_at timestamptz,
            changed_at timestamptz NOT NULL DEFAULT now(),
            extra jsonb)""").format(runs=n.runs, statuses=_STATUSES),
        sql.SQL("CREATE UNIQUE INDEX {name} ON {runs} (machine) WHERE status IN ({active})")
        .format(name=sql.Identifier(n.one_active), runs=n.runs, active=_ACTIVE),
        sql.SQL("CREATE INDEX {name} ON {runs} (machine, inserted)")
        .format(name=n.ident("_machine"), runs=n.runs),
        sql.SQL("CREATE INDEX {name} ON {runs} (batch_id, inserted) WHERE batch_id <> ''")
        .format(name=n.ident("_batch"), runs=n.runs),
    ]


def _v2_feed(n: Names) -> list[sql.Composed]:
    """Version 2: the change feed (sequence, retained changes, trim point)."""
    return [
        sql.SQL("CREATE SEQUENCE {seq} AS bigint").format(seq=n.seq),
        sql.SQL("""CREATE TABLE {changes} (
            seq bigint PRIMARY KEY,
            time timestamptz NOT NULL,
            change text NOT NULL CHECK (change IN ({kinds})),
            run jsonb NOT NULL)""").format(changes=n.changes, kinds=_CHANGES),
        sql.SQL("""CREATE TABLE {feed} (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            compacted_through bigint NOT NULL DEFAULT 0)""").format(feed=n.feed),
        sql.SQL("INSERT INTO {feed} DEFAULT VALUES").format(feed=n.feed),
    ]


def _v3_xid_feed(n: Names) -> list[sql.Composed]:
    """Version 3: changes are written without a table lock, stamped with their
    transaction's id and order in it; followers assign their ``seq`` (``_pgfeed``). Rows
    already there keep their seq."""
    return [
        sql.SQL("ALTER TABLE {changes} DROP CONSTRAINT {pkey}").format(
            changes=n.changes, pkey=n.ident("_changes_pkey")),
        sql.SQL("ALTER TABLE {changes} ALTER COLUMN seq DROP NOT NULL, "
                "ADD COLUMN xid xid8, ADD COLUMN ord integer NOT NULL DEFAULT 0, "
                "ADD COLUMN skip bigint NOT NULL DEFAULT 0").format(changes=n.changes),
        # numbered rows only: a write inserts no entry here, the numbering does
        sql.SQL("CREATE UNIQUE INDEX {name} ON {changes} (seq) WHERE seq IS NOT NULL").format(
            name=n.ident("_changes_seq"), changes=n.changes),
        sql.SQL("CREATE UNIQUE INDEX {name} ON {changes} (xid, ord) WHERE seq IS NULL")
        .format(name=n.ident("_changes_unplaced"), changes=n.changes),
    ]


#: the SQL type of each run column that is not ``text``
RUN_TYPES = {"exit_code": "bigint", "revision": "bigint", "owner_pid": "bigint",
             "started_at": "timestamptz", "ended_at": "timestamptz",
             "heartbeat_at": "timestamptz"}


def _v4_run_columns(n: Names) -> list[sql.Composed]:
    """Version 4: a change holds its run in columns like the runs table's, copied by the
    writing statement from the row it wrote, instead of a JSON object built from it (which
    cost a write statement about a fifth of its time, and doubled its WAL). Changes written
    before keep their JSON in ``run``, and are read from it."""
    columns = sql.SQL(", ").join(
        sql.SQL("ADD COLUMN {} {}").format(sql.Identifier(f), sql.SQL(RUN_TYPES.get(f, "text")))
        for f in RUN_FIELDS)
    return [sql.SQL("ALTER TABLE {changes} ALTER COLUMN run DROP NOT NULL, {columns}")
            .format(changes=n.changes, columns=columns)]


def _v5_kept_as_written(n: Names) -> list[sql.Composed]:
    """Version 5: a run's kept fields (``extra``) are ``json``, kept as written, instead of
    ``jsonb``, which normalised them: a float of 1e15 or more came back as an integer,
    ``-0.0`` as ``0.0``, and keys in another order than the file store keeps. Values stored
    before keep the form ``jsonb`` gave them. (Rewrites the table once, under the schema
    lock.)"""
    return [sql.SQL("ALTER TABLE {runs} ALTER COLUMN extra TYPE json USING extra::json")
            .format(runs=n.runs)]


def _drop_column_checks(table: sql.Identifier, name: str, columns: list[str]) -> sql.Composed:
    """Drop the one-column ``CHECK`` constraints version 1 gave ``columns`` of ``table``
    (named ``name``), whatever PostgreSQL named them: ``<name>_<column>_check``, or that
    with a number after it when another table of the schema had taken the name. Other
    checks (a user's own) stay."""
    return sql.SQL("""DO $$DECLARE c record; BEGIN
FOR c IN SELECT con.conname FROM pg_constraint con JOIN pg_attribute a
    ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]
  WHERE con.conrelid = {rel}::regclass AND con.contype = 'c'
    AND cardinality(con.conkey) = 1 AND a.attname = ANY(ARRAY[{columns}])
    AND con.conname ~ ('^' || {prefix} || a.attname || '_check[0-9]*$')
LOOP
  EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', {rel}::regclass, c.conname);
END LOOP; END$$""").format(
        rel=sql.Literal(table.as_string()), prefix=sql.Literal(name + "_"),
        columns=sql.SQL(", ").join(map(sql.Literal, columns)))


def _v6_domain_checks(n: Names) -> list[sql.Composed]:
    """Version 6: the checks of a run's columns (a non-empty id, machine and hash, a known
    status, a revision of at least 1) and of a change's type are those of domains instead
    of the tables' own ``CHECK`` constraints, with the same rules. PostgreSQL rebuilds a
    table's ``CHECK`` constraints from their stored text in every statement that writes
    the table (about a tenth of the server's time per write in the dispatcher cycle), but
    keeps a domain's checks built for the session, and checks a domain's value only where
    a statement writes one. (Rewrites both tables once, under the schema lock. Domains
    left by a store whose tables were dropped are replaced; one that a table still uses
    makes the upgrade fail, changing nothing.)"""
    runs, changes = n.runs, n.changes
    nonempty, status, revision, change = (
        n.domain("name"), n.domain("status"), n.domain("revision"), n.domain("change"))
    domains = [(nonempty, sql.SQL("text CHECK (VALUE <> '')")),
               (status, sql.SQL("text CHECK (VALUE IN ({}))").format(_STATUSES)),
               (revision, sql.SQL("bigint CHECK (VALUE >= 1)")),
               (change, sql.SQL("text CHECK (VALUE IN ({}))").format(_CHANGES))]
    return [
        *(sql.SQL("DROP DOMAIN IF EXISTS {}").format(name) for name, _ in domains),
        *(sql.SQL("CREATE DOMAIN {} AS {}").format(name, rule) for name, rule in domains),
        _drop_column_checks(runs, n.table,
                            ["id", "machine", "test_dir_hash", "status", "revision"]),
        _drop_column_checks(changes, n.table + "_changes", ["change"]),
        sql.SQL("ALTER TABLE {runs} ALTER COLUMN id TYPE {nonempty} COLLATE \"C\", "
                "ALTER COLUMN machine TYPE {nonempty}, "
                "ALTER COLUMN test_dir_hash TYPE {nonempty}, "
                "ALTER COLUMN status TYPE {status}, ALTER COLUMN revision TYPE {revision}"
                ).format(runs=runs, nonempty=nonempty, status=status, revision=revision),
        sql.SQL("ALTER TABLE {changes} ALTER COLUMN change TYPE {change}").format(
            changes=changes, change=change),
    ]


#: version -> the statements that bring version - 1 to it
MIGRATIONS: dict[int, Callable[[Names], list[sql.Composed]]] = {
    1: _v1_runs, 2: _v2_feed, 3: _v3_xid_feed, 4: _v4_run_columns, 5: _v5_kept_as_written,
    6: _v6_domain_checks}


def current_version(conn: psycopg.Connection[Any], names: Names) -> int:
    """The schema version of the table (0 when the store does not exist yet)."""
    qualified = names.schema.as_string(conn)
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [qualified]).fetchone()
    if row is None or not row[0]:
        return 0
    found = conn.execute(sql.SQL("SELECT coalesce(max(version), 0) FROM {}")
                         .format(names.schema)).fetchone()
    return int(found[0]) if found else 0


def _refuse_newer(version: int, names: Names, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise CorruptStoreError(
            f"{where} table {names.table}", None,
            f"schema version {version} is newer than this runstore understands "
            f"(version {SCHEMA_VERSION})",
            "upgrade runstore to use this store; nothing was changed")


def upgrade_schema(conn: psycopg.Connection[Any], table: str, where: str = "",
                   target: int = SCHEMA_VERSION) -> tuple[int, int]:
    """Bring ``table``'s schema to ``target`` (default: the latest) on an autocommit
    connection; return (version before, version after). Idempotent and safe to run from
    several processes at once: the steps run in one transaction under an advisory lock."""
    names = Names.of(table)
    before = current_version(conn, names)
    _refuse_newer(before, names, where)
    if before >= target:
        return before, before
    # Serialise concurrent creators: the second one waits, then finds the work done. A
    # session lock taken *before* the transaction: a transaction that waited for a lock
    # inside itself would keep reading the catalog as it was before the wait.
    key = f"runstore.schema.{names.table}"
    conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [key])
    try:
        with conn.transaction():
            before = current_version(conn, names)
            _refuse_newer(before, names, where)
            for version in range(before + 1, target + 1):
                for statement in MIGRATIONS[version](names):
                    conn.execute(statement)
                conn.execute(sql.SQL("INSERT INTO {} (version) VALUES (%s)")
                             .format(names.schema), [version])
    finally:
        if not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [key])
    return before, max(before, target)


def _render(template: str, **parts: sql.Composable) -> str:
    return sql.SQL(template).format(**parts).as_string()


def _columns(names: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, names))


class Statements:
    """Every statement of one store, rendered to text once: composing a statement on every
    call would cost more than the round trip. Run columns come in ``Run``'s field order."""

    def __init__(self, n: Names) -> None:
        fields = list(RUN_FIELDS)
        q = {"runs": n.runs, "changes": n.changes, "feed": n.feed, "cols": _columns(fields),
             "active": sql.SQL("status IN ({})").format(_ACTIVE)}
        self.select = _render("SELECT {cols} FROM {runs}", **q)
        sel = self.select
        self.get = f"{sel} WHERE id = %s"
        self.get_with_extra = _render("SELECT {cols}, extra FROM {runs} WHERE id = %s", **q)
        self.active = _render("SELECT {cols} FROM {runs} WHERE {active} ORDER BY inserted", **q)
        self.active_of = _render("SELECT {cols} FROM {runs} WHERE machine = %s AND {active} "
                                 "ORDER BY inserted LIMIT 1", **q)
        self.active_of_machines = _render(
            "SELECT machine, id FROM {runs} WHERE machine = ANY(%s) AND {active} "
            "ORDER BY inserted", **q)
        self.active_with_changed_at = _render(
            "SELECT {cols}, changed_at FROM {runs} WHERE {active} ORDER BY inserted", **q)
        self.terminal_with_extra = _render(
            "SELECT {cols}, extra FROM {runs} WHERE NOT {active} ORDER BY inserted", **q)
        self.all_with_extra = _render("SELECT {cols}, extra FROM {runs} ORDER BY inserted", **q)
        self.counts = _render(
            "SELECT status, machine, count(*) FROM {runs} GROUP BY status, machine", **q)
        self.sizes = _render(
            "SELECT pg_total_relation_size({runs_name}) + pg_total_relation_size({ch_name}), "
            "(SELECT count(*) FROM {changes}), ({last}), (SELECT compacted_through FROM {feed})",
            runs_name=sql.Literal(n.runs.as_string()), ch_name=sql.Literal(n.changes.as_string()),
            last=sql.SQL(last_seq_sql(n)), **q)

    def select_where(self, where: list[str]) -> str:
        """The run columns of the rows matching every condition, in insertion order."""
        cond = " WHERE " + " AND ".join(where) if where else ""
        return f"{self.select}{cond} ORDER BY inserted"
