"""What the lock file records about the journal: a clean close, a checkpoint or a
compaction writes at its start how many bytes of which journal were synced (``Vouch``), out
of reach of a cut of the journal, so that a journal later found missing or shorter than that
is reported as lost or cut (``missing_error``, ``cut_error``), never mistaken for a torn
write or an empty store."""

from __future__ import annotations

import os

import attrs

from . import _codec, _fields
from ._fsio import sync_data
from ._scan import Header
from ._statedir import LOCK_NAME
from .errors import CorruptStoreError

#: how many bytes at the start of the lock file hold the vouch (``Vouch``)
_VOUCH_SIZE = 4096


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
        return _codec.seal_line({"vouch": self.by, "store_id": self.store_id,
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
            line = _codec.decode_line(data[:nl])
        except _fields.BadLine:
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
        sync_data(lock_fd)


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

