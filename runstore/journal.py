"""The journal file: open or create it, read what was appended, recover a torn tail, append,
sync, and replace it whole (compaction). The line format is in ``codec``; ``scan`` is pure.

Crash-safety recipe (shared/RELIABILITY.md): appends are one ``write`` of complete lines under
the store lock, followed by ``fdatasync`` in durable mode; whole-file replacement writes a temp
file created ``O_EXCL|O_NOFOLLOW`` 0600, fsyncs it, renames it over the journal and fsyncs the
directory. A compaction beside the lock uses one fixed temp name instead, flocked while it is
written and checked to still be the file at that name after the flock (a cleanup may have
removed it in between), so that stale-temp cleanup and other processes leave it alone; what
is appended to it under the lock is fsynced before the rename. Every open uses
``O_NOFOLLOW|O_CLOEXEC`` relative to a descriptor of the state directory, so a swapped path
component cannot redirect it.

The journal a process has open may be deleted or renamed under it (by hand, by a cleaner):
``Journal`` remembers the identity (st_dev, st_ino) and the store id of the file it opened,
the store compares that identity with the path's at every catch-up (``stat_path``), and
``check_replacement`` tells a compaction's rename (the same store at the path, the open file
unlinked) from everything else, which is refused: a store is never reset to empty, nor
switched to another file, without being asked, and once a journal was opened it is never
created again (``create``).

Only a torn tail is ever cut: bytes past everything known synced, which no later line shows
synced and which were not written whole and then edited (``judge``). What is known synced
comes from the lines' durable marks and from the lock file, where a clean close, a
checkpoint and a compaction record how much of which journal was synced (``Vouch``), out
of reach of a cut of the journal. A damaged tail is judged as it is read, a megabyte at a
time, so a huge one costs linear time and bounded memory.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import re
import stat
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs

from . import codec, failpoints
from .errors import (
    CorruptStoreError,
    IOKind,
    LockTimeoutError,
    ReadOnlyStoreError,
    StoreIOError,
    UnsafeStoreError,
)
from .fsio import FileSystem
from .lock import flock_until, try_flock

DATA_NAME = "runs.jsonl"
LOCK_NAME = "runs.lock"
TMP_PREFIX = ".runs.jsonl."
TMP_SUFFIX = ".tmp"
#: the temp file of a compaction beside the lock (flocked while written; see Store)
COMPACTING_NAME = f"{TMP_PREFIX}compacting{TMP_SUFFIX}"
#: how far back from the end of the journal opening looks for the last checkpoint line
CHECKPOINT_SEARCH = 16 * 1024 * 1024
#: a damaged tail larger than this is not treated as a torn write but reported as corruption
TORN_TAIL_LIMIT = 64 * 1024 * 1024
#: the longest line read whole: a longer one is judged as it is streamed, never held in
#: memory (runstore writes none nearly this long, and a tail this long is never cut)
LINE_LIMIT = TORN_TAIL_LIMIT
_READ_CHUNK = 1 << 20
#: more than a clean-close mark line can take (``check`` reads no further to find one)
_MARK_LIMIT = 64 * 1024
#: how many bytes at the start of the lock file hold the vouch (``Vouch``)
_VOUCH_SIZE = 4096
_BACK_CHUNK = 64 * 1024  # looking back for a checkpoint, which is usually near the end
_CHECKSUM_CHUNK = 4 << 20
_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC
#: open() failures that are I/O or resource errors (StoreIOError), not an unsafe file
_IO_ERRNOS = frozenset({errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE,
                        errno.ENOMEM, errno.EROFS})
_NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
     "lustre", "gpfs", "fuse.sshfs", "fuse.s3fs", "fuse.glusterfs", "virtiofs"}
)
#: open() failures that mean "not for writing": the file may still be opened to read it
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
#: what a ReadOnlyStoreError tells the caller to do
READ_ONLY_REMEDY = ("reads of this store work; to write, use a writable copy of the state "
                    "directory, remount it read-write, or give this user write access "
                    "(files 0600, directory 0700)")


@attrs.frozen
class Header:
    """The first line. A compaction writes, after it, the latest version of every run in
    insertion order (ending at ``latest_end``), then the retained recent history (changes
    ``compacted_through + 1`` onwards, ending at ``base_end``); all of it synced."""

    store_id: str
    created: str
    version: int
    compacted_through: int
    latest_end: int
    base_end: int
    #: where the first record line starts (the header's length)
    start: int = 0
    #: written by compactions: lets a reader skip parsing the base (``codec.BaseSummary``)
    summary: codec.BaseSummary | None = None
    #: CRC-32 of the header line: with the store id it names one journal file's content
    #: (every compaction writes a header of its own), which a ``Vouch`` is about
    crc: int = 0


@attrs.frozen
class Damage:
    offset: int
    reason: str
    #: False for a complete line that passes its checksum but is wrong (seq, status, ...):
    #: a crash cannot produce one, so it is never cut off as a torn write
    torn: bool = True


@attrs.define
class Cursor:
    """How far a reader has validated the file, and what it must expect next."""

    end: int
    next_seq: int
    durable: int
    latest_end: int
    base_end: int
    compacted_through: int
    #: the seq of the record after the last checkpoint line read (or after the base)
    checkpoint_seq: int = 0
    #: a version 1 journal: lines are told apart as version 1 did (``codec.is_mark``)
    legacy: bool = False
    #: how much of the file a clean close, checkpoint or compaction recorded as synced in
    #: the lock file (``Vouch``): never cut, whatever its lines look like
    vouched: int = 0


@attrs.frozen
class Vouch:
    """What a clean close, a checkpoint or a compaction recorded, at the start of the lock
    file, as synced: the first ``length`` bytes of the journal whose header line has CRC-32
    ``header_crc`` (through seq ``seq``; 0 when not known). The lock file is never replaced
    and a cut of the journal cannot reach it, so a journal found shorter than this was cut
    after it was synced (``Store._load``). Only lengths already synced are recorded, and a
    compaction records its new file's before renaming it into place, so a power loss never
    leaves a vouch longer than the journal it names."""

    store_id: str
    header_crc: int
    length: int
    seq: int
    by: str

    def applies_to(self, header: Header) -> bool:
        return (self.store_id, self.header_crc) == (header.store_id, header.crc)

    def encode(self) -> bytes:
        return codec.seal_line({"vouch": self.by, "store_id": self.store_id,
                                "header_crc": self.header_crc, "length": self.length,
                                "seq": self.seq})

    @classmethod
    def decode(cls, data: bytes) -> Vouch | None:
        """The vouch at the start of the lock file's bytes ``data``; None when there is none
        or it is not sound (a torn write of it vouches for nothing)."""
        nl = data.find(b"\n")
        if nl < 0:
            return None
        try:
            line = codec.decode_line(data[:nl])
        except codec.BadLine:
            return None
        by, store_id, header_crc = line.get("vouch"), line.get("store_id"), line.get("header_crc")
        length, seq = line.get("length"), line.get("seq")
        if not (isinstance(by, str) and isinstance(store_id, str)
                and all(type(v) is int and v >= 0 for v in (header_crc, length, seq))):
            return None
        assert isinstance(header_crc, int) and isinstance(length, int) and isinstance(seq, int)
        return cls(store_id, header_crc, length, seq, by)


def read_vouch(lock_fd: int) -> Vouch | None:
    """The vouch in the lock file open as ``lock_fd`` (None when there is none)."""
    try:
        return Vouch.decode(os.pread(lock_fd, _VOUCH_SIZE, 0))
    except OSError:
        return None


def write_vouch(lock_fd: int, vouch: Vouch, *, sync: bool) -> None:
    """Record ``vouch`` at the start of the lock file (one ``pwrite``; then ``fdatasync``
    when ``sync``). Bytes an earlier, longer vouch left after its newline are ignored."""
    line = vouch.encode()
    if len(line) > _VOUCH_SIZE:  # a store id nobody writes: vouch for nothing rather
        line = b"\n"
    os.pwrite(lock_fd, line, 0)
    if sync:
        os.fdatasync(lock_fd)


def missing_error(path: str, vouch: Vouch) -> CorruptStoreError:
    """The journal is missing, but the lock file records that one was synced there."""
    through = f" through seq {vouch.seq}" if vouch.seq else ""
    return CorruptStoreError(
        path, None,
        f"the journal is missing, but {LOCK_NAME} records {vouch.length} synced bytes{through} "
        f"of the journal of store {vouch.store_id} (at a {vouch.by}); runstore never starts a "
        "new, empty store in place of one that existed",
        "restore the journal from a backup (or move it back); to start a new, empty store "
        f"on purpose, remove {LOCK_NAME} as well while no process uses the store")


def cut_error(path: str, size: int, vouch: Vouch) -> CorruptStoreError:
    """The journal is ``size`` bytes, shorter than ``vouch`` recorded as synced."""
    through = f" (through seq {vouch.seq})" if vouch.seq else ""
    return CorruptStoreError(
        path, size,
        f"the journal ends at byte {size}, but its first {vouch.length} bytes{through} were "
        f"synced and recorded as such in {LOCK_NAME} at a {vouch.by}: the file was cut "
        "after it was synced (not a torn write, which only loses what was never synced)",
        "restore the file from a backup (the lines before this offset are intact); if this "
        f"shorter file is what you want, empty {LOCK_NAME} (truncate -s 0) while no process "
        "uses the store")


@attrs.define
class ScanResult:
    records: list[tuple[int, dict[str, Any]]]
    damage: Damage | None
    #: in a version 1 journal, record lines read as marks because they carry a field named
    #: ``mark`` (``codec.is_mark``): runs that version lost (``check`` reports them)
    shadowed: list[tuple[int, dict[str, Any]]] = attrs.Factory(list)


_INCOMPLETE = "incomplete last line (a torn write)"


def scan(buf: bytes, start: int, cur: Cursor) -> ScanResult:
    """Validate the complete lines of ``buf`` (file bytes from offset ``start``) and advance
    ``cur`` past the valid ones; stop at the first line that is not sound. A ``cur`` whose
    ``next_seq`` is 0 takes the first seq it meets as it is (a reader that starts in the
    middle of the records: ``Journal.lines_follow``)."""
    records: list[tuple[int, dict[str, Any]]] = []
    shadowed: list[tuple[int, dict[str, Any]]] = []
    pos = 0
    size = len(buf)
    decode, check, is_mark = codec.decode_line, codec.check_record, codec.is_mark
    legacy = cur.legacy
    while pos < size:
        nl = buf.find(b"\n", pos)
        offset = start + pos
        if nl < 0:
            return ScanResult(records, Damage(offset, _INCOMPLETE), shadowed)
        try:
            line = buf[pos:nl]
            data = decode(line)
            if is_mark(line, data, legacy):
                if legacy and not line.startswith(codec.MARK_START):
                    shadowed.append((offset, data))
                mark = data.get("durable")
                if type(mark) is not int or not 0 <= mark <= offset or offset < cur.base_end:
                    raise codec.BadLine(f"bad durable mark {mark!r}")
                if data["mark"] == "checkpoint":
                    says = data.get("next_seq")
                    if cur.next_seq == 0 and type(says) is int:
                        cur.next_seq = says
                    if says != cur.next_seq:
                        raise codec.BadLine(f"a checkpoint says the next seq is {says!r} "
                                            f"where it is {cur.next_seq}")
                    cur.checkpoint_seq = cur.next_seq
                # a mark that vouches for every byte before it vouches for itself too: it
                # shows no change, so a reader need not sync it (``Store._make_visible``)
                cur.durable = max(cur.durable, mark if mark < offset else start + nl + 1)
                pos = nl + 1
                cur.end = start + pos
                continue
            else:
                check(data)
                seq = data["seq"]
                if offset < cur.latest_end:
                    pass  # the compacted base: latest versions, in insertion order
                elif seq != cur.next_seq and cur.next_seq:
                    raise codec.BadLine(f"seq {seq} where {cur.next_seq} was expected")
                elif offset < cur.base_end:
                    cur.next_seq = seq + 1  # retained history copied by compaction
                else:
                    durable = data["durable"]
                    if durable > offset:
                        raise codec.BadLine("durable mark points past the line itself")
                    cur.next_seq = seq + 1
                    if durable > cur.durable:  # (max() costs several times more)
                        cur.durable = durable
                records.append((offset, data))
        except codec.BadLine as exc:
            return ScanResult(records, Damage(offset, exc.reason, exc.torn), shadowed)
        pos = nl + 1
        cur.end = start + pos
    return ScanResult(records, None, shadowed)


#: how every line runstore writes after the header begins (a record, or a clean-close mark)
_LINE_START = re.compile(rb'\{"(?:seq|mark)":')
_CRC_TAIL = re.compile(rb',"crc":(\d{1,10})\}\r?$')

#: ``read(offset, size)``: bytes of the file being judged (a descriptor, or a buffer)
Read = Callable[[int, int], bytes]


def buffer_reader(buf: bytes, start: int) -> Read:
    """``read`` over ``buf``, the file's bytes from offset ``start``."""
    def read(offset: int, size: int) -> bytes:
        return buf[offset - start:offset - start + size]
    return read


