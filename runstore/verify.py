"""Verifying a store's journal without changing anything (``check``): its header, every
line's checksum, the sequence and the fields of every run, and what its end is: a torn tail,
which the next write cuts, or damage to data that had been synced. The store's lock is
taken, when the lock file can be opened, so that no write is half-seen; the report
(``CheckReport``) lists the problems, each with where it is and what to do.
"""

from __future__ import annotations

import os
import stat
import time
import zlib
from typing import Any

import attrs

from . import _codec, _fields, _sound, _validate
from ._checkreplay import Replay
from ._lock import flock_until
from ._scan import (
    LINE_LIMIT,
    Cursor,
    Damage,
    Read,
    ScanResult,
    _chunks,
    buffer_reader,
    cursor_after_header,
    first_line,
    judge,
    parse_header,
    scan,
)
from ._statedir import _NOT_WRITABLE, _OPEN, DATA_NAME, LOCK_NAME, _unsafe, open_state_dir
from ._vouch import Vouch, cut_error, read_vouch
from .errors import CorruptStoreError, InvalidRunError, StoreNotFoundError, UnsafeStoreError

#: more than a clean-close mark line can take (``check`` reads no further to find one)
_MARK_LIMIT = 64 * 1024


@attrs.frozen
class Problem:
    """One thing ``check`` found wrong."""

    offset: int
    line: int
    message: str
    remedy: str


@attrs.frozen
class TornTail:
    """Bytes past the last valid line that a crash may leave (a write cut short): the next
    write to the store cuts them (``offset`` to ``end``); reads leave them."""

    offset: int
    end: int
    reason: str

    @property
    def length(self) -> int:
        return self.end - self.offset


@attrs.frozen
class CheckReport:
    """What ``check`` found: ``ok`` is True when the file is healthy (a torn tail, which the
    next write cuts, is reported in ``torn_tail`` and ``notes``, not as a problem)."""

    path: str
    size: int
    records: int
    last_seq: int
    oldest_seq: int
    problems: tuple[Problem, ...]
    #: the torn tail past the last valid line, if any
    torn_tail: TornTail | None = None
    #: how many bytes from the start the file itself shows to have been synced
    synced: int = 0
    #: what check cannot know from the file (sentences)
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


_RESTORE = "restore the file from a backup"
#: what to do about a summary (the header's or a checkpoint's) that its lines contradict
_REBUILD = (f"{_RESTORE}; `runstore export` reads each run from its own line, and the export "
            "imported into a new store holds them all")


def check(state_dir: str | os.PathLike[str], *, lock_timeout: float = 30.0) -> CheckReport:
    """Verify a whole journal (header, checksums, sequence, fields, torn tail, damage) without
    modifying anything; waits up to ``lock_timeout`` for the store's lock, a flock of the
    state directory (``LockTimeoutError``), also on a read-only copy or mount, and reads
    what the lock file records when it can. ``state_dir`` and ``lock_timeout`` are checked
    as ``Store`` checks them (``InvalidRunError``); with no store there it raises
    ``StoreNotFoundError``."""
    state_dir = _validate.path("state_dir", state_dir)
    timeout = _validate.seconds("lock_timeout", lock_timeout)
    assert timeout is not None
    path = os.path.join(state_dir, DATA_NAME)
    lock_path = os.path.join(state_dir, LOCK_NAME)
    if not os.path.isdir(state_dir):
        raise StoreNotFoundError(state_dir, "the directory does not exist"
                                 if not os.path.lexists(state_dir) else "it is not a directory")
    dir_fd = open_state_dir(state_dir, create=False)
    lock_fd = -1
    vouch = None
    notes: list[str] = []
    try:
        _lock_store(dir_fd, lock_path, timeout)
        # the lock file, for what it records, as found at its path once the lock is held
        try:
            lock_fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_NONBLOCK | _OPEN, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE:
                raise _unsafe(lock_path, exc, "lock file") from None
            notes.append(f"the lock file could not be read ({lock_path}: {exc.strerror}): "
                         "what it records of the synced bytes was not used")
        if lock_fd >= 0:
            if not stat.S_ISREG(os.fstat(lock_fd).st_mode):
                raise UnsafeStoreError(lock_path, "the lock file is not a regular file",
                                       "move it away and retry")
            vouch = read_vouch(lock_fd)
        try:
            fd = os.open(DATA_NAME, os.O_RDONLY | _OPEN, dir_fd=dir_fd)
        except FileNotFoundError:
            raise StoreNotFoundError(state_dir, f"the directory holds no {DATA_NAME}") from None
        except OSError as exc:
            raise _unsafe(path, exc, "journal file") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafeStoreError(path, "the journal file is not a regular file",
                                       "move it away")
            report = _check_file(fd, path, vouch)
        finally:
            os.close(fd)
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
        os.close(dir_fd)
    return attrs.evolve(report, notes=(*report.notes, *notes)) if notes else report


