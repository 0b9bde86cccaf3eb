"""Copy every run of one store into another and prove the copy: ``runstore migrate``.

Written against ``RunStore`` only, so it copies file -> PostgreSQL (the case it exists for),
file -> file or PostgreSQL -> file alike. One call, three steps:

1. read the source (``export``: every run with the fields runstore does not know) and the
   target (``list``);
2. compare by id: a run already in the target with identical content is skipped, a run with
   the same id and different content is a conflict (``MigrationConflictError``, naming the
   run and the fields that differ; nothing is imported), the rest is imported in one
   ``import_runs`` call, all or nothing;
3. verify: read the target again and compare the count and a checksum of the source's runs
   with the same ids in the target (``MigrationVerifyError`` when they differ).

Running it again after a successful migration copies nothing and verifies again
(idempotent). The checksum is the SHA-256 of the canonical JSON (``codec.run_to_json``, keys
sorted, one run per line, sorted by id) of every run; it covers every field of ``Run``,
``revision`` and the owner fields included, but not the unknown extra fields a file record
may carry (they are copied when the target keeps them).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import attrs
import orjson

from . import codec
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
    """What ``migrate`` did and what it verified."""

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
    """The canonical JSON of a run: the record of ``codec.run_to_json`` (RFC 3339 UTC times
    with ``Z``, empty optional fields omitted) with sorted keys and no whitespace."""
    return orjson.dumps(codec.run_to_dict(run), option=_CANONICAL)


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
    return [k for k in codec.RUN_FIELDS if ja.get(k) != jb.get(k)]


def _read_source(source: RunStore) -> list[dict[str, Any]]:
    """Every source run as a record dict (with unknown extra fields, which ``list`` drops)."""
    buf = io.BytesIO()
    source.export(buf)
    records: list[dict[str, Any]] = orjson.loads(buf.getvalue())
    return records


def migrate(source: RunStore, target: RunStore, *, target_name: str = "the target",
            progress: Progress | None = None) -> MigrationReport:
    """Copy every run of ``source`` missing from ``target``, then verify the copy.

    Raises ``MigrationConflictError`` (nothing imported) when the target holds a source id
    with other content, whatever ``import_runs`` raises (e.g. ``InvalidRunError`` for a
    machine that already has another active run in the target; nothing imported), and
    ``MigrationVerifyError`` when the verification fails. ``target_name`` names the target in
    messages (pass it without a password).
    """
    step = progress or (lambda _label: contextlib.nullcontext())
    # Only the canonical bytes of each run are kept (not Run objects), and only the records
    # still to be imported: a store of N runs costs about N x (a record + its JSON) here.
    with step("reading the source"):
        seq_before = source.last_seq()
        records = _read_source(source)
        wanted: dict[str, bytes] = {}
        for record in records:
            wanted[record["id"]] = canonical(codec.run_from_dict(record))
    with step("reading the target"):
        existing = {run.id: canonical(run) for run in target.list()}
    missing: list[dict[str, Any]] = []
    for record in records:
        there = existing.get(record["id"])
        if there is None:
            missing.append(record)
        elif there != wanted[record["id"]]:
            raise MigrationConflictError(record["id"], target_name,
                                         _differing_fields(wanted[record["id"]], there))
    del records, existing
    if missing:
        with step(f"copying {len(missing):,} runs"):
            target.import_runs(missing)
    copied = len(missing)
    del missing
    with step("verifying"):
        expected = _digest(wanted)
        found = {run.id: canonical(run) for run in target.list() if run.id in wanted}
        target_checksum = _digest(found)
        verified = sum(1 for run_id, data in found.items() if data == wanted[run_id])
        target_runs = target.stats().runs
        changed = source.last_seq() != seq_before
    report = MigrationReport(
        source_runs=len(wanted), copied=copied, skipped=len(wanted) - copied,
        target_runs=target_runs, verified=verified, checksum=expected,
        target_checksum=target_checksum, source_changed=changed)
    if not report.ok:
        raise MigrationVerifyError(target_name, len(wanted), verified, expected,
                                   target_checksum)
    return report
