"""Compaction of a file store: rewrite the journal keeping only each run's latest version
and the last ``RETAIN_CHANGES`` changes, under the lock or, for a long file, mostly beside
it (``_compact_beside``: the base is written without the lock, what others append
meanwhile is copied in under it). The layout itself is ``compaction.plan``.
"""

from __future__ import annotations

import array
import collections
import itertools
import os
import zlib

import attrs

from . import (
    _codec,
    _compaction,
    _failpoints,
    _fields,
    _ids,
    _limits,
)
from ._fileopen import _Opening
from ._scan import Cursor
from ._statedir import COMPACTING_NAME
from ._view import decode_at
from .errors import (
    LockTimeoutError,
)
from .model import ChangeType

#: ``_Pruned.gone`` turned into the selectors of the kept runs
_KEPT = bytes([1]) + bytes(255)


@attrs.define
class _Pruned:
    """The runs a prune removes, as its compaction needs them: ``latest``, the offsets of
    every run's latest version in insertion order (``View.latest_offsets``), with ``gone``
    marking the positions of the pruned ones (a byte per run: no id is held), and the last
    ``RETAIN_CHANGES`` of them (offset and line, decoded when the compaction is laid out)
    in the order pruned, whose ``run_pruned`` lines the retained history keeps (earlier
    ones fall out of it)."""

    latest: array.array[int] = attrs.field(factory=lambda: array.array("q"))
    gone: bytearray = attrs.field(factory=bytearray)
    count: int = 0
    last: collections.deque[tuple[int, bytes]] = attrs.field(
        factory=lambda: collections.deque(maxlen=_limits.RETAIN_CHANGES))

    def add(self, position: int, offset: int, line: bytes) -> None:
        self.gone[position] = 1
        self.count += 1
        self.last.append((offset, line))


