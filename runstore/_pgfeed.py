"""The change feed of ``PostgresStore``: written without any table lock, numbered by its
followers.

**Writing.** Every write statement (``_pgsql``) appends its change rows in the same
statement as the run row, stamped with the writing transaction's id ``xid``
(``pg_current_xact_id()``) and the change's order ``ord`` within the statement; ``seq`` is
left NULL. Writers take no lock besides the run row's (and the partial unique index's for a
create), so their commits are never serialised: PostgreSQL batches their WAL flushes, and
throughput grows with the number of writers. No ``pg_notify`` either (it takes a
database-wide lock held until commit); watchers poll (``watch``).

**Numbering.** A follower (``changes``, ``last_seq``, ``watch``, ``stats``, ``compact``), and
every writer once per ``TRIM_EVERY`` writes unless another numbering is running then (it
numbers what the writer would have), runs the *sequencer* (``sequencer_sql``): in one
short transaction serialised by an advisory lock on the table, it gives the rows with no
``seq`` whose ``xid`` is below the horizon ``pg_snapshot_xmin(pg_current_snapshot())`` the
positions after the greatest assigned one, in ``(xid, ord)`` order, then trims the feed to
``RETAIN_CHANGES`` positions when it grew ``TRIM_EVERY`` past that. Followers read only
positioned rows, ``seq > since`` in ``seq`` order, so ``Change.seq`` is gap-free and
increasing, and ``changes(since)`` is resumed from any seq returned, as in the file store.

**Why no committed change is ever skipped or repeated.**

1. Positions only grow: the sequencers run one at a time (the advisory lock; the numbering
   statement starts after it is granted, so its snapshot sees every earlier sequencer's
   commit) and number from the greatest assigned position; one commits all its positions at
   once. Any snapshot therefore sees the positioned rows as one prefix 1..P of the feed (less
   what was trimmed, which ``HistoryTruncatedError`` reports), and a follower that has read
   up to P and asks for ``seq > P`` later gets exactly the rows positioned after it.
2. Every committed change row is positioned, once: a row is positioned only while it has no
   ``seq`` (the ``UPDATE`` re-checks ``seq IS NULL`` under the row lock), and once its
   transaction id is below the horizon of a sequencer's snapshot, that snapshot sees it
   (every transaction with an id below ``xmin`` had ended before the snapshot was taken, so
   it committed, and is visible, or aborted, and its rows never existed). The horizon moves
   past every finished transaction as soon as the transactions older than it end.
3. The order is stable and depends on no follower's timing: positions follow ``(xid, ord)``
   over the rows below the horizon, and no row with an id below a past horizon can appear
   later. The numbering commits as the store that runs it does (``durable``): a durable
   store's numbering is on disk before any follower reads it, and with it every change it
   numbered (the WAL is written in order); a numbering by a ``durable=False`` store that a
   server crash loses is redone on the same rows in the same order, the horizon having
   kept out every row whose transaction was still open. The order is per-run commit order:
   a change of a run is written by a statement that takes the run's advisory lock before
   its first write, and so before it gets its transaction id (``_pgsql``); it waited for
   the run's previous change to commit, so its id is greater.

**What it costs.** A durable follower that finds new changes waits for one WAL flush (shared
with concurrent commits); one that finds none writes nothing. A follower lags behind the
oldest transaction in the cluster that holds a transaction id (an open ``import_runs``, any
long writing transaction on the server): the feed shows nothing after it until it ends;
writers never wait for it. Feed order is transaction-id order (commit order per run). The
numbering is done by readers, so reading the feed writes to it (a follower needs write
access to the changes table).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (``_pgschema`` renders its statements with this module's)
    from ._pgschema import Names

#: the visibility horizon: every transaction with an id below it has ended (tests replace
#: it to show what is lost without it)
HORIZON = "pg_snapshot_xmin(pg_current_snapshot())"


def lock_key(n: Names) -> str:
    """The advisory lock the numberings of the table's feed take, one at a time."""
    return f"runstore.feed.{n.table}"


def sequencer_sql(n: Names, retain: int, trim_every: int) -> str:
    """The script numbering the changes below the horizon, then trimming the feed to the last
    ``retain`` positions when it has grown ``trim_every`` past that, waiting for the
    numbering lock. One round trip (a simple query: several statements, no parameters)."""
    return f"""BEGIN;
SELECT pg_advisory_xact_lock(hashtext('{lock_key(n)}'));
{numbering_sql(n, retain, trim_every)};
COMMIT"""


def numbering_sql(n: Names, retain: int, trim_every: int) -> str:
    """``sequencer_sql``'s numbering and trimming, to run in a transaction that holds the
    numbering lock (taken by an earlier statement, so that their snapshots see every
    earlier numbering)."""
    changes, feed = n.changes.as_string(), n.feed.as_string()
    return f"""WITH h AS (SELECT {HORIZON} AS x),
b AS (SELECT greatest((SELECT max(seq) FROM {changes}),
                      (SELECT compacted_through FROM {feed}), 0) AS base),
todo AS (SELECT c.xid, c.ord, b.base + sum(1 + c.skip) OVER (ORDER BY c.xid, c.ord) AS pos,
                c.skip
         FROM {changes} c, h, b WHERE c.seq IS NULL AND c.xid < h.x),
placed AS (UPDATE {changes} c SET seq = t.pos FROM todo t
           WHERE c.xid = t.xid AND c.ord = t.ord AND c.seq IS NULL RETURNING t.pos, t.skip)
UPDATE {feed} SET compacted_through = greatest(compacted_through, s.through)
FROM (SELECT max(pos - 1) AS through FROM placed WHERE skip > 0) s
WHERE s.through IS NOT NULL;
WITH t AS (SELECT greatest((SELECT max(seq) FROM {changes}) - {int(retain)},
                           (SELECT compacted_through FROM {feed})) AS through),
cut AS (UPDATE {feed} f SET compacted_through = t.through FROM t
        WHERE t.through - f.compacted_through >= {int(trim_every)}
           OR EXISTS (SELECT 1 FROM {changes} WHERE seq <= f.compacted_through)
        RETURNING f.compacted_through AS through)
DELETE FROM {changes} c USING cut WHERE c.seq <= cut.through"""


def read_sql(n: Names, run_columns: str) -> str:
    """The positioned changes after ``%s`` with the trim point (one row with NULLs when
    there are none): trim point, seq, time, change, the run as JSON (a change written
    before schema version 4) and ``run_columns`` (the run's columns of row ``c``)."""
    changes, feed = n.changes.as_string(), n.feed.as_string()
    return (f"SELECT f.compacted_through, c.seq, c.time, c.change, c.run, {run_columns} "
            f"FROM {feed} f LEFT JOIN {changes} c ON c.seq > %s ORDER BY c.seq")


def last_seq_sql(n: Names) -> str:
    """The greatest assigned position (or the trim point, or 0)."""
    changes, feed = n.changes.as_string(), n.feed.as_string()
    return (f"SELECT greatest((SELECT max(seq) FROM {changes}), "
            f"(SELECT compacted_through FROM {feed}), 0)")
