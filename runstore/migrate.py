"""Copy every run of one store into another and prove the copy (``copy_runs``; the command
``runstore migrate``). Not to be confused with a PostgreSQL schema upgrade
(``pgschema.upgrade_schema``), which changes a table, not where the runs are.

Written against ``RunStore`` only, so it copies file -> PostgreSQL (the case it exists for),
file -> file or PostgreSQL -> file alike. One call, two steps, each reading its stores as it
goes (memory does not grow with the number of runs, beyond a file target's own index):

1. copy: the source's runs (every field, and the fields runstore does not know) are read
   one at a time and imported in one all-or-nothing import of the target's: a run already
   in the target with identical content is skipped, a run with the same id and different
   content is a conflict (``MigrationConflictError``, naming the run and the fields that
   differ; nothing is imported);
2. verify: read the target again and compare the count and a checksum of the source's runs
   with the same ids in the target (``MigrationVerifyError`` when they differ).

Running it again after a successful copy copies nothing and verifies again
(idempotent). The checksum is the SHA-256 of the canonical JSON (``_fields.run_to_json``, keys
sorted, one run per line, sorted by id) of every run; it covers every field of ``Run``,
``revision`` and the owner fields included, but not the unknown extra fields a file record
may carry (they are copied when the target keeps them).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import io
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import IO, Any

import attrs
import orjson

from . import _fields
from .errors import RunstoreError
from .model import Run
from .protocol import RunStore

_CANONICAL = orjson.OPT_UTC_Z | orjson.OPT_SORT_KEYS  # run_to_json's times, sorted keys
#: ``progress(label)`` -> a context manager around one step (the CLI draws a bar on a tty)
Progress = Callable[[str], AbstractContextManager[Any]]


class MigrationConflictError(RunstoreError, ValueError):
    """The target already holds a run with a source run's id but different content."""

    def __init__(self, run_id: str, target: str, fields: Sequence[str]) -> None:
        self.run_id = run_id
        self.target = target
        self.fields = tuple(fields)
        super().__init__(
            f"run {run_id!r} is already in {target} with different content (fields differ: "
            f"{', '.join(self.fields)}); nothing was imported. One copy changed after the "
            "other was made (a dispatcher still using the source?): compare them with "
            f"`runstore show {run_id}` on both stores, then migrate into an empty target once "
            "the source is quiet")

    def __reduce__(self) -> tuple[type[MigrationConflictError], tuple[str, str, tuple[str, ...]]]:
        return type(self), (self.run_id, self.target, self.fields)


class MigrationVerifyError(RunstoreError):
    """After copying, the target's copy of the source's runs differs in count or checksum."""

    def __init__(self, target: str, expected_count: int, found_count: int,
                 expected_checksum: str, found_checksum: str) -> None:
        self.target = target
        self.expected_count = expected_count
        self.found_count = found_count
        self.expected_checksum = expected_checksum
        self.found_checksum = found_checksum
        super().__init__(
            f"verification failed: {target} holds {found_count} of the source's "
            f"{expected_count} runs with checksum {found_checksum[:16]}…, expected "
            f"{expected_checksum[:16]}…; the copy is not faithful: do not switch dispatchers "
            "to it; check that nothing else writes to the target and migrate again")

    def __reduce__(self) -> tuple[type[MigrationVerifyError], tuple[str, int, int, str, str]]:
        return type(self), (self.target, self.expected_count, self.found_count,
                            self.expected_checksum, self.found_checksum)


@attrs.frozen
class MigrationReport:
    """What ``copy_runs`` did and what it verified."""

    source_runs: int
    """runs in the source"""
    copied: int
    """runs imported into the target by this call"""
    skipped: int
    """runs already in the target with identical content"""
    target_runs: int
    """runs in the target afterwards (more than the source's when it held others)"""
    verified: int
    """source runs found identical in the target afterwards"""
    checksum: str
    """SHA-256 of the source's runs (see ``checksum``)"""
    target_checksum: str
    """SHA-256 of the target's runs with the source's ids"""
    source_changed: bool
    """the source's last sequence number moved while migrating (dispatchers still running)"""

    @property
    def ok(self) -> bool:
        return self.verified == self.source_runs and self.checksum == self.target_checksum


def canonical(run: Run) -> bytes:
    """The canonical JSON of a run: the record of ``_fields.run_to_json`` (RFC 3339 UTC times
    with ``Z``, empty optional fields omitted) with sorted keys and no whitespace."""
    return orjson.dumps(_fields.run_to_dict(run), option=_CANONICAL)


