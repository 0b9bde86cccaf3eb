"""The throwaway PostgreSQL server of the tests (``tests/pg_server.py``), for the benchmarks."""

from tests.pg_server import (
    available,
    crash_and_restart,
    dsn_for,
    postgres_bin_dir,
    throwaway_postgres,
)

__all__ = ["available", "crash_and_restart", "dsn_for", "postgres_bin_dir", "throwaway_postgres"]
