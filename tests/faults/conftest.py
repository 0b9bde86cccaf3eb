"""Fixtures of the fault suite."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterator

import pytest


@pytest.fixture
def quiet_runstore_log() -> Iterator[None]:
    """Only errors from the ``runstore`` logger for the test (injected faults make it warn
    by the hundred), its level restored afterwards."""
    logger = logging.getLogger("runstore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture
def outside(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory beside the state directory, for output targets that are not the store's."""
    path = tmp_path / "outside"
    path.mkdir()
    return path