class _Compacting(_Opening):
    """Compaction (see the module's documentation)."""

    def _compaction_due(self) -> bool:
        """Whether the lines that are not a run's latest version exceed what the file may
        hold beyond its live runs."""
        live = self._view.live()
        # the greater of the two, as max() gives it, without its call
        least = _limits.COMPACT_MIN_SUPERSEDED
        beyond = least if live < least else live
        return self._view.lines - live > _limits.RETAIN_CHANGES + beyond

    def _compact(self, retain: int | None = None, pruned: _Pruned | None = None) -> None:
        """Rewrite the file now, the lock held (``compact()``, and after a failed sync):
        see ``compaction.plan``. ``pruned``: runs to leave out, their ``run_pruned``
        changes written into the retained history of the new file (``prune()``: one
        rename, so that a failure leaves the file as it was)."""
        self._before_writing()
        plan = self._plan_compaction(retain, pruned)
        _failpoints.hit("compact.before_rewrite")
        seq = plan.compacted_through + len(plan.history)
        try:
            self._journal.replace_with(plan.chunks(), lambda: self._vouch(
                zlib.crc32(plan.head[:-1]), plan.base_end, seq, "compaction"))
            if pruned is not None and pruned.count:
                # the plan holds no id index: open the new file as any process would, from
                # its base's summary (its runs indexed when a query needs them)
                self._load()
                self._unmarked_writes = False
                return
            self._view.header = self._journal.open()
        except BaseException:
            self._stale = True
            raise
        cur = self._view.cur
        assert cur is not None
        cur.next_seq = plan.compacted_through + 1 + len(plan.history)
        self._adopt(plan, {}, plan.base_end)
        self._unmarked_writes = False  # all this process wrote is in the synced new file

    def _plan_compaction(self, retain: int | None = None,
                         pruned: _Pruned | None = None) -> _compaction.Plan:
        """Lay out the compaction of the file as far as the view has read it, keeping the
        last ``retain`` changes verbatim for lagging watchers. ``pruned``: runs left out,
        laid out as if their ``run_pruned`` lines had been appended first
        (``compaction.with_tail``); the view is not changed. Only the lines the retained
        history can keep are encoded (``pruned.last``): the earlier ones take their seqs
        and are compacted away, so they are never read. ``retain`` is
        ``_limits.RETAIN_CHANGES`` unless given."""
        if pruned is None or not pruned.count:
            self._ensure_index()
        self._view.active.values()  # structure deferred records now: refuse a malformed one
        cur, header = self._view.cur, self._view.header
        assert cur is not None and header is not None
        j = self._journal
        read, index, next_seq = j.reader(), self._view.index, cur.next_seq
        recent = collections.deque(self._view.recent, maxlen=self._view.recent.maxlen)
        if pruned is not None and pruned.count:
            now, durable = _ids.utcnow(), max(self._synced, cur.durable)
            kept = array.array("q", itertools.compress(pruned.latest,
                                                       pruned.gone.translate(_KEPT)))
            active_at = set(self._view.active_at.values())
            active = [i for i, offset in enumerate(kept) if offset in active_at]
            lines = []
            at = cur.end
            next_seq += pruned.count - len(pruned.last)
            for offset, old in pruned.last:
                data = decode_at(j.path, offset, old)
                line = _codec.encode_record(next_seq, ChangeType.RUN_PRUNED, now, durable,
                                           self._run_of(data, offset),
                                           _fields.extra_fields(data) or None)
                recent.append(at)
                at += len(line)
                next_seq += 1
                lines.append(line)
            read = _compaction.with_tail(read, cur.end, b"".join(lines))
        if retain is None:
            retain = _limits.RETAIN_CHANGES
        history = list(recent)[len(recent) - retain:] if retain else []
        if pruned is not None and pruned.count:
            return _compaction.plan_lines(read, kept, active, history, store_id=header.store_id,
                                         created=header.created, next_seq=next_seq,
                                         max_id=self._view.max_id, old_end=cur.end,
                                         path=j.path)
        return _compaction.plan(read, index, self._view.active, history,
                               store_id=header.store_id, created=header.created,
                               next_seq=next_seq, max_id=self._view.max_id, old_end=cur.end,
                               path=j.path)

    def _adopt(self, plan: _compaction.Plan, tail: dict[int, int], end: int) -> None:
        """Point the view at the new file ``plan`` laid out (now in place, synced to
        ``end``); ``tail`` maps the lines copied after its base (old -> new offsets): the
        versions others wrote while it was being written, which the view has taken in."""
        index = plan.index
        if tail:
            old_end = plan.old_end
            for run_id, old in self._view.index.items():  # new runs go last, as in the view
                if old >= old_end:
                    index[run_id] = tail[old]
            if len(index) != len(self._view.index):  # runs pruned in those lines
                for run_id in [r for r in index if r not in self._view.index]:
                    del index[run_id]
        self._view.index = index
        self._view.active_at = {run_id: index[run_id] for run_id in self._view.active_at}
        self._view.recent = collections.deque([*plan.history, *tail.values()],
                                         maxlen=_limits.RETAIN_CHANGES)
        cur = self._view.cur
        assert cur is not None
        self._view.cur = Cursor(end=end, next_seq=cur.next_seq, durable=end,
                           latest_end=plan.latest_end, base_end=plan.base_end,
                           compacted_through=plan.compacted_through,
                           checkpoint_seq=plan.compacted_through + 1, vouched=end)
        self._synced = end
        self._view.lines = plan.lines + len(tail)

    def _compact_beside(self) -> None:
        """Automatic compaction without stopping other processes for it: with only the mutex
        held, write the compacted file as far as the view has read it to a temp file and
        sync it; then, under the flock again, copy what others appended meanwhile after it
        (``compaction.reseal_tail``) and rename it into place. Skipped when another process
        is doing it (its temp file is flocked), given up (a later write tries again) when the
        file was replaced meanwhile or the flock cannot be had in ``lock_timeout``, and on an
        I/O error (the caller logs it: the write that found compaction due was stored)."""
        j = self._journal
        if self._view.lines < self._compact_retry_at:
            return
        fd: int | None = j.claim_compaction_temp()
        if fd is None:  # another process is compacting: let it, and ask again later
            self._compact_retry_at = self._view.lines + _limits.COMPACT_RETRY_LINES
            return
        installed: tuple[_compaction.Plan, dict[int, int], int] | None = None
        try:
            plan = self._plan_compaction()
            _failpoints.hit("compact.before_rewrite")
            j.write_temp(fd, plan.chunks())
            try:
                self._lock.acquire_file(self.lock_timeout)
            except LockTimeoutError:
                return
            try:
                st = os.fstat(j.fd) if j.fd is not None else None
                if st is None or st.st_nlink == 0 or st.st_size < plan.old_end:
                    return  # replaced or cut meanwhile: the next operation reloads
                self._catch_up()
                cur = self._view.cur
                if (self._stale or self._view.lazy or cur is None or cur.end < plan.old_end
                        or self._torn is not None):  # the next write cuts it, and logs it
                    return
                self._view.active.values()  # structure what the catch-up deferred, as _plan does
                appended = b"".join(chunk for _, chunk in j.read_lines(plan.old_end, cur.end))
                tail, moves = _compaction.reseal_tail(appended, plan.old_end, plan.base_end,
                                                     plan.base_end, j.path, cur.legacy)
                installing, fd = fd, None
                self._stale = True  # until the view is adopted
                length, seq = plan.base_end + len(tail), cur.next_seq - 1
                j.install_temp(COMPACTING_NAME, installing, tail, lambda: self._vouch(
                    zlib.crc32(plan.head[:-1]), length, seq, "compaction"))
                self._view.header = j.open()
                installed = plan, moves, plan.base_end + len(tail)
            finally:
                self._lock.release_file()
        finally:
            if fd is not None:
                j.abandon_temp(COMPACTING_NAME, fd)
        if installed is not None:  # the view is this process's own: the mutex is enough
            self._adopt(*installed)
            self._stale = False
