"""The public verifier, ``runstore.check``, and the names ``runstore._journal`` lists."""

from __future__ import annotations

import pathlib

import pytest

import runstore
import runstore._journal
import runstore._statedir
import runstore.verify
from runstore import CheckReport, Run, Store


def test_check_is_public_and_reports_a_healthy_store(store_dir: pathlib.Path) -> None:
    """``runstore.check(state_dir)`` verifies a store and returns a ``CheckReport``."""
    with Store(store_dir) as s:
        s.create(Run("m1", "/t", "h"))
    report = runstore.check(store_dir)
    assert isinstance(report, CheckReport)
    assert report.ok and report.records == 1 and report.last_seq == 1
    assert {"check", "CheckReport"} <= set(runstore.__all__)


def _flip_a_synced_byte(store_dir: pathlib.Path) -> int:
    """Three runs, closed cleanly, then one byte of the first record flipped: its offset."""
    with Store(store_dir) as s:
        for i in range(3):
            s.create(Run(f"m{i}", "/t", "h"))
    path = store_dir / runstore._statedir.DATA_NAME
    data = bytearray(path.read_bytes())
    first = data.index(b"\n") + 1
    data[first + 20] ^= 0x01
    path.write_bytes(bytes(data))
    return first


def test_check_finds_a_damaged_line(store_dir: pathlib.Path) -> None:
    """A flipped byte inside synced data is a problem, not a healthy file."""
    first = _flip_a_synced_byte(store_dir)
    report = runstore.check(store_dir)
    assert not report.ok and report.torn_tail is None
    assert report.problems[0].offset == first


def test_check_finds_a_damaged_line_broken_variant(store_dir: pathlib.Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: a verifier that takes all damage for a torn tail reports the file healthy."""
    first = _flip_a_synced_byte(store_dir)
    monkeypatch.setattr(runstore.verify, "judge", lambda read, end, cur, damage: None)
    report = runstore.check(store_dir)
    assert report.ok and report.torn_tail is not None and report.torn_tail.offset == first


def test_every_name_journal_lists_is_importable_from_it() -> None:
    """Each name in ``runstore._journal.__all__`` resolves."""
    missing = [n for n in runstore._journal.__all__ if not hasattr(runstore._journal, n)]
    assert not missing
