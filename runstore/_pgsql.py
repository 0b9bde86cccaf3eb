"""The writing statements of ``PostgresStore``: each write of a run is ONE autocommit
statement that changes the run row and appends its change to the feed (a data-modifying
CTE), so a call is one round trip and holds its row lock only for that statement.

- ``create``: ``INSERT ... ON CONFLICT (machine) WHERE <active> DO NOTHING`` on the partial
  unique index (a concurrent creator of the machine's run wins, nobody waits for a table
  lock), refused when the second of the client's new id (its first ``ID_SECOND``
  characters) is earlier than the greatest stored id's (``max(id)``: one step of the primary
  key's index): an imported id from later, or a client clock behind the others. Ids made by
  concurrent creators within the same second are all accepted, in whatever order they
  commit. It answers (inserted?, greatest id).
- ``start``/``finish``/``beat``: the transition rule and the new values in the ``UPDATE``
  itself (``WHERE status = ...``); zero rows means the rule does not allow it (or no such
  run), and the caller then reads the run to raise the right error.
- ``write``: a run's next version decided by the client, over the version with revision
  ``expected`` only (the revision check); ``update()`` and the general read-decide-write path.
  A run's kept fields (``extra``) count towards its size as in the file store: the fast
  forms refuse (no row) when the kept fields might not fit beside the new values
  (``room``), and the read-decide-write path, which reads them, checks the record exactly.
- ``prune``: delete terminal runs and append their ``run_pruned`` changes.

**One writer of a run at a time, from before its transaction id.** Every statement that
changes an existing run first takes the run's advisory lock (``run_lock``), held to its
commit, before it writes anything: PostgreSQL gives a statement its transaction id at its
first write (``heap_update`` takes it before it looks at the row's lock), so without this a
statement could take its id, lose the row to a second writer that took a greater one, and
commit after it, which would put the run's changes out of order in the feed (ordered by
transaction id: ``_pgfeed``). With it, the next writer of a run waits for the previous one's
commit before its first write, so its transaction id is greater. A new run needs none:
nobody sees it before its insert commits.

The feed row is ``(xid, ord, time, change, <the run's columns>)``: the writing
transaction's id (assigned by the statement's first write), the change's order within the
statement, and the run as stored, copied from the row the statement wrote (``RETURNING``).
Its ``seq`` is assigned later by followers (``_pgfeed``).
"""

from __future__ import annotations

from psycopg import sql

from ._fields import RUN_FIELDS
from ._pgschema import RUN_TYPES, Names
from ._validate import INT64_MAX
from .model import ChangeType, Status

_ACTIVE = "status IN ('pending', 'running')"
#: the characters of a run id up to its second (``YYYYMMDDTHHMMSS``)
ID_SECOND = len("20260101T000000")
_FIELDS = list(RUN_FIELDS)
#: the text columns of a run, whose size decides whether its record fits
_TEXT = [f for f in _FIELDS if f not in RUN_TYPES]
#: a bound on a record's JSON bytes besides its text: keys, numbers, times, quotes
RECORD_OVERHEAD = 4096
#: the most JSON bytes one byte of text can take (a control character: ``\u00XX``)
ESCAPED = 6
#: how the change type of ``update()`` follows from the stored status (``old``) and the new
#: one (``transitions.change_type`` in SQL)
_CHANGE_OF_UPDATE = (
    "CASE WHEN u.old = %(status)s THEN 'run_updated' "
    "WHEN %(status)s = 'running' THEN 'run_started' "
    "WHEN %(status)s IN ({terminal}) THEN 'run_finished' ELSE 'run_updated' END").format(
    terminal=", ".join(f"'{s.value}'" for s in Status if s.is_terminal))


def run_lock(n: Names, id_sql: str) -> str:
    """The advisory lock of the run whose id ``id_sql`` gives (a transaction lock of the
    two-key form, which never meets the one-key locks of the feed and of ``prune``)."""
    key = sql.Literal(f"runstore.run.{n.table}").as_string()
    return f"pg_advisory_xact_lock(hashtext({key}), hashtext({id_sql}))"


def _cols(names: list[str], prefix: str = "") -> str:
    return ", ".join(prefix + sql.Identifier(n).as_string() for n in names)


def run_columns(alias: str = "") -> str:
    """The run columns (a feed row names them as a run's row does), of row ``alias`` if
    given."""
    return _cols(_FIELDS, f"{alias}." if alias else "")


COLUMNS = run_columns()


def _feed_insert(changes: str, source: str, change: str, time: str = "%(changed_at)s",
                 order: str = "0") -> str:
    """The feed rows of the runs ``source`` returned, with change ``change``."""
    return (f"INSERT INTO {changes} (xid, ord, time, change, {COLUMNS}) "
            f"SELECT pg_current_xact_id(), {order}, {time}, {change}, {COLUMNS} "
            f"FROM {source}")


