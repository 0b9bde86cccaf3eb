"""Fixtures of the PostgreSQL backend's tests: a fresh table on the session's throwaway
server (``pg``), and stores opened on it that are closed when the test ends (``opened``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from backends import Backend, fresh_table

from runstore.postgres import PostgresStore


@pytest.fixture
def pg(pg_dsn: str) -> Backend:
    """A fresh table on the session's server."""
    return Backend("postgres", pg_dsn, fresh_table())


@pytest.fixture
def opened(pg: Backend) -> Iterator[Callable[..., PostgresStore]]:
    """Open PostgresStores on ``pg``'s table; all are closed when the test ends."""
    stores: list[PostgresStore] = []

    def open_(**options: Any) -> PostgresStore:
        s = pg.open(**options)
        assert isinstance(s, PostgresStore)
        stores.append(s)
        return s

    try:
        yield open_
    finally:
        for s in stores:
            s.close()
