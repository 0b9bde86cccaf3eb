"""The file store's change feed reads from the change asked for, not from the start of the
retained history: a watcher polling a busy store reads what is new, not every change kept."""

from __future__ import annotations

import gc
import itertools
import os
import pathlib

import pytest
from faults import ReadLog, cycle

from runstore import Store, _limits


def _busy(store: Store, cycles: int) -> None:
    for i in range(cycles):
        cycle(store, f"m{i % 7}")


def test_changes_since_a_recent_seq_read_only_the_new_lines(store_dir: pathlib.Path) -> None:
    """3,000 changes in the file; asking for the last three reads about three lines."""
    fs = ReadLog()
    with Store(store_dir, durable=False, _fs=fs) as s:
        _busy(s, 1000)
        last = s.last_seq()
        line = (store_dir / "runs.jsonl").stat().st_size // last
        fs.read = 0
        assert [c.seq for c in s.changes(last - 3)] == [last - 2, last - 1, last]
        assert fs.read < 5 * line


def test_every_starting_point_gives_the_same_feed(store_dir: pathlib.Path) -> None:
    """Starting points inside the offsets the view keeps, before them (the retained history
    is read from its start) and after a compaction: the feed is the same slice."""
    with Store(store_dir, durable=False) as s:
        _busy(s, 2500)  # more changes than the view keeps offsets of (4,096)
        s.compact()
        _busy(s, 200)
        everything = list(s.changes(s.stats().oldest_seq - 1))
        seqs = [c.seq for c in everything]
        assert seqs == list(range(seqs[0], s.last_seq() + 1))
        for since in (seqs[0] - 1, seqs[0], seqs[100], seqs[-4000], seqs[-300], seqs[-2],
                      seqs[-1]):
            assert list(s.changes(since)) == [c for c in everything if c.seq > since]
    with Store(store_dir, durable=False) as fresh:  # a view that opened from the summary
        for since in (seqs[0], seqs[-300], seqs[-1]):
            assert list(fresh.changes(since)) == [c for c in everything if c.seq > since]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_long_feed_is_read_in_pieces_as_it_is_iterated(
        store_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """~5 MB of retained changes: no read over a megabyte, the first changes cost one read,
    and the whole feed is every change once, in order."""
    monkeypatch.setattr(_limits, "COMPACT_MIN_SUPERSEDED", 10**9)
    fs = ReadLog()
    with Store(store_dir, durable=False, _fs=fs) as s:
        _busy(s, 3500)
        last = s.last_seq()
        assert (store_dir / "runs.jsonl").stat().st_size > 4 << 20
        fs.sizes.clear()
        fs.read = 0
        first = list(itertools.islice(s.changes(0), 10))
        assert [c.seq for c in first] == list(range(1, 11))
        assert fs.read <= 1 << 20
        fs.sizes.clear()
        assert [c.seq for c in s.changes(0)] == list(range(1, last + 1))
        assert max(fs.sizes) <= 1 << 20 and len(fs.sizes) >= 4


def test_the_feed_holds_its_file_and_lets_it_go(store_dir: pathlib.Path) -> None:
    """A feed taken before a compaction elsewhere goes on reading the file as it was at the
    call; its descriptor is closed when it ends, fails or is dropped unfinished."""
    with Store(store_dir, durable=False) as s, Store(store_dir, durable=False) as other:
        _busy(s, 400)
        expected = list(s.changes(0))
        before = _open_fds()
        feed = s.changes(0)
        assert _open_fds() == before + 1
        half = list(itertools.islice(feed, 600))
        other.compact()
        _busy(other, 50)
        assert half + list(feed) == expected
        assert _open_fds() == before
        dropped = s.changes(0)
        next(dropped)
        del dropped
        gc.collect()
        assert _open_fds() == before
        unstarted = s.changes(0)
        del unstarted
        gc.collect()
        assert _open_fds() == before
