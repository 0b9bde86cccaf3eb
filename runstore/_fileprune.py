"""Pruning a file store: remove terminal runs by age or count in one rewrite of the
journal (a compaction that leaves them out, their ``run_pruned`` changes in its retained
history), after appending them durably to an archive when asked; a failure says what became
of the runs and of the archive.
"""

from __future__ import annotations

import array
import collections
import contextlib
import datetime as _dt
import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any

from . import (
    _failpoints,
    _fields,
    _gather,
    _ids,
    _interchange,
    _retention,
    _sound,
)
from ._filecompact import _Pruned
from ._fileopen import Decision
from ._filewrite import _Writing
from ._statedir import DATA_NAME
from ._view import decode_at
from .errors import (
    IOKind,
    RunstoreError,
    StoreIOError,
)


class _Pruning(_Writing):
    """Pruning (see the module's documentation)."""

    def _prune(self, older_than: _dt.timedelta | None, keep_last: int | None,
               archive: str | os.PathLike[str] | None, dry_run: bool) -> int:
        """One step: the journal is rewritten without them (their ``run_pruned`` changes in
        its retained history, for watchers) through a temp file renamed into place, so a
        failure (a full disk, a read-only directory) leaves the store as it was and raises
        ``StoreIOError`` saying that nothing was pruned; it needs no more free space than
        the smaller file. The archive is written (and synced) first; after a failure it is
        cut back to what it held before, and when even that fails the error says that it
        holds the runs, which a retry then appends again."""

        def decide() -> Decision[int]:
            pruned = _Pruned()
            chosen = self._doomed(older_than, keep_last, pruned)
            if dry_run:
                return sum(1 for _ in chosen), []
            first = next(chosen, None)
            if first is None:
                return 0, []
            chosen = itertools.chain((first,), chosen)

            def taken() -> Iterator[tuple[int, dict[str, Any] | bytes]]:
                for position, offset, line, data in chosen:
                    pruned.add(position, offset, line)
                    yield offset, data

            j = self._journal
            assert j.fd is not None
            st = os.fstat(j.fd)
            archived = -1  # the archive's size before, once the runs are in it
            try:
                if archive is not None:
                    archived = _interchange.append_archive_items(os.fspath(archive), (
                        data if isinstance(data, bytes) else  # made from a sound line
                        _interchange.export_item(data, functools.partial(self._run_of, data,
                                                                        offset))
                        for offset, data in taken()))
                    _failpoints.hit("prune.after_archive")
                else:
                    collections.deque(taken(), maxlen=0)
                self._compact(pruned=pruned)
            except StoreIOError as exc:
                count = pruned.count  # the runs taken so far, and those not yet taken:
                if exc.kind is IOKind.ARCHIVE:  # an archive that failed stops the taking
                    with contextlib.suppress(RunstoreError, OSError):
                        count += sum(1 for _ in chosen)
                raise self._prune_failed(exc, count, archive, archived,
                                         (st.st_dev, st.st_ino)) from None
            return pruned.count, []

        return self._transact(decide)

    def _doomed(self, older_than: _dt.timedelta | None, keep_last: int | None,
                pruned: _Pruned) -> Iterator[tuple[int, int, bytes, dict[str, Any] | bytes]]:
        """(position in insertion order, offset, line, record) of the runs ``prune()``
        removes (``retention``'s rule), in insertion order, read from the file as the
        iteration goes; with ``keep_last``, a line ``_sound.sound_export`` proves sound
        comes with the run as ``export`` writes it (bytes) instead of its record. Only
        offsets are held, never the runs nor their ids: ``pruned.latest`` gets the offset
        of every run's latest version (``View.latest_offsets``; the view stays lazy) and
        ``pruned.gone`` a byte per run. The terminal runs are those whose latest
        versions are not a non-terminal run's, so ``keep_last`` picks its runs without
        reading any (a record is made a ``Run`` only to judge ``older_than``)."""
        self._take_held()
        latest = pruned.latest = self._view.latest_offsets(self._journal)
        pruned.gone = bytearray(len(latest))
        active = set(self._view.active_at.values())
        if keep_last is not None:
            count = max(len(latest) - len(active) - keep_last, 0)
            now: _dt.datetime | None = None
        else:
            count = len(latest)
            now = _ids.utcnow()
        positions = array.array("q")
        for position, offset in enumerate(latest):
            if len(positions) >= count:
                break
            if offset not in active:
                positions.append(position)
        j = self._journal
        offsets = array.array("q", (latest[p] for p in positions))
        lines = _gather.lines(j.reader(), offsets, j.path)
        for position, offset, line in zip(positions, offsets, lines, strict=True):
            if now is None and (proven := _sound.sound_export(line)) is not None:
                yield position, offset, line, proven[1]
                continue
            data = decode_at(self._journal.path, offset, line)
            if now is not None and older_than is not None:
                if not _retention.ended_before(self._run_of(data, offset), now, older_than):
                    continue
            elif not _fields.fields_sound(data):
                self._run_of(data, offset)  # refuses a malformed record, as listing does
            yield position, offset, line, data

    def _prune_failed(self, exc: StoreIOError, count: int,
                      archive: str | os.PathLike[str] | None, archived: int,
                      old: tuple[int, int]) -> StoreIOError:
        """``exc`` (a failed prune of ``count`` runs) saying what became of them: nothing
        was pruned unless the new file had been renamed over the journal ``old`` (device,
        inode); then the archive (its size before: ``archived``) is cut back."""
        runs = f"{count} run{'s' if count != 1 else ''}"
        replaced = False
        with contextlib.suppress(OSError):
            now = os.lstat(DATA_NAME, dir_fd=self._journal.dir_fd)
            replaced = (now.st_dev, now.st_ino) != old
        if replaced and exc.kind is IOKind.SYNC_DIR:
            outcome = (f"the {runs} were pruned, but a power loss may bring them back (the "
                       "directory could not be synced); run `compact` once the disk is "
                       "healthy")
        elif replaced:
            outcome = (f"the {runs} were pruned (the rewritten journal is in place), but it "
                       "could not be reopened; the next call reopens it")
        else:
            were = "was" if count == 1 else "were"
            outcome = f"nothing was pruned ({runs} {were} to be removed; the journal is as it was"
            if exc.kind is IOKind.ARCHIVE:
                outcome += "); fix the archive's path or free space, then retry"
            else:
                if archive is not None and archived >= 0:
                    if _interchange.cut_archive(os.fspath(archive), archived):
                        outcome += ", and so is the archive"
                    else:
                        outcome += ", but the archive holds them too: a retry appends them again"
                outcome += "); free space or fix the directory's permissions, then retry"
        return StoreIOError(exc.path, exc.action, exc.cause, exc.kind, outcome)
