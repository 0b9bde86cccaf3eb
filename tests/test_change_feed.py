"""The file store's change feed reads from the change asked for, not from the start of the
retained history: a watcher polling a busy store reads what is new, not every change kept."""

from __future__ import annotations

import pathlib

from faults import ReadLog, cycle

from runstore import Store


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
