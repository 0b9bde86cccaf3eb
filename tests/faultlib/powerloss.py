"""Power-loss emulation: ``RecordingFS`` is a ``FileSystem`` that logs every write (file,
offset, bytes), sync, truncate, create, rename and unlink the store performs;
``crash_states`` turns a prefix of that log into the files a power loss could leave behind
(unsynced writes dropped, torn, zeroed, replaced by garbage; directory changes persisted in
order up to an unsynced point)."""

from __future__ import annotations

import errno
import itertools
import os
import random
import stat
from collections.abc import Iterator, Sequence

import attrs

from runstore._fsio import FileSystem

# -- a recording file system and the crash states it implies --------------------------------


@attrs.frozen
class Op:
    """One logged file-system operation. ``file`` numbers an inode (0 for directory ops)."""

    kind: str  # create | write | truncate | sync | lostsync | dirsync | rename | unlink
    file: int = 0
    offset: int = 0
    data: bytes = b""
    name: str = ""
    dst: str = ""


class RecordingFS(FileSystem):
    """Performs every operation and logs it. ``initial`` names the files already in the
    directory (all durable). ``skip`` removes syncs from the store, as a bug would:
    "fdatasync", "fsync_file" (the temp file before its rename), "fsync_dir".
    ``fail_fdatasync`` fails those fdatasync calls (1-based) with EIO the way Linux may after
    a write-back error: the pages are marked clean without reaching the disk ("fsyncgate"),
    so the writes they held may be lost whatever later syncs say."""

    def __init__(self, initial: dict[str, bytes] | None = None, *,
                 skip: frozenset[str] = frozenset(),
                 fail_fdatasync: frozenset[int] = frozenset()) -> None:
        self.ops: list[Op] = []
        self.initial: dict[int, bytes] = {}
        self.initial_names: dict[int, str] = {}
        self.names: dict[str, int] = {}
        self.fds: dict[int, int] = {}
        self.appending: set[int] = set()
        self.opened: list[tuple[str, int]] = []  # (name, flags) of every open
        self.skip = skip
        self.fail_fdatasync = fail_fdatasync
        self.fdatasyncs = 0
        self._inodes = itertools.count(1)
        for name, data in (initial or {}).items():
            ino = next(self._inodes)
            self.initial[ino] = data
            self.initial_names[ino] = name
            self.names[name] = ino

    @property
    def position(self) -> int:
        return len(self.ops)

    def open(self, name: str, flags: int, mode: int, dir_fd: int) -> int:
        self.opened.append((name, flags))
        fd = super().open(name, flags, mode, dir_fd)
        if flags & os.O_CREAT and (flags & os.O_EXCL or name not in self.names):
            ino = next(self._inodes)
            self.names[name] = ino
            self.ops.append(Op("create", ino, name=name))
        elif name not in self.names:  # a file that was there before recording began
            ino = next(self._inodes)
            self.initial[ino] = os.pread(fd, 1 << 30, 0)
            self.initial_names[ino] = name
            self.names[name] = ino
        self.fds[fd] = self.names[name]
        if flags & os.O_APPEND:
            self.appending.add(fd)
        return fd

    def write(self, fd: int, data: bytes) -> int:
        ino = self.fds.get(fd)
        if ino is None:
            return super().write(fd, data)
        offset = os.fstat(fd).st_size if fd in self.appending else os.lseek(fd, 0, os.SEEK_CUR)
        n = super().write(fd, data)
        self.ops.append(Op("write", ino, offset, bytes(data[:n])))
        return n

    def ftruncate(self, fd: int, length: int) -> None:
        super().ftruncate(fd, length)
        if fd in self.fds:
            self.ops.append(Op("truncate", self.fds[fd], length))

    def _sync(self, fd: int, kind: str) -> None:
        if fd in self.fds:
            if kind in self.skip or (kind == "fsync" and "fsync_file" in self.skip):
                return
            if kind == "fdatasync":
                self.fdatasyncs += 1
                if self.fdatasyncs in self.fail_fdatasync:
                    self.ops.append(Op("lostsync", self.fds[fd]))
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
            getattr(os, kind)(fd)
            self.ops.append(Op("sync", self.fds[fd]))
        elif stat.S_ISDIR(os.fstat(fd).st_mode):
            if "fsync_dir" in self.skip:
                return
            os.fsync(fd)
            self.ops.append(Op("dirsync"))
        else:
            getattr(os, kind)(fd)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def fsync(self, fd: int) -> None:
        self._sync(fd, "fsync")

    def replace(self, src: str, dst: str, dir_fd: int) -> None:
        super().replace(src, dst, dir_fd)
        self.names[dst] = self.names.pop(src)
        self.ops.append(Op("rename", name=src, dst=dst))

    def unlink(self, name: str, dir_fd: int) -> None:
        super().unlink(name, dir_fd)
        self.names.pop(name, None)
        self.ops.append(Op("unlink", name=name))

    def close(self, fd: int) -> None:
        self.fds.pop(fd, None)
        self.appending.discard(fd)
        super().close(fd)


#: what a crash may do to one write that was not synced
WRITE_FATES = ("kept", "dropped", "torn", "zeros", "garbage")


