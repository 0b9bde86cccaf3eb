"""``View``: what a file store keeps in memory about its journal, and how a line changes it.

The view keeps what queries need and no more: the offset of every run's latest version, the
non-terminal runs themselves (by id and by machine), and counters. Terminal runs are read
back from the file on demand, so the cost of an operation does not grow with the history.

A store opened from a compaction's summary does not index the compacted base until a query
needs every run (``lazy``): ``index`` then holds only the runs written after the base, the
live count is kept from the summary and the changes since, and ``ensure_index`` reads the
base (checked against the summary's CRC-32) when it is needed.
"""

from __future__ import annotations

import array
import collections
import datetime as _dt
import itertools
import zlib
from typing import Any

from . import _codec, _fields
from ._active import ActiveRuns
from ._base import RETAIN_CHANGES
from ._journal import Journal
from ._scan import Cursor, Header, cursor_after_header, scan
from .errors import CorruptStoreError
from .model import ChangeType, Run, Status

_ACTIVE = frozenset({Status.PENDING.value, Status.RUNNING.value})
_CREATED = ChangeType.RUN_CREATED.value
_PRUNED = ChangeType.RUN_PRUNED.value


class View:
    """The in-memory view of one journal file (``path`` names it in errors), keeping the
    offsets of its last ``retain`` changes."""

    def __init__(self, path: str, retain: int = RETAIN_CHANGES) -> None:
        self.path = path
        self.retain = retain
        self.header: Header | None = None
        self.cur: Cursor | None = None
        self.index: dict[str, int] = {}  # id -> offset of its latest version (insertion order)
        self.active = ActiveRuns(path)  # the non-terminal runs
        self.machines: dict[str, list[str]] = {}  # machine -> its non-terminal run ids
        self.extras: dict[str, dict[str, Any]] = {}  # fields we do not know, per run id
        self.max_id = ""
        self.lines = 0  # record lines in the file
        #: the offsets of the latest changes, for a follower (``changes``)
        self.recent: collections.deque[int] = collections.deque(maxlen=retain)
        self.changed_at: dict[str, _dt.datetime] = {}  # non-terminal id -> its last change
        #: non-terminal id -> the offset of its latest version, in insertion order (what a
        #: checkpoint line lists)
        self.active_at: dict[str, int] = {}
        self.lazy = False  # the base is not indexed yet (``ensure_index``)
        self.base_count = 0  # runs in the part not indexed yet
        self.tail_created = 0  # runs created after it
        self.tail_pruned: set[str] = set()  # runs pruned after it
        #: with ``lazy``, when opening began at a checkpoint: its offset and what it says
        #: (the lines between the base and it are indexed with the base)
        self.opened_at: tuple[int, _codec.Checkpoint] | None = None

    def live(self) -> int:
        """How many runs the store holds."""
        if self.lazy:
            return self.base_count + self.tail_created - len(self.tail_pruned)
        return len(self.index)

    def active_of(self, machine: str) -> Run | None:
        """The earliest-inserted non-terminal run of ``machine``, or None."""
        peers = self.machines.get(machine)
        return self.active[peers[0]] if peers else None

    def index_version(self, offset: int, run_id: str, active: Run | dict[str, Any] | None,
                      changed_at: _dt.datetime | None, change: str) -> None:
        """Record that the latest version of ``run_id`` is at ``offset``; ``active`` is the
        run (or its record, structured when first read) when it is non-terminal, else None;
        a ``run_pruned`` change drops the run."""
        self.lines += 1
        pruned = change == _PRUNED
        if self.lazy:
            if change == _CREATED:  # a new id (create and import refuse existing ones)
                self.tail_created += 1
            elif pruned:
                self.tail_pruned.add(run_id)
        if run_id > self.max_id:
            self.max_id = run_id
        if pruned:
            self.index.pop(run_id, None)
            self.extras.pop(run_id, None)
        else:
            self.index[run_id] = offset
        before = self.active.machine(run_id)
        if active is not None:
            self.active_at[run_id] = offset
            if isinstance(active, Run):
                self.active.put(run_id, active)
                machine = active.machine
            else:
                self.active.put_unread(run_id, offset, active)
                machine = active["machine"]
            if changed_at is not None:
                self.changed_at[run_id] = changed_at
            if before is None:
                self.machines.setdefault(machine, []).append(run_id)
        elif before is not None:
            self.active.discard(run_id)
            del self.active_at[run_id]
            self.changed_at.pop(run_id, None)
            peers = self.machines[before]
            peers.remove(run_id)
            if not peers:
                del self.machines[before]

    def ingest_record(self, offset: int, data: dict[str, Any], defer: bool = False) -> None:
        """Take one record into the view; with ``defer`` a non-terminal run is structured
        only when first read (catching up with other processes' writes)."""
        run_id = data["id"]
        if self.cur is None or offset >= self.cur.latest_end:
            self.recent.append(offset)
        active: Run | dict[str, Any] | None = None
        changed_at = None
        if data["status"] in _ACTIVE:
            try:
                changed_at = _fields.change_time(data["time"])
            except ValueError:
                changed_at = None
            if defer and type(data.get("machine")) is str:
                active = data
            else:
                try:
                    active = _fields.run_from_dict(data)
                except _fields.BadLine as exc:
                    raise CorruptStoreError(self.path, offset,
                                            f"run {run_id!r} has a malformed field: "
                                            f"{exc.reason}") from None
        extra = _fields.extra_fields(data)
        if extra:
            self.extras[run_id] = extra
        else:
            self.extras.pop(run_id, None)
        self.index_version(offset, run_id, active, changed_at, data["change"])

    # -- indexing what opening did not read ---------------------------------------------

    def ensure_index(self, journal: Journal) -> None:
        """Index the part opening did not read (id -> offset), when a query needs every run
        or one that is neither non-terminal nor written since: the base opened from its
        summary (its bytes checked against the summary's CRC-32), then, when opening began
        at a checkpoint, the lines between the base and it (parsed and checked line by
        line, and against what the checkpoint says). The caller first takes in what it
        holds for after the flock: those lines follow the part indexed here."""
        if not self.lazy:
            return
        header, j = self.header, journal
        assert header is not None
        recent: list[int] = []  # the offsets of the changes before the checkpoint
        if header.summary is not None:
            base = self._index_base(header, j)
            if self.opened_at is not None:
                recent = history_at(header, j)
            cur = Cursor(end=header.base_end,
                         next_seq=header.compacted_through + 1 + len(recent),
                         durable=header.base_end, latest_end=header.latest_end,
                         base_end=header.base_end, compacted_through=header.compacted_through,
                         legacy=header.version < _codec.KINDS_BY_FIRST_KEY)
        else:
            base, cur = {}, cursor_after_header(header, header.start)
        if self.opened_at is not None:  # opened at a checkpoint: the lines before it
            at, point = self.opened_at
            for chunk_at, chunk in j.read_lines(cur.end, at):
                result = scan(chunk, chunk_at, cur)
                if result.damage is not None:
                    raise CorruptStoreError(j.path, result.damage.offset,
                                            f"{result.damage.reason} (before the checkpoint "
                                            f"at byte {at}, where this process opened)")
                for offset, data in result.records:
                    if offset >= header.latest_end:
                        recent.append(offset)
                    if data["change"] == _PRUNED:
                        base.pop(data["id"], None)
                    else:
                        base[data["id"]] = offset
            if (cur.end, cur.next_seq, len(base)) != (at, point.next_seq, point.runs):
                raise CorruptStoreError(j.path, at, "a checkpoint does not match the lines "
                                        f"before it ({len(base)} runs, next seq "
                                        f"{cur.next_seq})")
            self.recent = collections.deque([*recent, *self.recent], maxlen=self.retain)
        for run_id, offset in self.index.items():  # keeps earlier positions, appends new ids
            base[run_id] = offset
        for run_id in self.tail_pruned:
            base.pop(run_id, None)
        self.index = base
        self.lazy = False
        self.opened_at = None
        self.tail_pruned = set()

    def latest_offsets(self, journal: Journal) -> array.array[int]:
        """The offset of every run's latest version, in insertion order (``index``'s values
        once ``ensure_index`` has run), without indexing the ids of a base opened from its
        summary: its bytes are checked against the summary's CRC-32 and line count as
        ``ensure_index`` checks them, and the view stays lazy. A million ids held as a dict
        are about 170 MB; these offsets are 8 MB. Other views are indexed first."""
        header = self.header
        if not self.lazy or self.opened_at is not None or header is None or header.summary is None:
            self.ensure_index(journal)
            return array.array("q", self.index.values())
        summary, j = header.summary, journal
        moved, gone = self.index, self.tail_pruned  # the runs written or pruned after the base
        offsets: array.array[int] = array.array("q")
        in_base: set[str] = set()
        crc = lines = 0
        for chunk_at, chunk in j.read_lines(header.start, header.latest_end):
            crc = zlib.crc32(chunk, crc)
            count = chunk.count(b"\n")
            lines += count
            found = [(m.group(1), chunk_at + m.start())
                     for m in _codec.RECORD_ID.finditer(b"\n" + chunk)]
            if len(found) != count:  # an id with escapes: parse these lines
                found, pos = [], 0
                while pos < len(chunk):
                    nl = chunk.index(b"\n", pos)
                    data = decode_at(j.path, chunk_at + pos, chunk[pos:nl])
                    found.append((data["id"].encode(), chunk_at + pos))
                    pos = nl + 1
            if not moved and not gone:
                offsets.extend(offset for _, offset in found)
                continue
            for raw, offset in found:
                run_id = raw.decode()
                if run_id in moved:
                    in_base.add(run_id)
                    offset = moved[run_id]
                if run_id not in gone:
                    offsets.append(offset)
        crc, size = j.checksum(header.latest_end, header.base_end, crc)
        if crc != summary.crc or size != header.base_end - header.latest_end:
            refuse_damaged_base(header, j)
        if lines != summary.lines:
            raise CorruptStoreError(j.path, header.start,
                                    f"the compacted base holds {lines} runs where its "
                                    f"header says {summary.lines}")
        offsets.extend(offset for run_id, offset in moved.items()
                       if run_id not in in_base and run_id not in gone)
        return offsets

    def _index_base(self, header: Header, j: Journal) -> dict[str, int]:
        """The base's id -> offset, from the ids at the start of its lines; its bytes are
        checked against the summary's CRC-32 and run count."""
        summary = header.summary
        assert summary is not None
        base: dict[str, int] = {}
        crc = 0
        for chunk_at, chunk in j.read_lines(header.start, header.latest_end):
            crc = zlib.crc32(chunk, crc)
            part = {m.group(1).decode(): chunk_at + m.start()
                    for m in _codec.RECORD_ID.finditer(b"\n" + chunk)}
            if len(part) != chunk.count(b"\n"):  # an id with escapes: parse these lines
                part, pos = {}, 0
                while pos < len(chunk):
                    nl = chunk.index(b"\n", pos)
                    part[decode_at(j.path, chunk_at + pos, chunk[pos:nl])["id"]] = chunk_at + pos
                    pos = nl + 1
            base.update(part)
        crc, size = j.checksum(header.latest_end, header.base_end, crc)
        if crc != summary.crc or size != header.base_end - header.latest_end:
            refuse_damaged_base(header, j)
        if len(base) != summary.lines:
            raise CorruptStoreError(j.path, header.start,
                                    f"the compacted base holds {len(base)} runs where its "
                                    f"header says {summary.lines}")
        return base