def _newline_after(read: Read, end: int, offset: int) -> int:
    """The offset of the first newline at or after ``offset`` (-1: none before ``end``),
    found in chunks, keeping none of them."""
    pos = offset
    while pos < end:
        chunk = read(pos, min(_READ_CHUNK, end - pos))
        if not chunk:
            break
        nl = chunk.find(b"\n")
        if nl >= 0:
            return pos + nl
        pos += len(chunk)
    return -1


def _line_at(read: Read, end: int, offset: int) -> tuple[bytes | None, int]:
    """(the line at ``offset`` without its newline, or None when it is longer than
    ``LINE_LIMIT`` or has no newline before ``end``; where its newline is, -1 if none)."""
    nl = _newline_after(read, end, offset)
    if nl < 0 or nl - offset > LINE_LIMIT:
        return None, nl
    return read(offset, nl - offset), nl


def _long_line_damage(read: Read, nl: int, damage: Damage) -> Damage:
    """``damage`` at a line too long to be read whole (``Journal.read_lines`` stops at it,
    so the scan saw it as incomplete), whose newline is at ``nl``: what is wrong with it,
    found by streaming it."""
    tail = read(max(damage.offset, nl - 24), nl - max(damage.offset, nl - 24))
    m = _CRC_TAIL.search(tail)
    if m is None:
        return Damage(damage.offset, "no checksum field (torn, truncated or not written by "
                      "runstore)")
    cut, crc, pos = nl - len(tail) + m.start(), 0, damage.offset
    while pos < cut:
        chunk = read(pos, min(_READ_CHUNK, cut - pos))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        pos += len(chunk)
    if crc != int(m.group(1)):
        return Damage(damage.offset, "checksum mismatch (the line was altered or torn)")
    return Damage(damage.offset, f"a line of {nl - damage.offset} bytes, longer than "
                  f"runstore reads ({LINE_LIMIT})", torn=False)