@attrs.define
class Replay:
    """The log up to a crash point, digested: per inode its operations with a flag telling
    whether each is certainly on disk; the directory's certain entries and its unsynced
    changes in order."""

    file_ops: dict[int, list[tuple[Op, bool]]]
    initial: dict[int, bytes]
    dir_certain: dict[str, int]
    dir_pending: list[Op]

    def uncertain(self, inodes: set[int]) -> list[tuple[int, int]]:
        """(inode, index) of every operation of these inodes that may or may not be on disk."""
        return [(ino, i) for ino in sorted(inodes)
                for i, (_op, certain) in enumerate(self.file_ops.get(ino, ())) if not certain]


def replay(rec: RecordingFS, upto: int) -> Replay:
    """Digest ``rec.ops[:upto]``."""
    file_ops: dict[int, list[tuple[Op, bool]]] = {}
    lost: dict[int, set[int]] = {}
    certain_entries = {name: ino for ino, name in rec.initial_names.items()}
    pending: list[Op] = []
    for op in rec.ops[:upto]:
        if op.kind in ("write", "truncate"):
            file_ops.setdefault(op.file, []).append((op, False))
        elif op.kind == "sync":
            ops = file_ops.get(op.file, [])
            gone = lost.get(op.file, set())
            file_ops[op.file] = [(o, c or i not in gone) for i, (o, c) in enumerate(ops)]
        elif op.kind == "lostsync":  # these writes may never reach the disk now
            ops = file_ops.get(op.file, [])
            lost.setdefault(op.file, set()).update(i for i, (_o, c) in enumerate(ops) if not c)
        elif op.kind == "dirsync":
            for dop in pending:
                _apply_dir(certain_entries, dop)
            pending = []
        else:  # create, rename, unlink
            pending.append(op)
    return Replay(file_ops, rec.initial, certain_entries, pending)


def _apply_dir(entries: dict[str, int], op: Op) -> None:
    if op.kind == "create":
        entries[op.name] = op.file
    elif op.kind == "rename":
        if op.name in entries:
            entries[op.dst] = entries.pop(op.name)
    elif op.kind == "unlink":
        entries.pop(op.name, None)


def _write_at(buf: bytearray, offset: int, data: bytes) -> None:
    if offset > len(buf):
        buf.extend(bytes(offset - len(buf)))
    buf[offset:offset + len(data)] = data


def materialise(rp: Replay, dir_prefix: int, fates: dict[tuple[int, int], str],
                rng: random.Random) -> dict[str, bytes]:
    """The files of one crash state: the directory changes up to ``dir_prefix`` persisted,
    each uncertain file operation with its fate (default: dropped)."""
    entries = dict(rp.dir_certain)
    for op in rp.dir_pending[:dir_prefix]:
        _apply_dir(entries, op)
    files = {}
    for name, ino in entries.items():
        buf = bytearray(rp.initial.get(ino, b""))
        for i, (op, certain) in enumerate(rp.file_ops.get(ino, ())):
            fate = "kept" if certain else fates.get((ino, i), "dropped")
            if fate == "dropped":
                continue
            if op.kind == "truncate":
                del buf[op.offset:]
                continue
            data = op.data
            if fate == "torn":
                data = data[:rng.randrange(len(data))] if data else data
            elif fate == "zeros":
                data = bytes(len(data))
            elif fate == "garbage":
                data = rng.randbytes(len(data))
            _write_at(buf, op.offset, data)
        files[name] = bytes(buf)
    return files


def crash_states(rec: RecordingFS, rng: random.Random, *, exhaustive: bool, limit: int,
                 points: Sequence[int] | None = None
                 ) -> Iterator[tuple[int, dict[str, bytes]]]:
    """(crash point, files) pairs. Exhaustive: every crash point (or ``points``), every
    persisted prefix of the unsynced directory changes and every combination of fates of the
    unsynced writes, while that stays under ``limit`` states per point (else ``limit`` random
    ones). Otherwise ``limit`` random states at random crash points."""
    if not exhaustive:
        for _ in range(limit):
            k = rng.randrange(rec.position + 1) if points is None else rng.choice(points)
            rp = replay(rec, k)
            yield k, _random_state(rp, rng)
        return
    for k in (range(rec.position + 1) if points is None else points):
        rp = replay(rec, k)
        inodes = set(rp.dir_certain.values()) | {op.file for op in rp.dir_pending if op.file}
        slots = rp.uncertain(inodes)
        options = [WRITE_FATES if rp.file_ops[ino][i][0].kind == "write" else ("kept", "dropped")
                   for ino, i in slots]
        total = (len(rp.dir_pending) + 1)
        for o in options:
            total *= len(o)
        if total > limit:
            for _ in range(limit):
                yield k, _random_state(rp, rng)
            continue
        for prefix in range(len(rp.dir_pending) + 1):
            for combo in itertools.product(*options):
                yield k, materialise(rp, prefix, dict(zip(slots, combo, strict=True)), rng)


def _random_state(rp: Replay, rng: random.Random) -> dict[str, bytes]:
    inodes = set(rp.dir_certain.values()) | {op.file for op in rp.dir_pending if op.file}
    fates = {}
    for ino, i in rp.uncertain(inodes):
        if rp.file_ops[ino][i][0].kind == "write":
            fates[(ino, i)] = rng.choice(WRITE_FATES)
        else:
            fates[(ino, i)] = rng.choice(("kept", "dropped"))
    return materialise(rp, rng.randrange(len(rp.dir_pending) + 1), fates, rng)
