"""The connections of one ``PostgresStore`` in one process: at most ``size`` in use at
once, idle ones kept for the next call. No thread of its own, no query per checkout: an idle
connection is checked by polling its socket (``usable``), which costs one system call and no
round trip. A connection given back inside a transaction, or broken, is closed instead of
kept. In a forked child the store builds a new pool; the parent's is left untouched.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from psycopg import pq

_Conn = psycopg.Connection[Any]


class PoolTimeout(Exception):
    """No connection became free within the pool's timeout."""


class ConnectFailed(Exception):
    """A new connection could not be made (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def usable(conn: _Conn) -> bool:
    """False when ``conn`` is closed or its server ended it: an idle connection has
    nothing to read unless the server sent an error and closed the socket."""
    if conn.closed or conn.broken:
        return False
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    return not readable


class Pool:
    """Up to ``size`` connections made by ``connect``; ``timeout`` seconds at most waited
    for one to be free."""

    def __init__(self, connect: Callable[[], _Conn], size: int, timeout: float) -> None:
        self._connect = connect
        self.size = size
        self.timeout = timeout
        self._idle: list[_Conn] = []
        self._in_use = 0
        self._waiting = 0
        # one C lock for the common case; its condition only when all connections are out
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[_Conn]:
        """A connection for the ``with`` block (made when no idle one is usable)."""
        conn = self.get()
        try:
            yield conn
        finally:
            self.put(conn)

    def get(self) -> _Conn:
        """A connection, to be given back with ``put`` (``connection`` does both)."""
        with self._cond:
            if self._in_use >= self.size:
                self._wait_for_one()
            self._in_use += 1
            conn = self._idle.pop() if self._idle else None
        try:
            while conn is not None and not usable(conn):
                conn.close()
                with self._cond:
                    conn = self._idle.pop() if self._idle else None
            return conn if conn is not None else self._new()
        except BaseException:
            self._release()
            raise

    def _wait_for_one(self) -> None:
        """Under the lock: wait until a connection is given back, at most ``timeout``."""
        deadline = time.monotonic() + self.timeout
        self._waiting += 1
        try:
            while self._in_use >= self.size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolTimeout(f"all {self.size} connections stayed busy")
                self._cond.wait(left)
        finally:
            self._waiting -= 1

    def _new(self) -> _Conn:
        try:
            return self._connect()
        except psycopg.Error as exc:
            text = str(exc).strip().splitlines()
            raise ConnectFailed(text[0] if text else type(exc).__name__) from None

    def put(self, conn: _Conn) -> None:
        """Give back a connection ``get`` returned."""
        keep = (not self._closed and not conn.closed and not conn.broken
                and conn.info.transaction_status == pq.TransactionStatus.IDLE)
        if not keep:
            conn.close()
        with self._cond:
            if keep:
                self._idle.append(conn)
            self._in_use -= 1
            if self._waiting:
                self._cond.notify()

    def _release(self) -> None:
        with self._cond:
            self._in_use -= 1
            if self._waiting:
                self._cond.notify()

    def close(self) -> None:
        """Close the idle connections; those in use are closed when given back."""
        self._closed = True
        with self._cond:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