def checksum(runs: Iterable[Run]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``runs``, one per line, sorted by id."""
    return _digest({run.id: canonical(run) for run in runs})


def _digest(canonical_by_id: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for run_id in sorted(canonical_by_id):
        digest.update(canonical_by_id[run_id])
        digest.update(b"\n")
    return digest.hexdigest()


def _differing_fields(a: bytes, b: bytes) -> list[str]:
    """The fields (in ``Run``'s order) whose values differ between two canonical runs."""
    ja, jb = orjson.loads(a), orjson.loads(b)
    return [k for k in _fields.RUN_FIELDS if ja.get(k) != jb.get(k)]


#: bytes of (id, canonical JSON) lines a ``_Spool`` keeps before it sorts them into a temp file
SPOOL_BYTES = 16 << 20


class _Spool:
    """(run id, canonical JSON) pairs in any order, given back sorted by id: kept in memory
    up to ``SPOOL_BYTES``, beyond that sorted into anonymous temp files (deleted when
    closed) and merged as they are read back. Each pair is one line ``id NUL json``: an id
    holds no NUL and canonical JSON no newline, and bytes sort as the ids' code points."""

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._size = 0
        self._files: list[IO[bytes]] = []
        self.count = 0

    def add(self, run_id: str, data: bytes) -> None:
        line = run_id.encode() + b"\0" + data + b"\n"
        self._lines.append(line)
        self._size += len(line)
        self.count += 1
        if self._size >= SPOOL_BYTES:
            self._spill()

    def _spill(self) -> None:
        self._lines.sort()
        fp = tempfile.TemporaryFile()  # noqa: SIM115  # closed by close()
        self._files.append(fp)
        fp.writelines(self._lines)
        fp.seek(0)
        self._lines, self._size = [], 0

    def sorted(self) -> Iterator[tuple[bytes, bytes]]:
        """Every pair as (id, canonical JSON), sorted by id."""
        self._lines.sort()
        for line in heapq.merge(self._lines, *self._files):
            run_id, _, data = line[:-1].partition(b"\0")
            yield run_id, data

    def close(self) -> None:
        for fp in self._files:
            fp.close()
        self._files, self._lines = [], []


def _stream(store: RunStore) -> Iterator[tuple[Run, dict[str, Any]]]:
    """Every run of ``store`` with its extra fields, read as iterated (both backends have
    ``_iter_export``; any other ``RunStore`` is read whole through ``export``)."""
    stream: Callable[[], Iterator[tuple[Run, dict[str, Any]]]] | None = getattr(
        store, "_iter_export", None)
    if stream is not None:
        yield from stream()
        return
    buf = io.BytesIO()
    store.export(buf)
    for record in orjson.loads(buf.getvalue()):
        yield _fields.run_from_dict(record), _fields.extra_fields(record)


def _import(target: RunStore, records: Iterator[tuple[int, Run, dict[str, Any]]],
            on_conflict: Callable[[Run, Run], None]) -> int:
    """``target._import_runs`` (both backends), or for any other ``RunStore`` the runs not
    in ``target`` through ``import_runs``, after the same checks."""
    stream_import: Callable[..., int] | None = getattr(target, "_import_runs", None)
    if stream_import is not None:
        return stream_import(records, on_conflict)
    existing = {run.id: run for run in target.list()}
    missing: list[Run | dict[str, Any]] = []
    for _n, run, extra in records:
        there = existing.get(run.id)
        if there is None:
            missing.append({**_fields.run_to_json(run), **extra})
        elif there != run:
            on_conflict(there, run)
    return target.import_runs(missing) if missing else 0


def copy_runs(source: RunStore, target: RunStore, *, target_name: str = "the target",
              progress: Progress | None = None) -> MigrationReport:
    """Copy every run of ``source`` missing from ``target``, then verify the copy.

    Raises ``MigrationConflictError`` (nothing imported) when the target holds a source id
    with other content, whatever ``import_runs`` raises (e.g. ``InvalidRunError`` for a
    machine that already has another active run in the target; nothing imported), and
    ``MigrationVerifyError`` when the verification fails. ``target_name`` names the target in
    messages (pass it without a password).

    Memory does not grow with the number of runs (beyond a file target's own index): the
    source is read as it is copied, in one ``import_runs``-like call that skips the runs
    already in the target with identical content, and each side's canonical JSON is
    spooled (sorted in temp files past ``SPOOL_BYTES``) for the checksums.
    """
    step = progress or (lambda _label: contextlib.nullcontext())
    source_side, target_side = _Spool(), _Spool()
    try:
        seq_before = source.last_seq()

        def records() -> Iterator[tuple[int, Run, dict[str, Any]]]:
            for n, (run, extra) in enumerate(_stream(source), 1):
                source_side.add(run.id, canonical(run))
                yield n, run, extra

        def conflict(there: Run, run: Run) -> None:
            raise MigrationConflictError(run.id, target_name,
                                         _differing_fields(canonical(run), canonical(there)))

        with step("copying the source's runs"):
            copied = _import(target, records(), conflict)
        with step("verifying"):
            for run, _extra in _stream(target):
                target_side.add(run.id, canonical(run))
            expected, found = hashlib.sha256(), hashlib.sha256()
            verified = 0
            theirs = target_side.sorted()
            there = next(theirs, None)
            for run_id, data in source_side.sorted():
                expected.update(data + b"\n")
                while there is not None and there[0] < run_id:
                    there = next(theirs, None)
                if there is not None and there[0] == run_id:
                    found.update(there[1] + b"\n")
                    verified += there[1] == data
            changed = source.last_seq() != seq_before
    finally:
        source_side.close()
        target_side.close()
    count = source_side.count
    report = MigrationReport(
        source_runs=count, copied=copied, skipped=count - copied,
        target_runs=target_side.count, verified=verified, checksum=expected.hexdigest(),
        target_checksum=found.hexdigest(), source_changed=changed)
    if not report.ok:
        raise MigrationVerifyError(target_name, count, verified, report.checksum,
                                   report.target_checksum)
    return report


#: the name ``copy_runs`` had before 0.1.0 (kept for callers)
migrate = copy_runs
