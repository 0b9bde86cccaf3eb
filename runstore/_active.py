"""``ActiveRuns``: the non-terminal runs of a store's view, in insertion order.

A version read from another process's writes is kept as its decoded record and structured
into a ``Run`` only when first asked for. In a busy store most of them are superseded (a run
is created, started, then finished by its owner) before this process ever looks at them,
and structuring a record is the costliest step of catching up with the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import _fields
from .errors import CorruptStoreError
from .model import Run

_Unread = tuple[int, dict[str, Any]]  # (offset in the journal, the decoded record)


class ActiveRuns:
    """A mapping run id -> ``Run`` for the non-terminal runs; ``put_unread`` defers the
    structuring, and a malformed record then raises ``CorruptStoreError`` when read."""

    __slots__ = ("_path", "_runs")

    def __init__(self, path: str) -> None:
        self._path = path
        self._runs: dict[str, Run | _Unread] = {}

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._runs)

    def put(self, run_id: str, run: Run) -> None:
        self._runs[run_id] = run

    def put_unread(self, run_id: str, offset: int, data: dict[str, Any]) -> None:
        """Keep a record whose ``machine`` is known to be a string, to structure later."""
        self._runs[run_id] = (offset, data)

    def discard(self, run_id: str) -> None:
        del self._runs[run_id]

    def machine(self, run_id: str) -> str | None:
        """The machine of a non-terminal run (without structuring it), or None."""
        value = self._runs.get(run_id)
        if value is None:
            return None
        if isinstance(value, Run):
            return value.machine
        machine: str = value[1]["machine"]
        return machine

    def get(self, run_id: str) -> Run | None:
        value = self._runs.get(run_id)
        if value is None or isinstance(value, Run):
            return value
        return self._read(run_id, value)

    def __getitem__(self, run_id: str) -> Run:
        value = self._runs[run_id]
        return value if isinstance(value, Run) else self._read(run_id, value)

    def values(self) -> list[Run]:
        return [self[run_id] for run_id in list(self._runs)]

    def _read(self, run_id: str, unread: _Unread) -> Run:
        offset, data = unread
        try:
            run = _fields.run_from_dict(data)
        except _fields.BadLine as exc:
            raise CorruptStoreError(self._path, offset,
                                    f"run {run_id!r} has a malformed field: {exc.reason}"
                                    ) from None
        self._runs[run_id] = run
        return run
