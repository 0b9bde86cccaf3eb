"""Shared fixtures: a fresh state directory, a store that is closed after the test, a
``make_run`` factory for the minimal run a dispatcher would prepare, and the backends.

The tests are grouped by what they test: ``unit/`` (one module each), ``contract/`` (the
store contract on both backends), ``filestore/`` (the file store beyond the contract),
``faults/`` (power loss, failpoints, SIGKILL, races, I/O errors, bad input, damage...),
``cli/``, ``postgres/`` and ``stress/`` (the stress command, concurrency, the benchmarks).
The helpers every test imports by name stay here at the top (``backends``, ``faults`` and
its modules in ``faultlib/``, ``pg_server``, ``strategies``, ``pieces``, ``demo_runs``).

Contract tests (modules marked ``pytest.mark.contract``: test_store.py, test_lifecycle.py) run
once per backend: every test that uses ``store``, ``open_store`` or ``backend`` is
parametrized ``[file]`` and ``[postgres]``. Everywhere else those fixtures are the file store.
The PostgreSQL server is started once per session from the installed binaries; without them
the ``[postgres]`` cases skip, saying why, unless ``RUNSTORE_REQUIRE_POSTGRES=1`` (CI), which
makes them fail instead.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from backends import Backend, fresh_table, pg_server, postgres_required, postgres_unavailable

from runstore import Run, RunStore, cli

BACKENDS = ("file", "postgres")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "contract: run the module's store tests on every backend (file, postgres)")
    config.addinivalue_line(
        "markers", "file_only: in a contract module, a test about the file store only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    node = metafunc.definition
    if ("backend" in metafunc.fixturenames and node.get_closest_marker("contract")
            and not node.get_closest_marker("file_only")):
        metafunc.parametrize("backend", [
            pytest.param(kind, marks=[pytest.mark.postgres] if kind == "postgres" else [])
            for kind in BACKENDS], indirect=True)


def make_run(
    machine: str = "m1", test_dir: str = "/tests/a", test_dir_hash: str = "h-a", **fields: Any
) -> Run:
    """A run for ``machine`` built the way a dispatcher builds one (extra fields optional)."""
    return Run(machine=machine, test_dir=test_dir, test_dir_hash=test_dir_hash, **fields)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """The DSN of one throwaway PostgreSQL server for the whole session."""
    reason = postgres_unavailable()
    if reason is not None:
        if postgres_required():
            pytest.fail(f"RUNSTORE_REQUIRE_POSTGRES is set but {reason}")
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    with pg_server().throwaway_postgres() as dsn:
        yield dsn


@pytest.fixture
def store_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A state directory path that does not exist yet (the store creates it)."""
    return tmp_path / "state"


@pytest.fixture
def backend(request: pytest.FixtureRequest, store_dir: pathlib.Path) -> Backend:
    """Where this test's store lives: ``store_dir``, or a fresh table on the session's
    PostgreSQL server for the ``[postgres]`` case of a contract test."""
    kind = getattr(request, "param", "file")
    if kind == "postgres":
        return Backend("postgres", request.getfixturevalue("pg_dsn"), fresh_table())
    return Backend("file", str(store_dir))


@pytest.fixture
def open_store(backend: Backend) -> Iterator[Callable[..., RunStore]]:
    """Open (another) handle on the test's store; every handle is closed when the test ends."""
    opened: list[RunStore] = []

    def factory(**options: Any) -> RunStore:
        handle = backend.open(**options)
        opened.append(handle)
        return handle

    try:
        yield factory
    finally:
        for handle in opened:
            handle.close()


@pytest.fixture
def store(open_store: Callable[..., RunStore]) -> RunStore:
    """A durable store (in ``store_dir`` unless the test is a contract test's [postgres]
    case), closed when the test ends."""
    return open_store()


@pytest.fixture(name="make_run")
def make_run_fixture() -> Callable[..., Run]:
    """The ``make_run`` factory."""
    return make_run


@pytest.fixture
def clean_cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No store or colour settings leak in from the environment running the tests."""
    for name in ("RUNSTORE_DIR", "RUNSTORE_URL", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Call ``cli.main(argv)`` and return (exit code, stdout, stderr)."""

    def call(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(list(argv), prog="runstore")
        out, err = capsys.readouterr()
        return code, out, err

    return call
