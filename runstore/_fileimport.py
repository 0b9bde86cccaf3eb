"""Importing runs into a file store, all or nothing: a small import is one append like
any change; a larger one is staged through a temp file renamed over the journal, so no
append is ever too long to be cut as a torn write and no reader sees part of it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from . import (
    _codec,
    _fields,
    _ids,
    _limits,
)
from ._fileopen import Changes, Decision
from ._fileprune import _Pruning
from ._log import log_warning
from .errors import (
    InvalidRunError,
)
from .model import ChangeType, Run

_CREATED = ChangeType.RUN_CREATED.value


def _refuse_busy(n: int, run: Run, busy: dict[str, str]) -> None:
    """Refuse record ``n`` of an import when ``run`` is non-terminal on a machine that
    ``busy`` (machine -> its non-terminal run id) lists; else list it there."""
    if run.status.is_terminal:
        return
    if run.machine in busy:
        raise InvalidRunError(
            f"record {n}: run {run.id!r} is {run.status.value} on machine {run.machine!r}, "
            f"which already has the non-terminal run {busy[run.machine]!r}; nothing was "
            "imported")
    busy[run.machine] = run.id


class _Importing(_Pruning):
    """Importing (see the module's documentation)."""

    def _import_runs(self, records: Iterable[tuple[int, Run, dict[str, Any]]],
                     on_conflict: Callable[[Run, Run], None] | None = None) -> int:
        """``import_runs`` of validated (record number, run, extra fields). With
        ``on_conflict`` a run already stored with identical content is skipped, and
        ``on_conflict(stored, new)`` is called for one stored with other content: it must
        raise (``migrate``). Without it, an id already stored is refused.

        Up to ``_limits.SMALL_IMPORT`` records are appended in one write, like any change; a larger
        import is staged: the journal's bytes and the new lines are written to a temp file
        beside it, which is synced and renamed over the journal under the lock, so that
        until then no reader sees any of it and a failure (a bad record at the end, a full
        disk, a crash) leaves the journal as it was. The lock is held while it is staged:
        other writers wait for it (``lock_timeout``)."""
        it = iter(records)
        head: list[tuple[int, Run, dict[str, Any]]] = []
        size = 0
        for record in it:
            head.append(record)
            size += len(_fields.record_fields(record[1], record[2]))
            if len(head) > _limits.SMALL_IMPORT or size > _limits.SMALL_IMPORT_BYTES:
                return self._transact(lambda: self._stage_import(
                    itertools.chain(head, it), on_conflict))

        def decide() -> Decision[int]:
            self._ensure_index()  # every id, to refuse duplicates
            busy = {machine: peers[0] for machine, peers in self._view.machines.items()}
            seen: set[str] = set()
            new: Changes = []
            extras: dict[str, dict[str, Any]] = {}
            for n, run, extra in head:
                if run.id in seen:
                    raise InvalidRunError(f"record {n}: run {run.id!r} appears twice; "
                                          "nothing was imported")
                if self._skip_existing(n, run, on_conflict):
                    continue
                _refuse_busy(n, run, busy)
                seen.add(run.id)
                new.append((ChangeType.RUN_CREATED, run))
                if extra:
                    extras[run.id] = extra
            self._view.extras.update(extras)
            return len(new), new

        return self._transact(decide)

    def _skip_existing(self, n: int, run: Run,
                       on_conflict: Callable[[Run, Run], None] | None) -> bool:
        """For record ``n`` of an import: False when ``run``'s id is not stored; True when it
        is stored with identical content and ``on_conflict`` is given (skip it); otherwise
        refused (``InvalidRunError``, or what ``on_conflict`` raises)."""
        at = self._view.index.get(run.id)
        if at is None:
            return False
        if on_conflict is not None:
            stored = self._view.active.get(run.id) or self._run_at(at)
            if stored == run:
                return True
            on_conflict(stored, run)
        raise InvalidRunError(f"record {n}: run {run.id!r} already exists in "
                              f"{self._journal.path}; nothing was imported")

    def _stage_import(self, records: Iterable[tuple[int, Run, dict[str, Any]]],
                      on_conflict: Callable[[Run, Run], None] | None) -> Decision[int]:
        """Under the lock: write the journal's bytes and a line per imported run to a temp
        file, a megabyte at a time, sync it and rename it over the journal. The view takes
        each run in as its line is laid out (so that a later record is checked against it:
        an id twice, a second non-terminal run on a machine); on any failure the temp file
        is removed, the journal is left as it was and the view is rebuilt from it by the
        next call."""
        self._before_writing()
        self._ensure_index()
        j, cur, header = self._journal, self._view.cur, self._view.header
        assert cur is not None and header is not None
        start = offset = cur.end
        now, durable, seq = _ids.utcnow(), max(self._synced, cur.durable), cur.next_seq
        name, fd = j.new_temp()
        installing = False
        try:
            j.stage(fd, copy_to=start)
            lines: list[bytes] = []
            size = 0
            for n, run, extra in records:
                at = self._view.index.get(run.id)
                if at is not None and at >= start:
                    raise InvalidRunError(f"record {n}: run {run.id!r} appears twice; "
                                          "nothing was imported")
                if self._skip_existing(n, run, on_conflict):
                    continue
                peers = self._view.machines.get(run.machine)
                if not run.status.is_terminal and peers:
                    _refuse_busy(n, run, {run.machine: peers[0]})
                line = _codec.encode_record(seq, ChangeType.RUN_CREATED, now, durable, run,
                                           extra or None)
                if extra:
                    self._view.extras[run.id] = extra
                self._view.recent.append(offset)
                self._view.index_version(offset, run.id, None if run.status.is_terminal else run,
                                    now, _CREATED)
                lines.append(line)
                size += len(line)
                offset += len(line)
                seq += 1
                if size >= _limits.STAGE_CHUNK:
                    j.stage(fd, b"".join(lines))
                    lines, size = [], 0
            if seq == cur.next_seq:  # every run was already there: nothing to install
                j.abandon_temp(name, fd)
                return 0, []
            j.stage(fd, b"".join(lines), sync=True)
            installing = True
            j.install_temp(name, fd)
            self._view.header = j.open()
        except BaseException:
            self._stale = True  # the view took in runs that are not stored
            if not installing:
                j.abandon_temp(name, fd)
            raise
        count = seq - cur.next_seq
        cur.end, cur.next_seq = offset, seq
        self._synced = offset
        self._unmarked_writes = True
        # Recorded only now that the new file is in place: the header is the old one, so a
        # record of the new length made before the rename would speak of the old journal
        # too, which would then be refused as cut short if the rename failed. Until it is
        # written, the earlier record (a prefix of both files) still holds.
        try:
            self._vouch(header.crc, offset, seq - 1, "import")
            cur.vouched = offset
        except OSError as exc:
            log_warning("runstore: could not record in %s that %s is synced (%s); a later "
                        "cut of it will not be told from a torn write",
                        self._journal.lock_path, j.path, exc)
        return count, []