def _check_file(fd: int, path: str, vouch: Vouch | None = None) -> CheckReport:
    """``_check_bytes`` of the file open as ``fd``, read a megabyte at a time (its size
    taken first: a store must be locked for the file not to grow meanwhile)."""
    size = os.fstat(fd).st_size

    def read(offset: int, n: int) -> bytes:
        return os.pread(fd, max(0, min(n, size - offset)), offset)

    return _check_bytes(b"", path, vouch, (read, size))


def _lock_store(dir_fd: int, lock_path: str, timeout: float) -> None:
    """Take the store's lock for ``check``: the flock of the state directory open as
    ``dir_fd`` (``_lock``), released when it is closed."""
    flock_until(dir_fd, time.monotonic() + timeout, lock_path, timeout)


def _check_bytes(buf: bytes, path: str, vouch: Vouch | None = None,
                 source: tuple[Read, int] | None = None) -> CheckReport:
    """Check the journal's bytes: ``buf``, or, with ``source``, the ``size`` bytes that
    ``read`` reads, scanned a megabyte at a time with a running CRC and seq check."""
    read, size = source if source is not None else (buffer_reader(buf, 0), len(buf))
    if not size:
        problem = Problem(0, 1, "the file is empty", "move it away to start a new store")
        return CheckReport(path, 0, 0, 0, 0, (problem,))
    first = first_line(read, min(size, LINE_LIMIT + 1))
    nl = first.find(b"\n")
    try:
        if nl < 0:
            raise CorruptStoreError(path, 0, "the header line is truncated")
        header = parse_header(first[:nl], path)
    except CorruptStoreError as exc:
        return CheckReport(path, size, 0, 0, 0,
                           (Problem(0, 1, exc.problem, exc.remedy),))
    del first
    start = nl + 1
    cur = cursor_after_header(header, start)
    problems = []
    newlines = 1  # before the chunk being scanned: the header's
    records = 0
    damage: Damage | None = None
    replay = Replay(start, header.latest_end, header.base_end)
    for chunk_at, chunk in _chunks(read, start, size):
        if chunk_at < replay.end:
            replay.crc = zlib.crc32(memoryview(chunk)[:replay.end - chunk_at], replay.crc)
        sound, result = _scan_sound(chunk, chunk_at, cur, replay, header.summary)
        records += sound
        for offset, message in replay.found:
            line_no = newlines + chunk.count(b"\n", 0, offset - chunk_at) + 1
            problems.append(Problem(offset, line_no, message, _REBUILD))
        replay.found.clear()
        for offset, data in result.shadowed:
            line_no = newlines + chunk.count(b"\n", 0, offset - chunk_at) + 1
            problems.append(Problem(
                offset, line_no,
                f"run {data.get('id')!r} (seq {data.get('seq')!r}) was written with a field "
                "named 'mark', so runstore before format version 2 took its line for a mark: "
                "the run is not in the store",
                "to restore it, take this line, remove its seq, change, time, durable, crc "
                "and mark fields and `runstore import` it (its id is free)"))
        for offset, data in result.records:
            records += 1
            reason = _unwritten(data)
            if reason is not None:
                line_no = newlines + chunk.count(b"\n", 0, offset - chunk_at) + 1
                problems.append(Problem(offset, line_no, f"run {data.get('id')!r}: {reason}",
                                        "restore the file from a backup or fix the record "
                                        "by hand"))
        if result.damage is not None:
            damage = result.damage
            damage_line = newlines + chunk.count(b"\n", 0, damage.offset - chunk_at) + 1
            break
        newlines += chunk.count(b"\n")
    if header.summary is not None and (damage is None or damage.offset >= replay.end):
        crc_holds = replay.crc == header.summary.crc
        problems.extend(Problem(start, 2, message, _REBUILD if crc_holds else
                                f"{_RESTORE}; the lines that pass their own checksum are "
                                "the runs as they were last written")
                        for message in replay.base_problems(header.summary))
    if vouch is not None and vouch.applies_to(header):
        cur.vouched = vouch.length
        if size < vouch.length:
            total = sum(c.count(b"\n") for _, c in _chunks(read, 0, size))
            cut = cut_error(path, size, vouch)
            problems.insert(0, Problem(size, total + 1, cut.problem, cut.remedy))
    torn: TornTail | None = None
    notes: list[str] = []
    if damage is not None:
        line = damage_line
        verdict = judge(read, size, cur, damage)
        if verdict is None:
            torn = TornTail(damage.offset, size, damage.reason)
            notes.append(
                f"torn tail at line {line}: {damage.reason}; the next write to the store cuts "
                f"bytes {torn.offset} to {torn.end} ({torn.length} bytes), reads leave them. "
                f"They lie past the last point the file shows synced (byte {cur.durable}): "
                "a crash during a write leaves such a tail, and then they held no change a "
                "durable store had acknowledged; damage to the disk can look the same, and "
                "whether they held an acknowledged change cannot be known from the file")
        else:
            problems.append(Problem(
                damage.offset, line, verdict,
                "restore the file from a backup; the lines before this offset are intact "
                "JSON lines (head -c OFFSET runs.jsonl) if you must rebuild by hand"))
    synced = cur.durable
    last = read(synced, cur.end - synced) if cur.end - synced <= _MARK_LIMIT else b""
    if last.startswith(b'{"mark":"clean_close",') and last.count(b"\n") == 1:
        synced = cur.end  # closed cleanly: all of it was synced, the mark included
    if not problems and synced < cur.end:
        notes.append(
            f"the last {cur.end - synced} bytes of valid lines (from byte {synced}) are not "
            "known to be synced: the store was not closed cleanly, or is open now, and no "
            "later line records a sync; check cannot tell whether they are on disk for good")
    return CheckReport(path, size, records, cur.next_seq - 1,
                       header.compacted_through + 1, tuple(problems), torn, synced,
                       tuple(notes))


