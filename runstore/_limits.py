"""The file store's sizes and thresholds, in one place.

Each is read where it is used, as ``_limits.NAME``, when it is used: a test that sets one
here (to compact after a few lines, say) changes it for every part of the store.
"""

from __future__ import annotations

from ._base import RETAIN_CHANGES
from .errors import IOKind

__all__ = ["RETAIN_CHANGES"]

#: automatic compaction runs when the lines that are not a run's latest version exceed
#: RETAIN_CHANGES + max(COMPACT_MIN_SUPERSEDED, live runs): the file stays within twice its
#: live size plus about 5,000 lines
COMPACT_MIN_SUPERSEDED = 1024
#: a checkpoint line goes before the first record written after this many records since
#: the last one (or the base): opening reads from the last checkpoint, not the whole tail
CHECKPOINT_EVERY = 1024
#: lines a process waits for before it tries again to compact when another one was at it
COMPACT_RETRY_LINES = 256
#: the most bytes appended since the view was brought up to date that a read looks through
#: for the run it is about before answering without the flock (``_current_for``)
UNREAD_LIMIT = 64 * 1024
#: how long a read waits for the flock before it catches up without it (``_read``)
READ_LOCK_WAIT = 0.25
#: how much of a damaged line is read again to see whether it was only being written
READ_AGAIN = 2 * 1024 * 1024
#: the most records, and bytes of run fields, an import appends in one write; a larger
#: one is staged through a temp file renamed over the journal (``_stage_import``), so that
#: no append is ever too long to be cut as a torn write (``TORN_TAIL_LIMIT``)
SMALL_IMPORT = 4096
SMALL_IMPORT_BYTES = 16 * 1024 * 1024
#: how much of a staged import is written at a time
STAGE_CHUNK = 1 << 20
#: the failures after which the file is rewritten before the next write (``_resync``)
RESYNC_KINDS = frozenset({IOKind.SYNC, IOKind.RECOVER, IOKind.SYNC_DIR})
