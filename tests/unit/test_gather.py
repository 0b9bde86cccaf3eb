"""``runstore._gather``: lines and byte ranges of a file read at given offsets, in any order,
in reads no larger than ``READ_AHEAD`` that follow the ranges asked for."""

from __future__ import annotations

import array
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings, strategies as st
from pieces import lines_file, reader

from runstore import _gather as gather
from runstore.errors import CorruptStoreError

_PATH = "/x/runs.jsonl"


def _line(buf: bytes, offset: int) -> bytes:
    return buf[offset:buf.index(b"\n", offset)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.randoms(use_true_random=False), st.sampled_from([8, 64, 4096]))
def test_lines_come_back_in_the_order_asked(count: int, rng: random.Random,
                                            read_ahead: int) -> None:
    """Offsets in any order, repeated ones too, lines longer than a read: each line whole,
    in order, and the lengths with their newline."""
    buf, offsets = lines_file(count, rng)
    asked = array.array("q", (rng.choice(offsets) for _ in range(rng.randrange(1, 2 * count))))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gather, "READ_AHEAD", read_ahead)
        assert list(gather.lines(reader(buf), asked, _PATH)) == [_line(buf, o) for o in asked]
        assert list(gather.line_lengths(reader(buf), asked, _PATH)) == [
            len(_line(buf, o)) + 1 for o in asked]
        starts = array.array("q", sorted(rng.sample(range(len(buf)), min(len(buf), 10))))
        ends = array.array("q", (rng.randrange(a, len(buf) + 1) for a in starts))
        order = list(range(len(starts)))
        rng.shuffle(order)
        starts = array.array("q", (starts[k] for k in order))
        ends = array.array("q", (ends[k] for k in order))
        got = [b"".join(gather.ranges(reader(buf), starts[k:k + 1], ends[k:k + 1], _PATH))
               for k in range(len(starts))]
        assert got == [buf[a:b] for a, b in zip(starts, ends, strict=True)]
        together = b"".join(gather.ranges(reader(buf), starts, ends, _PATH))
        assert together == b"".join(buf[a:b] for a, b in zip(starts, ends, strict=True))


def _read_volume(order: Callable[[list[int]], list[int]]) -> tuple[int, int, int, int]:
    """(largest read, bytes read, bytes asked for, file size) of ``lines`` over a ~120 KB
    file with 256-byte reads, a third of its lines asked for in ``order``."""
    buf, offsets = lines_file(1500, random.Random(5))
    asked = order(offsets[::3])
    log: list[tuple[int, int]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gather, "READ_AHEAD", 256)
        for _ in gather.lines(reader(buf, log), array.array("q", asked), _PATH):
            pass
    wanted = sum(len(_line(buf, o)) + 1 for o in asked)
    return max(size for _, size in log), sum(size for _, size in log), wanted, len(buf)


def test_reads_stay_small_and_follow_the_lines_asked_for() -> None:
    """No read is larger than the read-ahead; in file order the file is read about once
    for the lengths and once for the lines, and in a random order a jump reads only the
    line it needs (a full read-ahead on every jump would break the bound here)."""
    largest, total, wanted, size = _read_volume(sorted)
    assert largest <= 256
    assert total <= 2 * size + 256
    largest, total, wanted, size = _read_volume(lambda o: random.Random(9).sample(o, len(o)))
    assert largest <= 256
    assert total <= size + 2 * wanted


def test_a_line_without_an_end_is_corruption() -> None:
    """The file ends inside an asked-for line: ``CorruptStoreError`` naming its offset."""
    buf, offsets = lines_file(20, random.Random(2))
    with pytest.raises(CorruptStoreError) as err:
        list(gather.lines(reader(buf[:offsets[10] + 5]), array.array("q", [offsets[10]]),
                          _PATH))
    assert err.value.offset == offsets[10]
    assert "no end" in str(err.value)


def test_a_file_cut_under_a_range_is_corruption() -> None:
    """A range past the end of the file (it was cut meanwhile): ``CorruptStoreError``,
    never a short result."""
    buf, _ = lines_file(20, random.Random(3))
    starts, ends = array.array("q", [10]), array.array("q", [len(buf) + 50])
    with pytest.raises(CorruptStoreError, match="ended before"):
        b"".join(gather.ranges(reader(buf), starts, ends, _PATH))