def _unwritten(data: dict[str, Any]) -> str | None:
    """Why a decoded record is not one this library writes (its run fields, kept fields
    and change time as a write or an import would take them), or None."""
    try:
        run = _fields.run_from_dict(data)
        _validate.run_id(run.id)
        _validate.run(run)
    except _fields.BadLine as exc:
        return exc.reason
    except InvalidRunError as exc:
        text = str(exc).removeprefix(f"run {run.id!r}: ")
        return f"{text}: runstore does not write such a run (an import of it is refused)"
    problem = _fields.extra_problem(_fields.extra_fields(data))
    if problem is not None:
        return f"{problem}: runstore does not write such a field (an import of it is refused)"
    try:
        _fields.change_time(data.get("time"))
    except ValueError as exc:
        return str(exc)
    return None


def _scan_sound(chunk: bytes, chunk_at: int, cur: Cursor, replay: Replay,
                summary: _codec.BaseSummary | None) -> tuple[int, ScanResult]:
    """``scan`` of ``chunk`` for ``check``, which needs no record decoded that is sound:
    (how many records were proven sound from their bytes, what ``scan`` returns for the
    other lines). A record line that ``_sound.SOUND_RECORD`` matches, that is ASCII, whose
    CRC-32 and dates hold and whose seq and durable mark follow as ``scan`` requires is
    taken without decoding (``scan`` would take it, and ``fields_sound`` too); any other
    line goes through ``scan``, which judges it as before. Every record line and every
    checkpoint goes to ``replay`` in the file's order (``summary``: the header's)."""
    if cur.legacy:  # a version 1 journal: a record may be read as a mark
        result = scan(chunk, chunk_at, cur)
        for offset, data in result.records:
            replay.decoded(offset, data)
        return 0, result
    match, crc32, dates = _sound.SOUND_RECORD.fullmatch, zlib.crc32, _sound.sound_dates
    times = (*_sound.SOUND_RECORD_TIMES, "time")
    ascii_chunk = chunk.isascii()
    view = memoryview(chunk)
    records: list[tuple[int, dict[str, Any]]] = []
    shadowed: list[tuple[int, dict[str, Any]]] = []
    sound = pos = 0
    size = len(chunk)
    while pos < size:
        nl = chunk.find(b"\n", pos)
        if nl < 0:
            break
        offset = chunk_at + pos
        m = match(chunk, pos, nl)
        if (m is not None and (ascii_chunk or chunk[pos:nl].isascii())
                and crc32(view[pos:m.end("body")]) == int(m["crc"])
                and dates(m.group(*times))):
            seq = int(m["seq"])
            if offset < cur.latest_end:
                pass  # the compacted base's latest versions
            elif seq != cur.next_seq and cur.next_seq:
                m = None
            elif offset < cur.base_end:
                cur.next_seq = seq + 1
            elif (durable := int(m["durable"])) <= offset:
                cur.next_seq = seq + 1
                cur.durable = max(cur.durable, durable)
            else:
                m = None
            if m is not None:
                replay.sound(offset, m["status"], m["id"], m["change"])
                sound += 1
                pos = nl + 1
                cur.end = chunk_at + pos
                continue
        result = scan(chunk[pos:nl + 1], offset, cur)  # judged as scan judges it
        records += result.records
        shadowed += result.shadowed
        if result.damage is not None:
            return sound, ScanResult(records, result.damage, shadowed)
        for at, data in result.records:
            replay.decoded(at, data)
        if chunk.startswith(_codec.CHECKPOINT_START, pos):
            point = _codec.Checkpoint.from_mark(_codec.decode_line(chunk[pos:nl]))
            if point is not None:
                replay.checkpoint(offset, point, summary)
        pos = nl + 1
    result = scan(chunk[pos:], chunk_at + pos, cur)  # an incomplete last line, if any
    return sound, ScanResult(records + result.records, result.damage,
                             shadowed + result.shadowed)

