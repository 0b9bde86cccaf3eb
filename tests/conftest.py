"""Shared fixtures: a fresh state directory, a store that is closed after the test, and a
``make_run`` factory for the minimal run a dispatcher would prepare."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runstore import Run, Store


def make_run(
    machine: str = "m1", test_dir: str = "/tests/a", test_dir_hash: str = "h-a", **fields: Any
) -> Run:
    """A run for ``machine`` built the way a dispatcher builds one (extra fields optional)."""
    return Run(machine=machine, test_dir=test_dir, test_dir_hash=test_dir_hash, **fields)


@pytest.fixture
def store_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A state directory path that does not exist yet (the store creates it)."""
    return tmp_path / "state"


@pytest.fixture
def store(store_dir: pathlib.Path) -> Iterator[Store]:
    """A durable store in ``store_dir``, closed when the test ends."""
    s = Store(store_dir)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(name="make_run")
def make_run_fixture() -> Callable[..., Run]:
    """The ``make_run`` factory."""
    return make_run
