"""``PostgresStore.import_runs`` inside its transaction: the records go through ``COPY``
into a temporary table, are checked by the server, then inserted with their changes.

No table lock is taken: the primary key refuses an id inserted concurrently and the partial
unique index a second active run of a machine (``InvalidRunError`` either way, nothing
imported). The changes are written as the write statements write theirs (``_pgfeed``):
stamped with this transaction's id, one per imported run in record order; only the last
``retain`` are written, the first of them saying how many positions were left out before it
(``skip``), and followers then find the history before it trimmed.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Json

from . import _fields
from .errors import InvalidRunError
from .model import ChangeType, Run

if TYPE_CHECKING:
    from ._pgbase import PostgresBase

_Conn = psycopg.Connection[Any]
_FIELDS = _fields.RUN_FIELDS


def kept_json(extra: dict[str, Any] | None) -> Json | None:
    """A run's kept fields as the ``json`` value to store (None when it has none): written
    by orjson as the file store writes them, and stored as written (schema version 5)."""
    return Json(extra, dumps=_dump) if extra else None


def _dump(value: Any) -> bytes:
    return orjson.dumps(value, option=_fields.DUMPS_OPTS)


def _columns_sql(names: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, names))


def stage(store: PostgresBase, conn: _Conn,
          records: Iterable[tuple[int, Run, dict[str, Any]]],
          on_conflict: Callable[[Run, Run], None] | None, retain: int) -> int:
    """In the caller's transaction: COPY ``records`` into a temporary table, refuse an
    id twice, an existing id (or, with ``on_conflict``, skip identical ones and call it
    for the first that differs) and a second non-terminal run on a machine, then insert
    the rest in record order and write their changes to the feed."""
    names, imp = store._names, sql.Identifier("runstore_import")
    where = store._where
    cols = _columns_sql([*_FIELDS, "extra"])
    conn.execute(sql.SQL(
        "CREATE TEMPORARY TABLE {imp} (n bigint NOT NULL, LIKE {runs}) ON COMMIT DROP")
        .format(imp=imp, runs=names.runs))
    conn.execute(sql.SQL("ALTER TABLE {imp} DROP COLUMN inserted, DROP COLUMN changed_at")
                 .format(imp=imp))
    with conn.cursor().copy(sql.SQL("COPY {imp} (n, {cols}) FROM STDIN")
                            .format(imp=imp, cols=cols)) as copy:
        for n, run, extra in records:
            values = _fields.converter.unstructure(run)
            values["status"] = run.status.value
            copy.write_row([n, *(values[f] for f in _FIELDS),
                            kept_json(extra)])
    conn.execute(sql.SQL("CREATE INDEX ON {imp} (id)").format(imp=imp))
    conn.execute(sql.SQL("ANALYZE {imp}").format(imp=imp))
    twice = conn.execute(sql.SQL(
        "SELECT max(n), id FROM {imp} GROUP BY id HAVING count(*) > 1 ORDER BY 1 LIMIT 1")
        .format(imp=imp)).fetchone()
    if twice is not None:
        raise InvalidRunError(f"record {twice[0]}: run {twice[1]!r} appears twice; "
                              "nothing was imported")
    same = sql.SQL(" AND ").join(
        sql.SQL("i.{f} IS NOT DISTINCT FROM r.{f}").format(f=sql.Identifier(f))
        for f in _FIELDS)
    refused = sql.SQL("TRUE") if on_conflict is None else sql.SQL("NOT ({})").format(same)
    found = conn.execute(sql.SQL(
        "SELECT i.n, i.id FROM {imp} i JOIN {runs} r USING (id) WHERE {refused} "
        "ORDER BY i.n LIMIT 1").format(refused=refused, imp=imp, runs=names.runs)
        ).fetchone()
    if found is not None:
        n, run_id = found
        if on_conflict is not None:
            new = conn.execute(sql.SQL("SELECT {cols} FROM {imp} WHERE id = %s").format(
                cols=_columns_sql(list(_FIELDS)), imp=imp), [run_id]).fetchone()
            assert new is not None
            on_conflict(store._get(conn, run_id), store._run(new))
        raise InvalidRunError(f"record {n}: run {run_id!r} already exists in "
                              f"{where}; nothing was imported")
    if on_conflict is not None:  # what is left in both is identical: skipped
        conn.execute(sql.SQL("DELETE FROM {imp} i USING {runs} r WHERE i.id = r.id")
                     .format(imp=imp, runs=names.runs))
    active = conn.execute(sql.SQL(
        "SELECT n, id, status, machine FROM {imp} WHERE status IN ('pending', 'running')"
        " ORDER BY n").format(imp=imp)).fetchall()
    busy = dict(conn.execute(store._sql.active_of_machines,
                             [sorted({row[3] for row in active})]).fetchall())
    for n, run_id, status, machine in active:
        if machine in busy:
            raise InvalidRunError(
                f"record {n}: run {run_id!r} is {status} on machine {machine!r}, which "
                f"already has the non-terminal run {busy[machine]!r}; nothing was "
                "imported")
        busy[machine] = run_id
    now = _dt.datetime.now(_dt.UTC)
    inserted = conn.execute(sql.SQL(
        "INSERT INTO {runs} ({cols}, changed_at, extra) "
        "SELECT {cols}, %s, extra FROM {imp} ORDER BY n")
        .format(runs=names.runs, cols=_columns_sql(list(_FIELDS)), imp=imp), [now])
    count = inserted.rowcount
    if count <= 0:
        return 0
    store._hit("before_feed", conn)
    conn.execute(sql.SQL(
        "INSERT INTO {changes} (xid, ord, skip, time, change, {run}) "
        "SELECT pg_current_xact_id(), k, CASE WHEN k = %(first)s THEN %(first)s - 1 ELSE 0 "
        "END, %(now)s, %(change)s, {run} FROM (SELECT row_number() OVER (ORDER BY n) AS k, "
        "{run} FROM {imp}) t WHERE k >= %(first)s")
        .format(changes=names.changes, imp=imp, run=_columns_sql(list(_FIELDS))),
        {"first": max(1, count - retain + 1), "now": now,
         "change": ChangeType.RUN_CREATED.value})
    return count