class Writes:
    """The writing statements of one table, rendered once."""

    def __init__(self, n: Names) -> None:
        runs, changes = n.runs.as_string(), n.changes.as_string()
        cols = COLUMNS
        typed = ", ".join(f"%({f})s::{RUN_TYPES.get(f, 'text')}" for f in _FIELDS)
        # (every part of one statement sees one snapshot: the greatest id is read once)
        self.create = (
            f"WITH g AS (SELECT max(id) AS id FROM {runs}), "
            f"ins AS (INSERT INTO {runs} ({cols}, changed_at, extra) "
            f"SELECT {typed}, %(changed_at)s::timestamptz, %(extra)s::json FROM g "
            f"WHERE left(%(id)s::text, {ID_SECOND}) COLLATE \"C\" "
            f">= left(coalesce(g.id, ''), {ID_SECOND}) "
            f"ON CONFLICT (machine) WHERE {_ACTIVE} DO NOTHING "
            f"RETURNING {cols}), "
            f"f AS ({_feed_insert(changes, 'ins', repr(ChangeType.RUN_CREATED.value))}) "
            f"SELECT (SELECT count(*) FROM ins), g.id FROM g")
        size = " + ".join(f"octet_length(r.{sql.Identifier(f).as_string()})" for f in _TEXT)
        returning = f"RETURNING {run_columns('r')}"
        tail = f"SELECT {cols} FROM u"

        # the kept fields' JSON as stored, never shorter than in the record (orjson's)
        kept = "coalesce(octet_length(r.extra::text), 0)"

        def transition(sets: str, where: str, change: ChangeType) -> str:
            # the record certainly fits (``room``: the size limit less the overhead and
            # the new values): else no row, and the read-decide-write path checks it exactly
            return (f"WITH l AS (SELECT {run_lock(n, '%(id)s')}), "
                    f"u AS (UPDATE {runs} r SET {sets}, revision = r.revision + 1, "
                    f"changed_at = %(now)s FROM l WHERE r.id = %(id)s AND {where} "
                    f"AND r.revision < {INT64_MAX} "
                    f"AND {ESCAPED} * ({size}) + {kept} <= %(room)s {returning}), "
                    f"f AS ({_feed_insert(changes, 'u', repr(change.value), '%(now)s')}) "
                    f"{tail}")

        self.start = transition(
            "status = 'running', started_at = %(now)s, owner_host = %(host)s, "
            "owner_pid = %(pid)s, owner_start = %(since)s", "r.status = 'pending'",
            ChangeType.RUN_STARTED)
        self.finish = transition(
            "status = %(status)s, ended_at = %(now)s, exit_code = %(exit_code)s, "
            "error_code = %(error_code)s, error_msg = %(error_msg)s",
            "r.status = ANY(%(from)s)", ChangeType.RUN_FINISHED)
        self.beat = transition("heartbeat_at = %(now)s", f"r.{_ACTIVE}",
                               ChangeType.HEARTBEAT)
        settable = [f for f in _FIELDS if f != "id"] + ["changed_at"]
        values = ", ".join(f"%({f})s" for f in settable)
        # ``o`` is the version the statement's snapshot sees; when the revision matches,
        # it is the version being replaced, so its status is the old one
        change_of_update = f"coalesce(%(change)s, {_CHANGE_OF_UPDATE})"
        self.write = (
            f"WITH l AS (SELECT {run_lock(n, '%(id)s')}), "
            f"u AS (UPDATE {runs} r SET ({_cols(settable)}) = ({values}) "
            f"FROM l, (SELECT status FROM {runs} WHERE id = %(id)s) o "
            f"WHERE r.id = %(id)s AND r.revision = %(expected)s "
            f"AND r.status = ANY(%(from)s) AND r.machine = %(machine)s "
            f"AND r.test_dir_hash = %(test_dir_hash)s AND {kept} <= %(room)s "
            f"RETURNING {run_columns('r')}, o.status AS old), "
            f"f AS ({_feed_insert(changes, 'u', change_of_update)}) "
            f"SELECT old FROM u")
        pruned = _feed_insert(changes, "d", repr(ChangeType.RUN_PRUNED.value),
                              order="row_number() OVER (ORDER BY inserted)")
        # every run's lock before the first delete (the count needs all of ``l``)
        self.prune = (
            f"WITH l AS (SELECT {run_lock(n, 'x')} FROM unnest(%(ids)s::text[]) x), "
            f"d AS (DELETE FROM {runs} r USING (SELECT count(*) FROM l) k "
            f"WHERE r.id = ANY(%(ids)s) AND NOT r.{_ACTIVE} "
            f"RETURNING r.inserted, {run_columns('r')}), "
            f"f AS ({pruned}) "
            f"SELECT count(*) FROM d")