def _normalised(line: bytes) -> Iterator[tuple[bytes, str]]:
    """Versions of a damaged line with a whole-file edit undone, each with what the edit
    was: line endings converted to CRLF, text re-encoded between Latin-1 and UTF-8."""
    crlf = line.endswith(b"\r")
    base = line.rstrip(b"\r") if crlf else line
    if crlf:
        yield base, "its line ending was converted to CRLF"
    edited = "its line ending was converted to CRLF and " if crlf else ""
    if max(base, default=0) < 0x80:
        return
    for src, dst in (("utf-8", "latin-1"), ("utf-8", "cp1252"), ("latin-1", "utf-8"),
                     ("cp1252", "utf-8")):
        try:
            yield base.decode(src).encode(dst), f"{edited}it was re-encoded from {dst} to {src}"
        except (UnicodeDecodeError, UnicodeEncodeError):
            continue


def _decode_edited(line: bytes) -> tuple[dict[str, Any], str] | None:
    """(the line's content, how it was edited) when ``line`` fails its checksum only
    because of a whole-file edit (``_normalised``), else None."""
    for candidate, how in _normalised(line):
        try:
            return codec.decode_line(candidate), how
        except codec.BadLine:
            continue
    return None


def durable_beyond(read: Read, end: int, damage: Damage) -> int | None:
    """After damage at ``damage.offset``: the offset of a later valid line that proves the
    damaged bytes had been synced (its durable mark lies past them), else None. A line is
    looked for wherever one can begin, not only after a newline: a flipped newline merges
    the damaged line with the next, which must still count as proof. A line that fails its
    checksum only because the whole file was edited (``_normalised``) counts too. The
    bytes up to ``end`` are read a megabyte at a time, never held at once."""
    pos = damage.offset + 1
    overlap = len(b'{"mark":') - 1  # a line start cut by a chunk's end is seen in the next
    far_nl = -1  # the newline ending the last line found too long to read
    while pos < end:
        chunk = read(pos, min(_READ_CHUNK, end - pos))
        if not chunk:
            return None
        i = chunk.find(b'{"')
        while i >= 0:
            if _LINE_START.match(chunk, i) and pos + i + LINE_LIMIT >= far_nl:
                nl = chunk.find(b"\n", i)
                if nl >= 0:
                    line: bytes | None = chunk[i:nl]
                else:
                    line, at = _line_at(read, end, pos + i)
                    if at < 0:
                        return None  # no newline after it: nothing later is complete
                    far_nl = at if line is None else far_nl
                data = _decode_proof(line) if line is not None else None
                mark = data.get("durable") if data is not None else None
                if type(mark) is int and mark > damage.offset:
                    return pos + i
            i = chunk.find(b'{"', i + 1)
        pos += len(chunk) - overlap if len(chunk) > overlap and pos + len(chunk) < end \
            else len(chunk)
    return None


def _decode_proof(line: bytes) -> dict[str, Any] | None:
    try:
        return codec.decode_line(line)
    except codec.BadLine:
        edited = _decode_edited(line)
        return edited[0] if edited is not None else None


def cursor_after_header(header: Header, start: int) -> Cursor:
    """Where a reader stands after the header line (which ends at ``start``)."""
    return Cursor(end=start, next_seq=header.compacted_through + 1, durable=header.base_end,
                  latest_end=header.latest_end, base_end=header.base_end,
                  compacted_through=header.compacted_through,
                  checkpoint_seq=header.compacted_through + 1,
                  legacy=header.version < codec.KINDS_BY_FIRST_KEY)


def judge(read: Read, end: int, cur: Cursor, damage: Damage) -> str | None:
    """Decide what damage at ``damage.offset`` of a file ``end`` bytes long is: None for a
    torn tail (unsynced writes a crash cut short, safe to truncate), else why it is
    corruption of durable data. A crash tears only appends that were not synced, so
    anything shown synced (a durable mark, a later line's mark, the lock file's vouch) or
    edited after it was complete is corruption. Linear in the tail, in bounded memory."""
    nl = _newline_after(read, end, damage.offset)
    if damage.reason == _INCOMPLETE and nl >= 0:
        damage = _long_line_damage(read, nl, damage)
    if damage.offset < cur.durable:
        return (f"{damage.reason}, inside the part of the file known to be synced "
                f"(the first {cur.durable} bytes)")
    if not damage.torn:
        return (f"{damage.reason}; the line is complete and passes its checksum, so it is "
                "not a torn write (was it written by a newer runstore or edited by hand?)")
    long = nl < 0 or nl - damage.offset > LINE_LIMIT
    edited = None if long else _decode_edited(read(damage.offset, nl - damage.offset))
    if edited is not None:
        return (f"{damage.reason}; the line passes its checksum once the edit is undone "
                f"({edited[1]}), so it was written whole and then the file was edited "
                "(not a torn write)")
    proof = durable_beyond(read, end, damage) if nl >= 0 else None  # none: no line ends
    if proof is not None:
        return f"{damage.reason}; a valid record at byte {proof} shows this part had been synced"
    if damage.offset < cur.vouched:
        return (f"{damage.reason}, inside the first {cur.vouched} bytes, which {LOCK_NAME} "
                "records as synced (at a clean close, checkpoint or compaction)")
    dropped = end - damage.offset
    if dropped > TORN_TAIL_LIMIT:
        return f"{damage.reason}, followed by {dropped} bytes: too much to be a torn write"
    return None


