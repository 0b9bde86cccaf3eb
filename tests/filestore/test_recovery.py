"""Recovery: a torn, zero-filled or garbage tail past the durable mark is cut back to the longest
valid prefix on the next open; damage in the durable part, a newer format, a foreign or empty
file raise CorruptStoreError and leave the file byte for byte untouched."""

from __future__ import annotations

import os
import pathlib
import random
from collections.abc import Callable

import attrs
import pytest

from runstore import CorruptStoreError, PrepareOutcome, Run, Status, Store, _codec as codec

Op = Callable[[Store], object]


def _line_starts(data: bytes) -> list[int]:
    """Offsets of every line of ``data`` (the header is line 0)."""
    starts = [0]
    pos = data.find(b"\n")
    while pos >= 0 and pos + 1 < len(data):
        starts.append(pos + 1)
        pos = data.find(b"\n", pos + 1)
    return starts


def _prepare(s: Store, machine: str, h: str = "h-a") -> Run:
    run, outcome = s.prepare_atomic(machine, h, lambda: Run(machine, f"/tests/{h}", h))
    assert outcome is PrepareOutcome.CREATED
    return run


def _script() -> list[Op]:
    """Changes of a short dispatcher history, one journal record each."""
    ids: dict[str, str] = {}

    def prep(machine: str) -> Op:
        def op(s: Store) -> object:
            ids[machine] = _prepare(s, machine).id
            return None
        return op

    return [
        prep("m1"),
        lambda s: s.start(ids["m1"]),
        prep("m2"),
        lambda s: s.heartbeat(ids["m1"]),
        lambda s: s.finish(ids["m1"], Status.COMPLETED, exit_code=0),
        lambda s: s.update(attrs.evolve(s.get(ids["m2"]), logs_path="/logs/m2")),
        lambda s: s.create(Run("m3", "/tests/c", "h-c", status=Status.FAILED, exit_code=2)),
        lambda s: s.finish(ids["m2"], Status.INTERRUPTED, error_msg="the last change"),
    ]


@attrs.frozen
class Crashed:
    """The bytes a store left when its process died (never closed), and list() after each
    change: ``states[n]`` is what a reader must see when the first n records survive."""

    data: bytes
    states: list[list[Run]]
    record_starts: list[int]  # offset of every record line, in order


def _crashed_history(state_dir: pathlib.Path, *, compact_after: int | None = None,
                     reopen_after: int | None = None) -> Crashed:
    s = Store(state_dir)
    states = [s.list()]
    ops = _script()
    for i, op in enumerate(ops):
        op(s)
        states.append(s.list())
        if compact_after is not None and i + 1 == compact_after:
            s.compact()
        if reopen_after is not None and i + 1 == reopen_after:
            s.close()  # a clean close leaves a durable mark line in the middle
            s = Store(state_dir)
    data = (state_dir / "runs.jsonl").read_bytes()  # taken before close() marks the file
    s.close()
    starts = [o for o in _line_starts(data)[1:] if b'"mark"' not in data[o:o + 10]]
    if compact_after is None:
        assert len(starts) == len(ops)
    return Crashed(data, states, starts)


def _open_list(state_dir: pathlib.Path) -> list[Run]:
    with Store(state_dir, durable=False) as s:
        return s.list()


def _cut_by_a_write(state_dir: pathlib.Path) -> bytes:
    """Write one change to the store (a write cuts a torn tail; reads leave it) and return
    the file's bytes before that change's line."""
    lock = state_dir / "runs.lock"
    saved = lock.read_bytes() if lock.exists() else b""
    with Store(state_dir, durable=False) as s:
        seq = s.last_seq() + 1
        s.create(Run("cutter", "/t", "h", status=Status.COMPLETED))
    lock.write_bytes(saved)  # forget what the clean close recorded: the next case is a crash
    data = (state_dir / "runs.jsonl").read_bytes()
    return data[:data.rindex(b'\n{"seq":%d,' % seq) + 1]


