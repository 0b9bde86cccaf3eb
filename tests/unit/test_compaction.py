"""``runstore._compaction``: the layout of a compacted file, read from the old one in pieces.

The plan must give exactly the bytes a plain layout gives (a header with the base's summary,
the kept lines in order), whatever order the kept lines lie in in the old file and however
the reads are cut (``runstore._gather``)."""

from __future__ import annotations

import pathlib
import random
import zlib

import pytest
from faults import ReadLog
from hypothesis import given, settings, strategies as st
from pieces import lines_file, reader

from runstore import (
    Run,
    Status,
    Store,
    _compaction as compaction,
    _gather as gather,
    _scan,
    verify,
)
from runstore.errors import CorruptStoreError

_PATH = "/x/runs.jsonl"


def _old(count: int, rng: random.Random) -> tuple[bytes, list[int]]:
    """An old journal's bytes (a header line, then record-like lines) and their offsets."""
    return lines_file(count, rng, head=b'{"format":"old"}\n')


def _line(buf: bytes, offset: int) -> bytes:
    return buf[offset:buf.index(b"\n", offset) + 1]


def _plan(buf: bytes, index: dict[str, int], history: list[int], active: set[str],
          read: compaction.Read | None = None) -> compaction.Plan:
    return compaction.plan(read or reader(buf), index, active, history, store_id="s1",
                           created="2026-01-01T00:00:00Z", next_seq=10_000, max_id="zz",
                           old_end=len(buf), path=_PATH)


def _check_layout(buf: bytes, index: dict[str, int], history: list[int], active: set[str],
                  plan: compaction.Plan) -> None:
    """The plan's bytes are the header then the kept lines in order, and its index, history
    and summary point at them."""
    new = b"".join(plan.chunks())
    latest = b"".join(_line(buf, o) for o in index.values())
    retained = b"".join(_line(buf, o) for o in history)
    head = new[:new.index(b"\n") + 1]
    assert new == head + latest + retained
    header = _scan.parse_header(head[:-1], _PATH)
    assert header.summary is not None
    assert header.summary.crc == zlib.crc32(latest + retained)
    assert header.summary.lines == len(index)
    assert (plan.latest_end, plan.base_end) == (len(head) + len(latest), len(new))
    assert header.compacted_through == 10_000 - 1 - len(history)
    for run_id, offset in plan.index.items():
        assert _line(new, offset) == _line(buf, index[run_id])
    assert list(plan.index) == list(index)
    assert [_line(new, o) for o in plan.history] == [_line(buf, o) for o in history]
    starts = {len(head) + rel for rel in header.summary.active}
    assert starts == {len(head) + len(b"".join(_line(buf, index[r]) for r in list(index)[:i]))
                      for i, r in enumerate(index) if r in active}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.randoms(use_true_random=False), st.sampled_from([16, 64, 4096]))
def test_plan_gives_the_plain_layout_in_any_order(count: int, rng: random.Random,
                                                  read_ahead: int) -> None:
    """Latest versions scattered in any order, a history that repeats some of them, reads
    cut at any size (lines across read boundaries, lines longer than a read): the plan's
    bytes, CRC, summary, index and history are those of the plain layout."""
    buf, offsets = _old(count, rng)
    chosen = rng.sample(offsets, rng.randrange(1, count + 1))
    index = {f"r{i:04d}": o for i, o in enumerate(chosen)}
    history = sorted(rng.sample(offsets, rng.randrange(0, min(count, 40) + 1)))
    active = {r for r in index if rng.random() < 0.2}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gather, "READ_AHEAD", read_ahead)
        plan = _plan(buf, index, history, active)
        _check_layout(buf, index, history, active, plan)


def test_a_run_whose_latest_version_is_in_the_history_points_there() -> None:
    """As a reader of the new file would index it: the retained copy comes later."""
    buf, offsets = _old(10, random.Random(1))
    index = {"a": offsets[2], "b": offsets[9]}
    plan = _plan(buf, index, offsets[7:], set())
    assert plan.index["b"] == plan.history[-1]
    assert plan.index["a"] < plan.latest_end
    assert plan.history_moves == dict(zip(offsets[7:], plan.history, strict=True))


def test_a_line_without_an_end_is_corruption() -> None:
    """The old file cut inside a kept line (it cannot be: the view validated it): a
    ``CorruptStoreError`` naming the line, not a short compacted file."""
    buf, offsets = _old(20, random.Random(2))
    cut = buf[:offsets[10] + 5]
    with pytest.raises(CorruptStoreError) as err:
        _plan(buf, {"a": offsets[10]}, [], set(), reader(cut))
    assert err.value.offset == offsets[10]
    assert "no end" in str(err.value)


def test_a_file_cut_between_the_passes_is_corruption() -> None:
    """Lines found in the first pass but gone when copied: ``CorruptStoreError``."""
    buf, offsets = _old(20, random.Random(3))
    plan = _plan(buf, {"a": offsets[3], "b": offsets[15]}, [], set())
    plan.read = reader(buf[:offsets[15]])
    with pytest.raises(CorruptStoreError, match="ended before"):
        b"".join(plan.chunks())


def test_compaction_and_list_never_read_the_journal_whole(tmp_path: pathlib.Path) -> None:
    """A store of a few MB lists and compacts with no read over a megabyte (both read the
    whole file into memory before: a compaction peaked at ~1.2 GB for a million runs), and
    reopens intact."""
    state = str(tmp_path)
    with Store(state, durable=False) as s:
        ids = []
        for i in range(2500):
            machine = f"m{i % 40}"
            run, _ = s.prepare_atomic(machine, "h", lambda m=machine: Run(m, "/t" * 20, "h"))
            s.start(run.id)
            if i % 5:
                s.finish(run.id, Status.COMPLETED, exit_code=0)
            else:
                s.finish(run.id, Status.FAILED, exit_code=1)
            ids.append(run.id)
    fs = ReadLog()
    with Store(state, durable=False, _fs=fs) as s:
        before = s.list()
        assert max(fs.sizes) <= gather.READ_AHEAD
        assert sum(fs.sizes) > 2 * gather.READ_AHEAD
        fs.sizes.clear()
        s.compact()
        assert max(fs.sizes) <= gather.READ_AHEAD
        assert s.list() == before
    with Store(state) as s:
        assert [r.id for r in s.list()] == ids
    assert verify.check(state).ok