def parse_header(line: bytes, path: str) -> Header:
    """Decode and check the first line of a journal."""
    try:
        data = codec.decode_line(line)
    except codec.BadLine as exc:
        edited = _decode_edited(line) if exc.torn else None
        how = f"; it passes its checksum once the edit is undone ({edited[1]})" if edited else ""
        raise CorruptStoreError(path, 0,
                                f"the header line is damaged ({exc.reason}{how})") from None
    if data.get("format") != codec.FORMAT_NAME:
        raise CorruptStoreError(
            path, 0, f"not a runstore journal (format {data.get('format')!r})",
            "point runstore at its own state directory; this file was left untouched")
    version = data.get("version")
    if type(version) is not int or version < 1:
        raise CorruptStoreError(path, 0, f"bad format version {version!r}")
    if version > codec.FORMAT_VERSION:
        raise CorruptStoreError(
            path, 0,
            f"format version {version} is newer than this runstore understands "
            f"(version {codec.FORMAT_VERSION})",
            "upgrade runstore to open this store; the file was left untouched")
    through = data.get("compacted_through")
    base, history = data.get("base_bytes"), data.get("history_bytes", 0)
    if not all(type(v) is int and v >= 0 for v in (through, base, history)):
        raise CorruptStoreError(path, 0, "the header's compaction fields are malformed")
    assert isinstance(through, int) and isinstance(base, int) and isinstance(history, int)
    return Header(
        store_id=str(data.get("store_id", "")),
        created=str(data.get("created", "")),
        version=version,
        compacted_through=through,
        latest_end=len(line) + 1 + base,
        base_end=len(line) + 1 + base + history,
        start=len(line) + 1,
        summary=codec.BaseSummary.from_header(data),
        crc=zlib.crc32(line),
    )


def _unsafe(path: str, exc: OSError, what: str) -> UnsafeStoreError:
    if exc.errno == errno.ELOOP:
        return UnsafeStoreError(
            path, f"{what} is a symbolic link", "runstore never follows symlinks there; "
            "remove the link (an attacker may have planted it) and retry")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UnsafeStoreError(path, f"permission denied opening the {what}",
                                "fix its owner/mode (files 0600, directory 0700) and retry")
    if exc.errno == errno.EISDIR:
        return UnsafeStoreError(path, f"the {what} is a directory",
                                "move it away; runstore keeps a regular file there")
    if exc.errno == errno.ENOTDIR:
        return UnsafeStoreError(path, "not a directory",
                                "give a state directory path, not a file")
    return UnsafeStoreError(path, f"cannot open the {what} ({exc.strerror})",
                            "check the path and its permissions")


def log_warning(message: str, *args: object) -> None:
    """Log on the ``runstore`` logger (``logging`` is imported here, not at the top: it
    costs a fresh process ~4 ms, and only recovery and failed housekeeping log)."""
    import logging

    logging.getLogger("runstore").warning(message, *args)


def open_state_dir(state_dir: str, *, create: bool = True) -> int:
    """Create the state directory (0700) when missing and return a descriptor of it after
    checking it belongs to us and is not writable by group or others."""
    if not create and not os.path.isdir(state_dir):
        raise FileNotFoundError(errno.ENOENT, "no runstore state directory", state_dir)
    try:
        if create:  # a reader makes no directory (nor tries to, on a read-only mount)
            os.mkdir(state_dir, 0o700)
            os.chmod(state_dir, 0o700)  # the umask may have cleared bits we asked for
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(state_dir, 0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)
    except OSError as exc:
        raise _unsafe(state_dir, exc, "state directory") from None
    try:
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _unsafe(state_dir, exc, "state directory") from None
    st = os.fstat(fd)
    problem = ""
    if st.st_uid != os.geteuid():
        problem = f"the state directory is owned by uid {st.st_uid}, not by you ({os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = (f"the state directory is writable by group or others "
                   f"(mode {stat.S_IMODE(st.st_mode):o})")
    if problem:
        os.close(fd)
        raise UnsafeStoreError(state_dir, problem,
                               "use a directory of your own with mode 0700 (chmod 700 DIR)")
    _warn_if_network_fs(state_dir)
    return fd


def _warn_if_network_fs(state_dir: str) -> None:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return
    real = os.path.realpath(state_dir)
    best, fstype = "", ""
    for parts in mounts:
        if "-" not in parts:
            continue
        point = parts[4].replace("\\040", " ")
        kind = parts[parts.index("-") + 1]
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, kind
    if fstype in _NETWORK_FS:
        warnings.warn(
            f"runstore: {state_dir} is on a network filesystem ({fstype}); flock is unreliable "
            "there and two hosts may both claim a machine. Use a local disk, or PostgreSQL "
            "for several hosts.", RuntimeWarning, stacklevel=4)