def _write(path: pathlib.Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.fixture
def figures(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """print() for the figures CI must show, past pytest's capture."""
    def show(line: str) -> None:
        with capsys.disabled():
            print(f"\n{line}", flush=True)
    return show


@pytest.fixture
def victim(tmp_path: pathlib.Path) -> pathlib.Path:
    """A state directory (0700) to plant journal files in."""
    path = tmp_path / "victim"
    path.mkdir(mode=0o700)
    return path


# -- torn tails -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("history", ["one-session", "after-a-clean-reopen"])
def test_torn_tail_at_every_byte_of_the_last_record(
    store_dir: pathlib.Path, victim: pathlib.Path, figures: Callable[[str], None], history: str
) -> None:
    """Cut at every length inside the last record, a reopen yields exactly the prefix before
    it, leaves the file as it is, and the next write truncates the file to that prefix;
    the full file yields everything."""
    crashed = _crashed_history(store_dir, reopen_after=4 if history != "one-session" else None)
    data, last = crashed.data, crashed.record_starts[-1]
    before, after = crashed.states[-2], crashed.states[-1]
    assert before != after
    journal = victim / "runs.jsonl"
    for cut in range(last, len(data) + 1):
        _write(journal, data[:cut])
        expected, kept = (after, data) if cut == len(data) else (before, data[:last])
        assert _open_list(victim) == expected, f"cut at {cut} of {len(data)}"
        assert journal.read_bytes() == data[:cut], f"cut at {cut}: a read changed the file"
        assert _cut_by_a_write(victim) == kept, (f"cut at {cut}: file not cut back to "
                                                 f"{len(kept)}")
    figures(f"torn tail ({history}): {len(data) + 1 - last} cut points in the last record, "
            "each reopened to exactly the committed prefix")


def test_torn_tail_near_every_record_boundary(
    store_dir: pathlib.Path, victim: pathlib.Path
) -> None:
    """A cut around any record of an unclosed store yields the state after the last whole
    record (what a crash may leave of unsynced appends)."""
    crashed = _crashed_history(store_dir)
    data, starts = crashed.data, crashed.record_starts
    ends = [*starts[1:], len(data)]
    journal = victim / "runs.jsonl"
    for start, end in zip(starts, ends, strict=True):
        for cut in sorted({start, start + 1, (start + end) // 2, end - 2, end - 1, end}):
            _write(journal, data[:cut])
            whole = sum(1 for e in ends if e <= cut)
            assert _open_list(victim) == crashed.states[whole], f"cut at {cut}"


def test_torn_tail_after_a_compaction(store_dir: pathlib.Path, victim: pathlib.Path) -> None:
    """After a compaction, a torn record past the compacted part is cut back the same way
    (by the next write)."""
    crashed = _crashed_history(store_dir, compact_after=5)
    data = crashed.data
    last = _line_starts(data)[-1]
    journal = victim / "runs.jsonl"
    for cut in range(last, len(data), 7):
        _write(journal, data[:cut])
        assert _open_list(victim) == crashed.states[-2], f"cut at {cut}"
        assert journal.read_bytes() == data[:cut]
        assert _cut_by_a_write(victim) == data[:last]
    _write(journal, data)
    assert _open_list(victim) == crashed.states[-1]


def test_cut_inside_the_compacted_part_is_corruption(
    store_dir: pathlib.Path, victim: pathlib.Path
) -> None:
    """The compacted part was synced before the rename: a cut there is corruption, not a tear."""
    with Store(store_dir) as s:
        for machine in ("m1", "m2", "m3"):
            s.start(_prepare(s, machine).id)
        s.compact()
    data = (store_dir / "runs.jsonl").read_bytes()
    cut = _line_starts(data)[2] + 10  # inside the second line after the header
    journal = victim / "runs.jsonl"
    _write(journal, data[:cut])
    with pytest.raises(CorruptStoreError) as info:
        Store(victim)
    assert info.value.offset == _line_starts(data)[2]
    assert journal.read_bytes() == data[:cut]


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda n: b"\x00" * 4096, id="zeros"),
        pytest.param(lambda n: b"\x00" * 3 + b"\n" + b"\x00" * 500 + b"\n", id="zero-lines"),
        pytest.param(lambda n: random.Random(n).randbytes(3000), id="garbage"),
        pytest.param(lambda n: b'{"seq":99,"id":"x","status":"pending"}\n' * 3, id="no-crc"),
        pytest.param(lambda n: b'{"seq":9,"id":"x"', id="half-line"),
    ],
)
def test_garbage_after_the_last_record_is_cut(
    store_dir: pathlib.Path, victim: pathlib.Path, tail: Callable[[int], bytes]
) -> None:
    """Zeros or garbage appended after the last record (power loss) are left by reads and
    cut off by the next write."""
    crashed = _crashed_history(store_dir)
    journal = victim / "runs.jsonl"
    _write(journal, crashed.data + tail(len(crashed.data)))
    assert _open_list(victim) == crashed.states[-1]
    assert journal.read_bytes() == crashed.data + tail(len(crashed.data))
    assert _cut_by_a_write(victim) == crashed.data


def test_a_cut_is_logged_as_a_warning(store_dir: pathlib.Path, victim: pathlib.Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """Recovery says what it dropped: a warning on the "runstore" logger naming the file,
    the byte count and the offset."""
    crashed = _crashed_history(store_dir)
    journal = victim / "runs.jsonl"
    _write(journal, crashed.data + b"\0" * 300)
    with caplog.at_level("WARNING", logger="runstore"):
        assert _open_list(victim) == crashed.states[-1]
        assert not caplog.records  # a read cuts nothing
        _cut_by_a_write(victim)
    [record] = [r for r in caplog.records if r.name == "runstore"]
    assert record.levelname == "WARNING"
    assert str(journal) in record.getMessage()
    assert f"dropping 300 bytes from offset {len(crashed.data)}" in record.getMessage()


@pytest.mark.parametrize("fill", ["zeros", "garbage", "flip"])
def test_damaged_last_record_of_a_crashed_store_is_cut(
    store_dir: pathlib.Path, victim: pathlib.Path, fill: str
) -> None:
    """The last record zero-filled, overwritten or bit-flipped (never synced) is dropped."""
    crashed = _crashed_history(store_dir)
    data, last = crashed.data, crashed.record_starts[-1]
    size = len(data) - last
    if fill == "zeros":
        damaged = data[:last] + b"\x00" * size
    elif fill == "garbage":
        damaged = data[:last] + random.Random(7).randbytes(size)
    else:
        flipped = bytearray(data)
        flipped[last + size // 2] ^= 0x10
        damaged = bytes(flipped)
    journal = victim / "runs.jsonl"
    _write(journal, damaged)
    assert _open_list(victim) == crashed.states[-2]
    assert journal.read_bytes() == damaged
    assert _cut_by_a_write(victim) == data[:last]


def test_recovered_store_accepts_new_changes(
    store_dir: pathlib.Path, victim: pathlib.Path
) -> None:
    """After a torn tail is cut, new changes follow with the next sequence number."""
    crashed = _crashed_history(store_dir)
    journal = victim / "runs.jsonl"
    _write(journal, crashed.data[: crashed.record_starts[-1] + 30])
    with Store(victim) as s:
        run = s.finish(crashed.states[-2][1].id, Status.TIMEOUT)
        expected = s.list()
    assert _open_list(victim) == expected
    assert expected[1] == run
    seqs = [codec.decode_line(line).get("seq") for line in journal.read_bytes().splitlines()]
    seqs = [n for n in seqs if n is not None]
    assert seqs == list(range(1, len(seqs) + 1))


def test_live_store_cuts_a_torn_tail_left_by_a_crashed_writer(store: Store,
                                                              store_dir: pathlib.Path) -> None:
    """A store already open recovers a torn tail another (crashed) process appended."""
    run = _prepare(store, "m1")
    journal = store_dir / "runs.jsonl"
    good = journal.read_bytes()
    with open(journal, "ab") as f:
        f.write(b'{"seq":2,"id":"' + run.id.encode() + b'","status":"runn')
    started = store.start(run.id)
    assert store.list() == [started]
    assert journal.read_bytes().startswith(good)
    with Store(store_dir) as other:
        assert other.list() == [started]


# -- damage in the durable part -------------------------------------------------------------


def _closed_history(state_dir: pathlib.Path) -> bytes:
    with Store(state_dir) as s:
        for op in _script():
            op(s)
    return (state_dir / "runs.jsonl").read_bytes()


def _damage(data: bytes, how: str, index: int) -> tuple[bytes, int]:
    """Damage record ``index`` (0 = first record) of ``data``; return the bytes and the offset
    at which the reader must report it."""
    starts = _line_starts(data)
    start, end = starts[index + 1], starts[index + 2]
    line = data[start:end]
    if how == "flip":
        mid = start + len(line) // 2
        return data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1:], start
    if how == "zeros":
        return data[:start] + b"\x00" * (len(line) - 1) + b"\n" + data[end:], start
    if how == "garbage":
        noise = bytes(random.Random(3).randrange(32, 127) for _ in range(len(line) - 1))
        return data[:start] + noise + b"\n" + data[end:], start
    if how == "deleted":
        return data[:start] + data[end:], start
    if how == "duplicated":
        return data[:end] + line + data[end:], end
    if how == "swapped":
        after = data[end:starts[index + 3]]
        return data[:start] + after + line + data[starts[index + 3]:], start
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "zeros", "garbage", "deleted", "duplicated", "swapped"])
@pytest.mark.parametrize("index", [0, 3, 6])
def test_damage_in_a_closed_store_raises_and_leaves_the_file(
    store_dir: pathlib.Path, victim: pathlib.Path, how: str, index: int
) -> None:
    """After a clean close everything is durable: damaged records followed by valid ones raise
    CorruptStoreError naming the file and offset, and the file stays byte-identical."""
    data, offset = _damage(_closed_history(store_dir), how, index)
    journal = victim / "runs.jsonl"
    _write(journal, data)
    inode = journal.stat().st_ino
    for _ in range(2):  # and again: never reset to empty, never "repaired" on a second try
        with pytest.raises(CorruptStoreError) as info:
            Store(victim)
        assert info.value.path == str(journal)
        assert info.value.offset == offset
        assert str(journal) in str(info.value) and str(offset) in str(info.value)
        assert journal.read_bytes() == data
        assert journal.stat().st_ino == inode


