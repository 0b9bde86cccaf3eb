"""``RunStore``: the one contract both backends keep (``Store`` on a file, ``PostgresStore``).

A structural ``typing.Protocol``: code written against ``RunStore`` runs unchanged on either
backend, and mypy checks that each backend has every method with these exact signatures.
The contract itself (what each method does, which error it raises) is documented once, on
``runstore._base.StoreBase``, which both backends derive from, and exercised by the same
test suite against both backends.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Protocol

from .model import BatchSummary, Change, PrepareOutcome, Run, Status, StoreStats

_Runs = list[Run]  # inside the class, ``list`` names the method


class RunStore(Protocol):
    """What a dispatcher may call on any run store. See ``StoreBase`` for each method."""

    durable: bool
    lock_timeout: float

    def prepare_atomic(
        self, machine: str, test_dir_hash: str, make: Callable[[], Run], *, reap: bool = False
    ) -> tuple[Run, PrepareOutcome]: ...

    def create(self, run: Run) -> Run: ...

    def get(self, run_id: str) -> Run: ...

    def update(self, run: Run) -> Run: ...

    def start(self, run_id: str) -> Run: ...

    def finish(
        self,
        run_id: str,
        status: Status | str,
        *,
        exit_code: int | None = None,
        error_code: str = "",
        error_msg: str = "",
    ) -> Run: ...

    def heartbeat(self, run_id: str) -> Run: ...

    def list(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
    ) -> _Runs: ...

    def iter_runs(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
    ) -> Iterator[Run]: ...

    def active_by_machine(self, machine: str) -> Run | None: ...

    def active(self) -> _Runs: ...

    def find_by_test_dir_hash_and_machine(self, test_dir_hash: str, machine: str) -> _Runs: ...

    def compact(self) -> None: ...

    def reap(self, *, stale_after: _dt.timedelta, dry_run: bool = False) -> _Runs: ...

    def prune(
        self,
        *,
        older_than: _dt.timedelta | None = None,
        keep_last: int | None = None,
        archive: str | os.PathLike[str] | None = None,
        dry_run: bool = False,
    ) -> int: ...

    def batch_summary(self, batch_id: str) -> BatchSummary: ...

    def changes(self, since_seq: int = 0) -> Iterator[Change]: ...

    def last_seq(self) -> int: ...

    def watch(
        self,
        since_seq: int | None = None,
        *,
        timeout: float | None = None,
        poll_interval: float = 0.005,
    ) -> Iterator[Change]: ...

    def export(self, fp: IO[str] | IO[bytes] | str | os.PathLike[str]) -> int: ...

    def import_runs(
        self, source: IO[str] | IO[bytes] | Iterable[Run | dict[str, Any]]
    ) -> int: ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...

    def __enter__(self) -> RunStore: ...

    def __exit__(self, *exc: object) -> None: ...