def history_at(header: Header, j: Journal) -> list[int]:
    """The offsets of the retained history's lines (the base's complete lines after its
    latest versions: a torn one is found by the base's checksum)."""
    history: list[int] = []
    for chunk_at, chunk in j.read_lines(header.latest_end, header.base_end):
        lines = chunk.split(b"\n")[:chunk.count(b"\n")]
        history.extend(itertools.accumulate((len(line) + 1 for line in lines[:-1]),
                                            initial=chunk_at) if lines else ())
    return history


def decode_at(path: str, offset: int, line: bytes) -> dict[str, Any]:
    """The record of the line at ``offset`` of ``path``; ``CorruptStoreError`` when it is
    not a sound record."""
    try:
        data = _codec.decode_line(line)
        _codec.check_record(data)
    except _fields.BadLine as exc:
        raise CorruptStoreError(path, offset,
                                f"a stored run is unreadable: {exc.reason}") from None
    return data


def refuse_damaged_base(header: Header, j: Journal) -> None:
    """Raise ``CorruptStoreError`` for a compacted base that fails its checksum: at its
    first line that is not a sound record when there is one, else at its start."""
    for chunk_at, chunk in j.read_lines(header.start, header.base_end):
        pos = 0
        while pos < len(chunk):
            nl = chunk.find(b"\n", pos)
            end = len(chunk) if nl < 0 else nl
            decode_at(j.path, chunk_at + pos, chunk[pos:end])  # raises at a damaged line
            pos = end + 1
    raise CorruptStoreError(j.path, header.start,
                            "the compacted base does not match the checksum in its "
                            "header (lines were removed, reordered or edited)")