def test_damaged_last_record_of_a_closed_store_raises(
    store_dir: pathlib.Path, victim: pathlib.Path
) -> None:
    """The close() mark proves the last record durable: damaging it is corruption too."""
    data, offset = _damage(_closed_history(store_dir), "flip", len(_script()) - 1)
    journal = victim / "runs.jsonl"
    _write(journal, data)
    with pytest.raises(CorruptStoreError) as info:
        Store(victim)
    assert info.value.offset == offset
    assert journal.read_bytes() == data


def test_damage_proven_durable_by_later_records_raises(
    store_dir: pathlib.Path, victim: pathlib.Path
) -> None:
    """Without a clean close, later records' durable marks prove an early record synced."""
    data = _crashed_history(store_dir).data
    damaged, offset = _damage(data, "flip", 1)
    journal = victim / "runs.jsonl"
    _write(journal, damaged)
    with pytest.raises(CorruptStoreError) as info:
        Store(victim)
    assert info.value.offset == offset
    assert journal.read_bytes() == damaged


def test_damaged_header_raises(store_dir: pathlib.Path, victim: pathlib.Path) -> None:
    """A damaged header line is CorruptStoreError at offset 0; the file is untouched."""
    data = bytearray(_closed_history(store_dir))
    data[10] ^= 0x20
    journal = victim / "runs.jsonl"
    _write(journal, bytes(data))
    with pytest.raises(CorruptStoreError) as info:
        Store(victim)
    assert info.value.offset == 0
    assert journal.read_bytes() == bytes(data)