class Journal:
    """One journal file in a state directory. Callers hold the store lock for every method
    but ``close``; the journal keeps no view of the runs, only descriptors and offsets."""

    def __init__(self, state_dir: str, fs: FileSystem, *, create: bool = True) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, DATA_NAME)
        self.lock_path = os.path.join(state_dir, LOCK_NAME)
        self.fs = fs
        self.dir_fd = open_state_dir(state_dir, create=create)
        self.fd: int | None = None
        self._pid = os.getpid()
        #: (st_dev, st_ino) of the file ``fd`` was opened on
        self.identity: tuple[int, int] | None = None
        #: the store id of the first journal opened: every later open must find the same
        #: store, and ``create`` is refused ("" until a journal was opened)
        self.store_id = ""
        #: the journal open is of format version 1 (``Cursor.legacy``)
        self.legacy = False
        #: why the journal open now could only be opened for reading ("" when writable)
        self.read_only = ""

    # -- descriptors --------------------------------------------------------------------

    def peek_vouch(self) -> Vouch | None:
        """The lock file's record of what was synced (``Vouch``), read without locking or
        creating the file (a store that only reads opens its lock file at its first
        write); None when there is no lock file or it cannot be read."""
        try:
            fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_NONBLOCK | _OPEN, dir_fd=self.dir_fd)
        except OSError:
            return None
        try:
            return read_vouch(fd)
        finally:
            os.close(fd)

    def open_lock_file(self) -> int:
        """Open (creating 0600) the lock file; it is never deleted. ``ReadOnlyStoreError``
        when it cannot be opened (or created) for writing: a read-only copy or mount."""
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _OPEN, 0o600, dir_fd=self.dir_fd)
        except OSError as exc:
            if exc.errno in _NOT_WRITABLE:
                raise self.read_only_error(self.lock_path, "lock file", exc) from None
            raise _unsafe(self.lock_path, exc, "lock file") from None
        self._check_regular(fd, self.lock_path, "lock file")
        return fd

    def read_only_error(self, path: str, what: str, exc: OSError | None = None
                        ) -> ReadOnlyStoreError:
        """The error of a write to a store this process can only read (``path``: the file
        that cannot be opened for writing)."""
        why = f" ({exc.strerror})" if exc is not None else ""
        if exc is None and self.read_only:
            why = f" ({self.read_only})"
        return ReadOnlyStoreError(path, f"the {what} cannot be opened for writing{why}, so "
                                  "this store is read-only here and nothing was written",
                                  READ_ONLY_REMEDY)

    def lock_file_exists(self) -> bool:
        """Whether anything is at the lock file's path (not following a symlink)."""
        try:
            self.stat_lock_file()
        except FileNotFoundError:
            return False
        return True

    def stat_lock_file(self) -> os.stat_result:
        """The lock file at its path, not following a symlink (``FileNotFoundError``)."""
        return os.stat(LOCK_NAME, dir_fd=self.dir_fd, follow_symlinks=False)

    def stat_path(self) -> os.stat_result | None:
        """What is at the journal's path now (not following a symlink), None when nothing
        is: compared with ``identity``, it tells whether the open file is still the
        journal (one system call)."""
        try:
            return os.stat(DATA_NAME, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def gone_error(self) -> CorruptStoreError:
        """The journal this process had open is no longer at its path and nothing is."""
        where = ""
        if self.fd is not None:
            where = f" (the file this process had open is {self._whereabouts()})"
        return CorruptStoreError(
            self.path, None,
            "the journal was deleted or renamed while this process had it open"
            f"{where}; runstore never recreates it",
            "move it back or restore it from a backup; to start a new store on purpose, "
            "stop every process that uses it and remove the files of the state directory")

    def check_replacement(self) -> None:
        """The journal's path names a file other than the one open (``identity``): return
        when a compaction replaced it (the path holds a journal of the same store and the
        open file is unlinked); otherwise raise, naming both files: the path holds another
        store's journal or something that is not a journal, or the open file was renamed
        away and another one put at its path."""
        assert self.fd is not None
        try:
            fd = os.open(DATA_NAME, os.O_RDONLY | os.O_NONBLOCK | _OPEN, dir_fd=self.dir_fd)
        except FileNotFoundError:
            raise self.gone_error() from None
        except OSError as exc:
            if exc.errno in _IO_ERRNOS:
                raise StoreIOError(self.path, "opening", exc) from None
            raise _unsafe(self.path, exc, "journal file") from None
        try:
            first = os.pread(fd, 65536, 0) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        except OSError as exc:
            raise StoreIOError(self.path, "reading", exc) from None
        finally:
            os.close(fd)
        nl = first.find(b"\n")
        found = ""
        if not first:
            found = "an empty file or one that is not a regular file"
        else:
            try:
                if nl < 0:
                    raise CorruptStoreError(self.path, 0, "the header line is truncated")
                store_id = parse_header(first[:nl], self.path).store_id
            except CorruptStoreError as exc:
                found = f"a file that is not a runstore journal ({exc.problem})"
            else:
                if store_id != self.store_id:
                    found = (f"the journal of another store (store id {store_id!r}, where "
                             f"this process opened store id {self.store_id!r})")
        renamed = os.fstat(self.fd).st_nlink > 0
        if not found and not renamed:
            return  # a compaction elsewhere renamed its new file over ours
        if not found:
            found = "another journal of the same store"
        raise CorruptStoreError(
            self.path, None,
            f"the journal was replaced by {found} while this process had it open; the file "
            f"this process has open is {self._whereabouts()}; runstore follows neither",
            "put the right journal back at this path (or restore it from a backup) and "
            "restart the processes that use the store; to start a new store on purpose, "
            "stop every process that uses it and remove the files of the state directory")

    def _whereabouts(self) -> str:
        """What became of the file open now: deleted, or its path now (for an error)."""
        if self.fd is None:
            return "closed"
        try:
            if os.fstat(self.fd).st_nlink == 0:
                return "deleted"
            return f"now {os.readlink(f'/proc/self/fd/{self.fd}')}"
        except OSError:
            return f"still linked somewhere (inode {self.identity[1] if self.identity else '?'})"

    def _check_regular(self, fd: int, path: str, what: str, fix_mode: bool = True) -> None:
        st = os.fstat(fd)
        problem = ""
        if not stat.S_ISREG(st.st_mode):
            problem = f"the {what} is not a regular file"
        elif st.st_uid != os.geteuid():
            problem = f"the {what} is owned by uid {st.st_uid}, not by you"
        if problem:
            os.close(fd)
            raise UnsafeStoreError(path, problem, "move it away and retry")
        if fix_mode and stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)

    def after_fork(self) -> None:
        """In a forked child: drop the parent's descriptors (they are reopened lazily)."""
        if self._pid == os.getpid():
            return
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None
        self._pid = os.getpid()

    def exists(self) -> bool:
        try:
            os.stat(DATA_NAME, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def open(self, *, writable: bool = True, read_only_ok: bool = False) -> Header:
        """Open the journal at its path (closing a replaced one) and read its header. With
        ``read_only_ok`` (a read), a journal that cannot be opened for writing (a read-only
        copy or mount) is opened for reading, and ``read_only`` says why (its mode is then
        left as it is)."""
        self.close_data()
        self.read_only = ""
        flags = (os.O_RDWR | os.O_APPEND if writable else os.O_RDONLY) | _OPEN
        try:
            try:
                fd = self.fs.open(DATA_NAME, flags, 0o600, self.dir_fd)
            except OSError as exc:
                if not writable or not read_only_ok or exc.errno not in _NOT_WRITABLE:
                    raise
                fd = self.fs.open(DATA_NAME, os.O_RDONLY | _OPEN, 0o600, self.dir_fd)
                self.read_only = exc.strerror or "not writable"
        except OSError as exc:
            if exc.errno == errno.ENOENT and self.store_id:
                raise self.gone_error() from None
            if exc.errno in _IO_ERRNOS:  # the disk or the system failed, not the file's safety
                raise StoreIOError(self.path, "opening", exc, IOKind.OPEN) from None
            raise _unsafe(self.path, exc, "journal file") from None
        self._check_regular(fd, self.path, "journal file", fix_mode=not self.read_only)
        st = os.fstat(fd)
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)
        if st.st_size == 0:
            raise CorruptStoreError(
                self.path, 0, "the file is empty (runstore never leaves an empty journal)",
                "it was truncated or not written by runstore; move it away to start a new "
                "store, or restore it from a backup")
        first = self.pread(fd, 65536, 0)
        nl = first.find(b"\n")
        if nl < 0:
            raise CorruptStoreError(self.path, 0, "the header line is truncated")
        header = parse_header(first[:nl], self.path)
        self.legacy = header.version < codec.KINDS_BY_FIRST_KEY
        if not self.store_id:
            self.store_id = header.store_id
        elif header.store_id != self.store_id:
            self.close_data()  # never written to: it is not this store's
            raise CorruptStoreError(
                self.path, 0,
                f"the journal was replaced by the journal of another store (store id "
                f"{header.store_id!r}, where this process opened store id "
                f"{self.store_id!r}) while this process had it open; runstore does not "
                "follow it",
                "put the right journal back at this path (or restore it from a backup) and "
                "restart the processes that use the store")
        return header

    def create(self) -> Header:
        """Create a new journal holding only a header, atomically (temp file, rename).
        Only the first open of a state directory creates one: once this ``Journal`` has
        opened a journal, a missing one is an error (``gone_error``), never a new store."""
        if self.store_id:
            raise self.gone_error()
        now = _dt.datetime.now(_dt.UTC).isoformat().replace("+00:00", "Z")
        header = codec.encode_header(os.urandom(8).hex(), now, 0, 0, 0)
        self.replace_with([header])
        return self.open()

    def close_data(self) -> None:
        if self.fd is not None:
            self.fs.close(self.fd)
        self.fd = None

    def close(self) -> None:
        self.close_data()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    # -- reading ------------------------------------------------------------------------

    def read_from(self, offset: int) -> bytes:
        """Everything from ``offset`` to the current end of the file."""
        assert self.fd is not None
        chunks = []
        while True:
            chunk = self.pread(self.fd, _READ_CHUNK, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            if len(chunk) < _READ_CHUNK:
                break
        return b"".join(chunks)

    def checksum(self, start: int, end: int, crc: int = 0) -> tuple[int, int]:
        """(CRC-32 continuing ``crc``, length) of the bytes from ``start`` to ``end``, read
        in large chunks without keeping them (a short file gives a shorter length)."""
        assert self.fd is not None
        pos = start
        while pos < end:
            chunk = self.pread(self.fd, min(_CHECKSUM_CHUNK, end - pos), pos)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            pos += len(chunk)
        return crc, pos - start

    def read_lines(self, start: int, end: int,
                   fd: int | None = None) -> Iterator[tuple[int, bytes]]:
        """The bytes from ``start`` to ``end`` as (offset, chunk) pairs of whole lines, about
        ``_READ_CHUNK`` each, so a large region is never in memory at once. A short file
        ends the iteration early (the caller's checksum then tells). ``fd``: another
        descriptor of the file to read (``hold``) instead of the one open now."""
        fd = self.fd if fd is None else fd
        assert fd is not None
        if end - start <= _READ_CHUNK:  # the usual catch-up: a few lines, one read
            try:
                chunk = self.fs.pread(fd, end - start, start)
            except OSError as exc:
                raise StoreIOError(self.path, "reading", exc, IOKind.READ) from None
            if chunk:
                yield start, chunk
            return
        yield from _chunks(lambda offset, size: self.pread(fd, size, offset), start, end)

    def line_number(self, offset: int) -> int:
        """The 1-based number of the line at ``offset`` (newlines counted in chunks: for
        an error message, never on the way of an operation)."""
        assert self.fd is not None
        count, pos = 1, 0
        while pos < offset:
            chunk = self.pread(self.fd, min(_CHECKSUM_CHUNK, offset - pos), pos)
            if not chunk:
                break
            count += chunk.count(b"\n")
            pos += len(chunk)
        return count

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` of ``fd`` (a descriptor of the journal);
        ``StoreIOError`` (``IOKind.READ``) when the read fails."""
        try:
            return self.fs.pread(fd, size, offset)
        except OSError as exc:
            raise StoreIOError(self.path, "reading", exc, IOKind.READ) from None

    def hold(self) -> int:
        """A descriptor of the file open now, for a caller to read later and close
        (``close_held``): it stays this file even after a compaction replaces it."""
        assert self.fd is not None
        try:
            return os.dup(self.fd)
        except OSError as exc:
            raise StoreIOError(self.path, "opening", exc, IOKind.OPEN) from None

    def close_held(self, fd: int) -> None:
        self.fs.close(fd)

    def reader(self) -> Callable[[int, int], bytes]:
        """``read(offset, size)`` of the file open now (kept even after it is replaced):
        for a compaction, which reads it in pieces (``compaction.Read``)."""
        fd, pread, path = self.fd, self.fs.pread, self.path
        assert fd is not None

        def read(offset: int, size: int) -> bytes:
            try:
                return pread(fd, size, offset)
            except OSError as exc:
                raise StoreIOError(path, "reading", exc, IOKind.READ) from None

        return read

    def last_checkpoint(self, lo: int, hi: int) -> tuple[int, int, codec.Checkpoint] | None:
        """The last sound checkpoint line that lies in ``lo:hi`` (``lo`` a line start),
        looked for backwards from ``hi`` over at most ``CHECKPOINT_SEARCH`` bytes: (its
        offset, the offset after it, what it says), or None."""
        assert self.fd is not None
        floor = max(lo, hi - CHECKPOINT_SEARCH)
        needle = b"\n" + codec.CHECKPOINT_START  # found by the newline before it
        top = hi  # newlines at top or later were looked at
        while top > floor:
            at = max(floor - 1, top - _BACK_CHUNK)
            chunk = self.pread(self.fd, top - at + len(needle), at)
            pos = chunk.rfind(needle, 0, top - at - 1 + len(needle))
            while pos >= 0:
                found = self._checkpoint_at(at + pos + 1, lo, hi)
                if found is not None:
                    return found
                pos = chunk.rfind(needle, 0, pos - 1 + len(needle))
            top = at
        return None

    def _checkpoint_at(self, offset: int, lo: int,
                       hi: int) -> tuple[int, int, codec.Checkpoint] | None:
        if not lo <= offset < hi:
            return None
        try:
            line = self.read_line(offset)
            point = codec.Checkpoint.from_mark(codec.decode_line(line))
        except (CorruptStoreError, codec.BadLine):  # torn, or not one
            return None
        end = offset + len(line) + 1
        if (point is None or end > hi or point.durable > offset
                or any(a >= offset for a in point.active)):
            return None
        return offset, end, point

    def lines_follow(self, lo: int, hi: int, next_seq: int) -> bool:
        """Whether the lines in ``lo:hi`` are all sound, their records in seq order up to
        ``next_seq - 1`` (what a checkpoint at ``hi`` says comes next): the check that the
        unsynced lines before a checkpoint were not torn or lost in a power loss."""
        cur = Cursor(end=lo, next_seq=0, durable=0, latest_end=0, base_end=0,
                     compacted_through=0, legacy=self.legacy)
        for chunk_at, chunk in self.read_lines(lo, hi):
            if scan(chunk, chunk_at, cur).damage is not None:
                return False
        return cur.end == hi and cur.next_seq in (0, next_seq)

    def read_line(self, offset: int) -> bytes:
        """The line starting at ``offset``, without its newline."""
        assert self.fd is not None
        return self.read_line_at(self.fd, offset)

    def read_line_at(self, fd: int, offset: int) -> bytes:
        """``read_line`` from ``fd``, a descriptor of the journal (``hold``)."""
        size = 2048
        while True:
            data = self.pread(fd, size, offset)
            nl = data.find(b"\n")
            if nl >= 0:
                return data[:nl]
            if len(data) < size:
                raise CorruptStoreError(self.path, offset, "a record line has no end")
            size *= 4

    # -- writing ------------------------------------------------------------------------

    def append(self, data: bytes, start: int) -> None:
        """Write complete lines at the end (``start``); on failure cut back to ``start``."""
        assert self.fd is not None
        failpoints.hit("append.before_write")
        try:
            written = self.fs.write(self.fd, data)  # all of it, unless the disk is full
            view = memoryview(data)[written:]
            while view:
                view = view[self.fs.write(self.fd, view):]
        except OSError as exc:
            try:
                self.fs.ftruncate(self.fd, start)
            except OSError:
                pass  # a torn tail: the next reader recovers it (it lies past the durable mark)
            raise StoreIOError(self.path, "appending to", exc, IOKind.WRITE) from None
        failpoints.hit("append.after_write")

    def sync(self) -> None:
        assert self.fd is not None
        try:
            self.fs.fdatasync(self.fd)
        except OSError as exc:
            raise StoreIOError(self.path, "syncing", exc, IOKind.SYNC) from None
        failpoints.hit("append.after_sync")

    def truncate(self, length: int, reason: str) -> None:
        """Cut a torn tail (recovery) and sync the cut."""
        assert self.fd is not None
        failpoints.hit("recover.before_truncate")
        size = os.fstat(self.fd).st_size
        log_warning("runstore: recovering %s: dropping %d bytes from offset %d (%s)",
                    self.path, size - length, length, reason)
        try:
            self.fs.ftruncate(self.fd, length)
            self.fs.fdatasync(self.fd)
        except OSError as exc:
            raise StoreIOError(self.path, "truncating the torn tail of", exc,
                               IOKind.RECOVER) from None

    def replace_with(self, chunks: Iterable[bytes],
                     before_rename: Callable[[], None] | None = None) -> None:
        """Write a new file through a temp file and rename it over the journal (always
        fsynced: a replaced journal must never come back empty)."""
        name, fd = self.new_temp()
        try:
            self.write_temp(fd, chunks)
        except BaseException:
            self.abandon_temp(name, fd)
            raise
        self.install_temp(name, fd, before_rename=before_rename)

    def new_temp(self) -> tuple[str, int]:
        """Create a temp file (a random name, ``O_EXCL``, 0600) for a new journal."""
        name = f"{TMP_PREFIX}{os.urandom(8).hex()}{TMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN
        try:
            fd = self.fs.open(name, flags, 0o600, self.dir_fd)
        except OSError as exc:
            raise StoreIOError(os.path.join(self.state_dir, name), "creating", exc,
                               IOKind.REWRITE) from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
        except OSError as exc:
            self.abandon_temp(name, fd)
            raise StoreIOError(os.path.join(self.state_dir, name), "creating", exc,
                               IOKind.REWRITE) from None
        return name, fd

    def claim_compaction_temp(self) -> int | None:
        """Open and flock the one temp file of a compaction that runs beside the store lock
        (``COMPACTING_NAME``), emptied; None when another process is writing it. Its flock
        tells ``remove_stale_temps`` that it is in use, and a crashed writer's is released."""
        path = os.path.join(self.state_dir, COMPACTING_NAME)
        try:
            fd = self.fs.open(COMPACTING_NAME, os.O_RDWR | os.O_CREAT | _OPEN, 0o600,
                              self.dir_fd)
        except OSError as exc:
            if exc.errno in _IO_ERRNOS:
                raise StoreIOError(path, "creating", exc, IOKind.REWRITE) from None
            raise _unsafe(path, exc, "compaction temp file") from None
        try:
            if not try_flock(fd):
                self.fs.close(fd)
                return None
            # removed between our open and our flock (by remove_stale_temps)? then the
            # name is not ours: leave the compaction to a later write
            st = os.fstat(fd)
            now = os.stat(COMPACTING_NAME, dir_fd=self.dir_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                self.fs.close(fd)
                return None
            self._check_regular(fd, path, "compaction temp file")
            self.fs.ftruncate(fd, 0)
        except FileNotFoundError:
            self.fs.close(fd)
            return None
        except OSError as exc:
            self.abandon_temp(COMPACTING_NAME, fd)
            raise StoreIOError(path, "preparing", exc, IOKind.REWRITE) from None
        return fd

    def write_temp(self, fd: int, chunks: Iterable[bytes]) -> None:
        """Write ``chunks`` to a temp file and fsync it."""
        try:
            for chunk in chunks:
                self._write_all(fd, chunk)
            failpoints.hit("compact.after_tmp_write")
            self.fs.fsync(fd)
            failpoints.hit("compact.after_tmp_sync")
        except OSError as exc:
            raise StoreIOError(self.path, "rewriting", exc, IOKind.REWRITE) from None

    def install_temp(self, name: str, fd: int, tail: bytes = b"",
                     before_rename: Callable[[], None] | None = None) -> None:
        """Append ``tail`` to a written temp file (fsynced when not empty), rename it over
        the journal, close it, then fsync the directory. Call with the lock held. The temp
        file is closed only once it is the journal: the temp file of a compaction beside the
        lock is flocked until it is closed, and another process that claimed it between a
        close and the rename would empty it (``claim_compaction_temp``), and the rename would
        then put an empty journal in place. ``before_rename`` runs once the temp file is
        synced, just before the rename (the store records the new file as synced there:
        ``Vouch``)."""
        try:
            if tail:
                self._write_all(fd, tail)
                self.fs.fsync(fd)
            if before_rename is not None:
                before_rename()
            self.fs.replace(name, DATA_NAME, self.dir_fd)
        except OSError as exc:
            self.abandon_temp(name, fd)
            raise StoreIOError(self.path, "rewriting", exc, IOKind.REWRITE) from None
        with contextlib.suppress(OSError):  # written, synced and in place: nothing to lose
            self.fs.close(fd)
        failpoints.hit("compact.after_replace")
        try:
            self.fs.fsync(self.dir_fd)
        except OSError as exc:
            raise StoreIOError(self.state_dir, "syncing the directory", exc,
                               IOKind.SYNC_DIR) from None

    def stage(self, fd: int, data: bytes | None = None, *, copy_to: int = 0,
              sync: bool = False) -> None:
        """Write to the temp file of a staged import (``new_temp``): first the journal's
        first ``copy_to`` bytes (read a megabyte at a time), then ``data``; with ``sync``,
        fsync it. ``StoreIOError`` (``IOKind.REWRITE``) on failure: the journal itself is
        not touched."""
        assert self.fd is not None
        pos = 0
        try:
            while pos < copy_to:
                chunk = self.fs.pread(self.fd, min(_READ_CHUNK, copy_to - pos), pos)
                if not chunk:
                    raise OSError(errno.EIO, "the journal ended before the bytes this "
                                  f"process read ({pos} of {copy_to})")
                self._write_all(fd, chunk)
                pos += len(chunk)
            if data:
                self._write_all(fd, data)
            if sync:
                self.fs.fsync(fd)
        except OSError as exc:
            raise StoreIOError(self.path, "staging an import into", exc,
                               IOKind.REWRITE) from None

    def abandon_temp(self, name: str, fd: int | None) -> None:
        """Remove and close a temp file that will not be installed; removed first, while a
        compaction's temp file is still flocked, so that the name cannot be another
        process's claim by then."""
        with contextlib.suppress(OSError):
            self.fs.unlink(name, self.dir_fd)
        if fd is not None:
            with contextlib.suppress(OSError):
                self.fs.close(fd)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.fs.write(fd, view):]

    def remove_stale_temps(self) -> None:
        """Remove temp files a crashed compaction left (call with the lock held)."""
        try:
            names = os.listdir(self.dir_fd)
        except OSError:
            return
        for name in names:
            if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    self._remove_stale_temp(name)

    def _remove_stale_temp(self, name: str) -> None:
        """Remove one temp file if it is a regular file of ours that nobody holds."""
        st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _OPEN, dir_fd=self.dir_fd)
        try:  # one that a compaction beside the lock is writing is flocked: in use
            if os.fstat(fd).st_ino == st.st_ino and try_flock(fd):
                self.fs.unlink(name, self.dir_fd)
        finally:
            os.close(fd)


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


def check(state_dir: str | os.PathLike[str], *, lock_timeout: float = 30.0) -> CheckReport:
    """Verify a whole journal (header, checksums, sequence, fields, torn tail, damage) without
    modifying anything; waits up to ``lock_timeout`` for the store lock when the lock file
    exists (``LockTimeoutError``). On a read-only copy or mount the lock file is opened for
    reading (enough to lock it), or, when even that fails, the file is read without it."""
    state_dir = os.fspath(state_dir)
    path = os.path.join(state_dir, DATA_NAME)
    lock_path = os.path.join(state_dir, LOCK_NAME)
    dir_fd = open_state_dir(state_dir, create=False)
    lock_fd = -1
    vouch = None
    notes: list[str] = []
    try:
        try:
            lock_fd = os.open(LOCK_NAME, os.O_RDWR | _OPEN, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE:
                raise _unsafe(lock_path, exc, "lock file") from None
            try:
                lock_fd = os.open(LOCK_NAME, os.O_RDONLY | _OPEN, dir_fd=dir_fd)
            except OSError as again:
                notes.append(f"the file was read without the store's lock ({lock_path}: "
                             f"{again.strerror}): a write in progress elsewhere would show "
                             "as a torn tail")
        if lock_fd >= 0:
            opened, lock_fd = lock_fd, -1
            lock_fd = _lock_at_path(opened, dir_fd, lock_path, lock_timeout)
            vouch = read_vouch(lock_fd)
        try:
            fd = os.open(DATA_NAME, os.O_RDONLY | _OPEN, dir_fd=dir_fd)
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


def _lock_at_path(fd: int, dir_fd: int, lock_path: str, timeout: float) -> int:
    """flock the lock file open as ``fd`` (closed on failure), then check, with one
    ``stat``, that it is still the file at its path: one deleted or replaced meanwhile
    excludes no store that opens it now, so the file at the path is opened (created 0600
    when missing, as a store does) and locked instead, within the same ``timeout``.
    Returns the locked descriptor."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            opened = os.fstat(fd)
            flock_until(fd, deadline, lock_path, timeout)
            now: os.stat_result | None = os.stat(LOCK_NAME, dir_fd=dir_fd,
                                                 follow_symlinks=False)
        except FileNotFoundError:
            now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
            return fd
        os.close(fd)
        if time.monotonic() >= deadline:
            raise LockTimeoutError(lock_path, timeout)
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _OPEN, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            raise _unsafe(lock_path, exc, "lock file") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise UnsafeStoreError(lock_path, "the lock file is not a regular file of yours",
                                   "move it away and retry")


def _check_bytes(buf: bytes, path: str, vouch: Vouch | None = None,
                 source: tuple[Read, int] | None = None) -> CheckReport:
    """Check the journal's bytes: ``buf``, or, with ``source``, the ``size`` bytes that
    ``read`` reads, scanned a megabyte at a time with a running CRC and seq check."""
    read, size = source if source is not None else (buffer_reader(buf, 0), len(buf))
    if not size:
        problem = Problem(0, 1, "the file is empty", "move it away to start a new store")
        return CheckReport(path, 0, 0, 0, 0, (problem,))
    first = _first_line(read, min(size, LINE_LIMIT + 1))
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
    for chunk_at, chunk in _chunks(read, start, size):
        result = scan(chunk, chunk_at, cur)
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
            if codec.fields_sound(data):  # as this library writes them: no Run needed
                continue
            try:
                codec.run_from_dict(data)
            except codec.BadLine as exc:
                line_no = newlines + chunk.count(b"\n", 0, offset - chunk_at) + 1
                problems.append(Problem(offset, line_no, f"run {data.get('id')!r}: {exc.reason}",
                                        "restore the file from a backup or fix the record "
                                        "by hand"))
        if result.damage is not None:
            damage = result.damage
            damage_line = newlines + chunk.count(b"\n", 0, damage.offset - chunk_at) + 1
            break
        newlines += chunk.count(b"\n")
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


def _first_line(read: Read, limit: int) -> bytes:
    """The file's first line with its newline, read ``_READ_CHUNK`` at a time; without a
    newline in the first ``limit`` bytes, those bytes. (Reading ``limit`` bytes at once
    would hold up to ``LINE_LIMIT`` of the file for a header of a few hundred bytes.)"""
    parts: list[bytes] = []
    pos = 0
    while pos < limit:
        chunk = read(pos, min(_READ_CHUNK, limit - pos))
        if not chunk:
            break
        nl = chunk.find(b"\n")
        if nl >= 0:
            parts.append(chunk[:nl + 1])
            break
        parts.append(chunk)
        pos += len(chunk)
    return b"".join(parts)


def _chunks(read: Read, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """The bytes ``start:end`` as (offset, chunk) pairs of whole lines, about
    ``_READ_CHUNK`` each; a line longer than ``LINE_LIMIT`` ends it (its start is the last
    chunk, which a scan then finds incomplete), as does a line without its end."""
    pos, parts, pending = start, [], 0  # parts: a line begun and not yet ended
    while pos < end:
        chunk = read(pos, min(_READ_CHUNK, end - pos))
        if not chunk:
            break
        pos += len(chunk)
        cut = chunk.rfind(b"\n") + 1 if pos < end else len(chunk)
        if cut:
            parts.append(chunk[:cut] if cut < len(chunk) else chunk)
            yield pos - len(chunk) - pending, b"".join(parts)
            parts, pending = [chunk[cut:]] if cut < len(chunk) else [], len(chunk) - cut
        else:  # joined once its end is found: linear however long the line
            parts.append(chunk)
            pending += len(chunk)
            if pending > LINE_LIMIT:  # yield its start: the reader judges it streamed
                yield pos - pending, parts[0]
                return
    if parts:
        yield pos - pending, b"".join(parts)