def test_newer_format_version_is_refused(store_dir: pathlib.Path, victim: pathlib.Path) -> None:
    """A header with a newer format version raises a clear CorruptStoreError; file untouched."""
    data = _closed_history(store_dir)
    end = data.index(b"\n")
    header = codec.decode_line(data[:end])
    header["version"] = codec.FORMAT_VERSION + 1
    newer = codec.reseal(header) + data[end + 1:]
    journal = victim / "runs.jsonl"
    _write(journal, newer)
    with pytest.raises(CorruptStoreError) as info:
        Store(victim)
    message = str(info.value)
    assert f"version {codec.FORMAT_VERSION + 1}" in message
    assert "newer" in message and "upgrade" in message
    assert info.value.path == str(journal)
    assert journal.read_bytes() == newer


def test_empty_file_is_refused(victim: pathlib.Path) -> None:
    """An empty journal raises CorruptStoreError and stays empty (never reset to a new store)."""
    journal = victim / "runs.jsonl"
    _write(journal, b"")
    inode = journal.stat().st_ino
    with pytest.raises(CorruptStoreError) as info:
        Store(victim)
    assert info.value.path == str(journal)
    assert "empty" in str(info.value)
    assert journal.read_bytes() == b"" and journal.stat().st_ino == inode


@pytest.mark.parametrize(
    "content",
    [b'{"hello":"world"}\n', b"just some text\nmore\n", b"\x00" * 100],
    ids=["json", "text", "zeros"],
)
def test_foreign_file_is_refused(victim: pathlib.Path, content: bytes) -> None:
    """A file runstore did not write raises CorruptStoreError at offset 0; file untouched."""
    journal = victim / "runs.jsonl"
    _write(journal, content)
    with pytest.raises(CorruptStoreError) as info:
        Store(victim)
    assert info.value.offset == 0
    assert journal.read_bytes() == content


def test_stale_temp_file_of_a_crashed_compaction_is_removed(store_dir: pathlib.Path) -> None:
    """A temp file a crashed compaction left behind is removed by the next write (a read
    leaves it)."""
    with Store(store_dir) as s:
        run = _prepare(s, "m1")
    stale = store_dir / ".runs.jsonl.0123456789abcdef.tmp"
    _write(stale, b"half a compaction")
    with Store(store_dir) as s:
        assert s.list() == [run]
        assert stale.exists()
        s.start(run.id)
    assert not stale.exists()
