"""Damage is not a torn write. A crash tears only the appends that were not yet synced, so
only those are cut, and only when they are provably unsynced; anything else - an edit of
the whole file (CRLF line endings, a re-encoding), a changed byte, swapped or duplicated
lines, a cut of a file that a clean close, a checkpoint or a compaction recorded as synced
in ``runs.lock``, a tail far too long to be a torn append - raises ``CorruptStoreError``
naming the file, the offset and the remedy, and leaves every file of the state directory
byte-for-byte as it was. Each detection has a broken variant: the detection monkeypatched
away, the same damage is then cut off as if it were torn (runs are lost), which proves the
test can fail. The genuine torn tail, an unsynced append cut short by a kill, is still
recovered."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable

import attrs
import pytest
from faults import audit_store, lost_acks, read_acks, snapshot_dir, spawn_python, wait_pid

import runstore._scan as scan_module
import runstore.store as store_module
from runstore import (
    CorruptStoreError,
    Run,
    Status,
    Store,
    _fileopen,
    _limits,
    _statedir,
    _vouch,
    verify,
)

pytestmark = pytest.mark.timeout(300)


# -- helpers --------------------------------------------------------------------------------


def make_store(path: pathlib.Path, *, closed: bool = True, runs: int = 6,
               test_dir: str = "/tests/t") -> pathlib.Path:
    """A durable store with ``runs`` finished runs and one running; ``closed=False``
    leaves it as a crash would (no clean-close mark, no clean close in runs.lock)."""
    s = Store(path)
    for i in range(runs):
        run, _ = s.prepare_atomic(f"m{i}", "h", lambda i=i: Run(f"m{i}", test_dir, "h"))
        s.start(run.id)
        s.finish(run.id, Status.COMPLETED, exit_code=0)
    run, _ = s.prepare_atomic("m99", "h", lambda: Run("m99", test_dir, "h"))
    s.start(run.id)
    if closed:
        s.close()
    else:  # drop it as a killed process does: descriptors closed, nothing written
        s._lock.close()
        s._journal.close()
        s._closed = True
    return path / "runs.jsonl"


def runs_in(path: pathlib.Path) -> dict[str, Run]:
    with Store(path) as s:
        return {r.id: r for r in s.list()}


def lines_of(data: bytes) -> list[bytes]:
    return data.split(b"\n")[:-1]


def join(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def records(data: bytes) -> list[int]:
    """Indexes of the record lines."""
    return [i for i, line in enumerate(lines_of(data)) if line.startswith(b'{"seq":')]


def refused(state: pathlib.Path, excerpt: str = "") -> CorruptStoreError:
    """Open ``state``: it must raise CorruptStoreError (naming the journal and an offset,
    with ``excerpt``) and leave every file of the directory byte-for-byte unchanged."""
    before = snapshot_dir(str(state))
    with pytest.raises(CorruptStoreError) as info, Store(state) as s:
        s.list()
    err = info.value
    assert err.path == str(state / "runs.jsonl")
    assert err.offset is not None and err.remedy
    assert excerpt in str(err), str(err)
    assert snapshot_dir(str(state)) == before
    return err


def mutate(path: pathlib.Path, fn: Callable[[bytes], bytes]) -> bytes:
    data = fn(path.read_bytes())
    path.write_bytes(data)
    return data


@pytest.fixture
def no_vouch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: the lock file's record of what was synced is never read."""
    monkeypatch.setattr(_fileopen, "read_vouch", lambda fd: None)


@pytest.fixture
def no_edit_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: a line that passes its checksum once a whole-file edit is undone is not
    recognised (neither as the damaged line nor as proof that later lines were synced)."""
    monkeypatch.setattr(scan_module, "_decode_edited", lambda line: None)


def written_once(state_dir: pathlib.Path) -> bytes:
    """Make one write to the store (only a write cuts a torn tail; reads leave it) and
    return the journal's bytes before that write's line. The lock file is put back as it
    was, so the write's clean close vouches for nothing in the next case."""
    lock = state_dir / "runs.lock"
    saved = lock.read_bytes() if lock.exists() else b""
    with Store(state_dir) as s:
        seq = s.last_seq() + 1
        s.create(Run("cutter", "/t", "h", status=Status.COMPLETED))
    lock.write_bytes(saved)
    data = (state_dir / _statedir.DATA_NAME).read_bytes()
    return data[:data.rindex(b'{"seq":%d,' % seq)]


def assert_cut(path: pathlib.Path, damaged: bytes) -> None:
    """The broken variant's outcome: the damaged file is cut, as a torn tail, by the next
    write."""
    after = written_once(path.parent)
    assert len(after) < len(damaged) and damaged.startswith(after)


# -- whole-file edits: CRLF, re-encoding ----------------------------------------------------


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def _crlf_after_header(data: bytes) -> bytes:
    i = data.index(b"\n") + 1
    return data[:i] + _crlf(data[i:])


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "crashed"])
def test_crlf_conversion_is_refused_untouched(tmp_path: pathlib.Path, closed: bool) -> None:
    """Every line ending converted to CRLF (header included, or all but the header): the
    lines pass their checksums once the CR is removed, so it is an edit, never a torn
    tail, whether or not the store was closed cleanly."""
    path = make_store(tmp_path / "s", closed=closed)
    good = path.read_bytes()
    mutate(path, _crlf)
    refused(tmp_path / "s", "converted to CRLF")
    path.write_bytes(good)
    mutate(path, _crlf_after_header)
    err = refused(tmp_path / "s", "converted to CRLF")
    assert err.offset == good.index(b"\n") + 1  # the first record line
    assert err.problem.startswith("line 2: ")


def test_crlf_conversion_broken_variant_is_cut_to_the_header(
        tmp_path: pathlib.Path, no_vouch: None, no_edit_check: None) -> None:
    """Broken: without the edit check and the vouch, a CRLF conversion of a cleanly closed
    store is taken for a torn tail and cut to its header: every run lost."""
    path = make_store(tmp_path / "s")
    damaged = mutate(path, _crlf_after_header)
    assert runs_in(tmp_path / "s") == {}
    assert written_once(tmp_path / "s") == damaged[:damaged.index(b"\n") + 1]


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "crashed"])
def test_latin1_to_utf8_reencoding_is_refused_untouched(tmp_path: pathlib.Path,
                                                        closed: bool) -> None:
    """The file read as Latin-1 and written as UTF-8 (runs with a non-ASCII test_dir):
    the changed lines pass their checksums once decoded back, so it is an edit."""
    path = make_store(tmp_path / "s", closed=closed, test_dir="/tests/tëst-ü")
    mutate(path, lambda d: d.decode("latin-1").encode("utf-8"))
    refused(tmp_path / "s", "re-encoded")


def test_utf8_to_latin1_reencoding_is_refused_untouched(tmp_path: pathlib.Path) -> None:
    """The other way round (UTF-8 text saved as Latin-1) is recognised too."""
    path = make_store(tmp_path / "s", closed=False, test_dir="/tests/tëst-ü")
    mutate(path, lambda d: d.decode("utf-8").encode("latin-1"))
    refused(tmp_path / "s", "re-encoded")


def test_reencoding_broken_variant_is_cut(tmp_path: pathlib.Path, no_vouch: None,
                                          no_edit_check: None) -> None:
    """Broken: without the edit check, a re-encoded crashed store is cut to its header."""
    path = make_store(tmp_path / "s", closed=False, test_dir="/tests/tëst-ü")
    damaged = mutate(path, lambda d: d.decode("latin-1").encode("utf-8"))
    assert runs_in(tmp_path / "s") == {}
    assert_cut(path, damaged)


# -- a changed byte, swapped and duplicated lines -------------------------------------------


def _flip_middle(data: bytes) -> bytes:
    lines = lines_of(data)
    i = records(data)[len(records(data)) // 2]
    line = bytearray(lines[i])
    line[len(line) // 2] ^= 0x01
    lines[i] = bytes(line)
    return join(lines)


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "crashed"])
def test_byte_flipped_mid_file_is_refused_untouched(tmp_path: pathlib.Path,
                                                    closed: bool) -> None:
    """One byte changed in a record in the middle: later lines' durable marks show it was
    synced."""
    path = make_store(tmp_path / "s", closed=closed)
    mutate(path, _flip_middle)
    refused(tmp_path / "s", "shows this part had been synced")


def test_byte_flipped_mid_file_broken_variant_is_cut(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, no_vouch: None) -> None:
    """Broken: without the proof from later lines, the flipped record and everything after
    it are cut off as a torn tail."""
    monkeypatch.setattr(scan_module, "durable_beyond", lambda read, end, damage: None)
    path = make_store(tmp_path / "s", closed=False)
    damaged = mutate(path, _flip_middle)
    assert len(runs_in(tmp_path / "s")) < 7
    assert_cut(path, damaged)


def _flip_last_record_and_mark(data: bytes) -> bytes:
    """A byte changed in the last record and in the clean-close mark after it: no later
    line is left to prove the record synced."""
    lines = lines_of(data)
    for i in (records(data)[-1], len(lines) - 1):
        line = bytearray(lines[i])
        line[len(line) // 2] ^= 0x01
        lines[i] = bytes(line)
    return join(lines)


def test_damage_the_clean_close_vouched_for_is_refused(tmp_path: pathlib.Path) -> None:
    """The last record and the close mark both damaged: nothing in the journal proves them
    synced any more, but runs.lock does (the clean close recorded the file's length)."""
    path = make_store(tmp_path / "s")
    mutate(path, _flip_last_record_and_mark)
    refused(tmp_path / "s", "runs.lock records as synced")


def test_damage_the_clean_close_vouched_for_broken_variant_is_cut(
        tmp_path: pathlib.Path, no_vouch: None) -> None:
    """Broken: without the vouch, the synced last record is cut as a torn write."""
    path = make_store(tmp_path / "s")
    damaged = mutate(path, _flip_last_record_and_mark)
    runs_in(tmp_path / "s")
    assert_cut(path, damaged)


def _swap_last_two(data: bytes) -> bytes:
    lines = lines_of(data)
    a, b = records(data)[-2:]
    lines[a], lines[b] = lines[b], lines[a]
    return join(lines)


def _swap_middle(data: bytes) -> bytes:
    lines = lines_of(data)
    a, b = records(data)[2:4]
    lines[a], lines[b] = lines[b], lines[a]
    return join(lines)


def _duplicate_last(data: bytes) -> bytes:
    lines = lines_of(data)
    i = records(data)[-1]
    return join([*lines[:i + 1], lines[i], *lines[i + 1:]])


def _duplicate_middle(data: bytes) -> bytes:
    lines = lines_of(data)
    i = records(data)[3]
    return join([*lines[:i + 1], lines[i], *lines[i + 1:]])


LINE_EDITS = {"swapped (middle)": _swap_middle, "swapped (last two)": _swap_last_two,
              "duplicated (middle)": _duplicate_middle, "duplicated (last)": _duplicate_last}


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "crashed"])
@pytest.mark.parametrize("edit", LINE_EDITS, ids=list(LINE_EDITS))
def test_swapped_or_duplicated_lines_are_refused_untouched(tmp_path: pathlib.Path,
                                                           edit: str, closed: bool) -> None:
    """Lines swapped or duplicated: each passes its checksum, so the seq out of order is
    never a torn write, even past the durable mark of a crashed store."""
    path = make_store(tmp_path / "s", closed=closed)
    mutate(path, LINE_EDITS[edit])
    refused(tmp_path / "s", "was expected")


@pytest.mark.parametrize("edit", ["swapped (last two)", "duplicated (last)"])
def test_swapped_or_duplicated_lines_broken_variant_is_cut(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, no_vouch: None,
        edit: str) -> None:
    """Broken: a complete line with a valid checksum taken for a torn one is cut off."""
    real = _fileopen.judge
    monkeypatch.setattr(_fileopen, "judge", lambda read, end, cur, damage: real(
        read, end, cur, attrs.evolve(damage, torn=True)))
    path = make_store(tmp_path / "s", closed=False)
    damaged = mutate(path, LINE_EDITS[edit])
    runs_in(tmp_path / "s")
    assert_cut(path, damaged)


# -- cuts of what was vouched for -----------------------------------------------------------


def _cut_at_line(data: bytes, back: int) -> bytes:
    """The file cut at the start of its ``back``-th line from the end (a line boundary)."""
    lines = lines_of(data)
    return join(lines[:len(lines) - back])


@pytest.mark.parametrize("back", [1, 2, 5])
def test_cut_at_a_line_boundary_after_clean_close_is_refused(tmp_path: pathlib.Path,
                                                             back: int) -> None:
    """A cleanly closed store cut at a line boundary (the close mark, or records with it):
    nothing in the journal is damaged, but runs.lock says more was synced."""
    path = make_store(tmp_path / "s")
    size = len(path.read_bytes())
    data = mutate(path, lambda d: _cut_at_line(d, back))
    err = refused(tmp_path / "s", f"first {size} bytes")
    assert err.offset == len(data) and "runs.lock" in err.remedy
    report = verify.check(tmp_path / "s")
    assert not report.ok and "was cut" in report.problems[0].message


@pytest.mark.parametrize("back", [1, 5])
def test_cut_after_clean_close_broken_variant_opens_short(tmp_path: pathlib.Path,
                                                          no_vouch: None, back: int) -> None:
    """Broken: without the vouch the cut store opens, the cut-off changes silently gone."""
    path = make_store(tmp_path / "s")
    before = runs_in(tmp_path / "s")
    mutate(path, lambda d: _cut_at_line(d, back))
    after = runs_in(tmp_path / "s")
    assert back == 1 or after != before


def test_vouch_survives_a_later_reopen(tmp_path: pathlib.Path) -> None:
    """A reopen that writes nothing keeps the vouch: a cut found at the second open."""
    path = make_store(tmp_path / "s")
    runs_in(tmp_path / "s")
    mutate(path, lambda d: _cut_at_line(d, 3))
    refused(tmp_path / "s", "was cut")


@pytest.fixture
def small_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_limits, "CHECKPOINT_EVERY", 8)


def _checkpoint_durable(data: bytes) -> int:
    """The durable mark of the last checkpoint line."""
    import orjson
    at = data.rindex(b'{"mark":"checkpoint"')
    return int(orjson.loads(data[at:data.index(b"\n", at)])["durable"])


def test_cut_after_a_checkpoint_is_refused(tmp_path: pathlib.Path,
                                           small_checkpoints: None) -> None:
    """A crashed store (no clean close) cut at a line boundary below what its last
    checkpoint recorded as synced."""
    path = make_store(tmp_path / "s", closed=False, runs=10)
    data = path.read_bytes()
    durable = _checkpoint_durable(data)
    cut = data.rindex(b"\n", 0, durable - 1) + 1
    path.write_bytes(data[:cut])
    refused(tmp_path / "s", f"first {durable} bytes")


def test_cut_after_a_checkpoint_broken_variant_opens_short(
        tmp_path: pathlib.Path, small_checkpoints: None, no_vouch: None) -> None:
    """Broken: without the vouch, the store opens with the synced changes cut off."""
    path = make_store(tmp_path / "s", closed=False, runs=10)
    data = path.read_bytes()
    before = runs_in(tmp_path / "s")
    cut = data.rindex(b"\n", 0, _checkpoint_durable(data) - 1) + 1
    path.write_bytes(data[:cut])
    assert runs_in(tmp_path / "s") != before


def _compacted_and_dropped(path: pathlib.Path) -> None:
    """A store compacted (which vouches for its new file) then dropped unclosed."""
    s = Store(path)
    s.compact()
    s._lock.close()
    s._journal.close()
    s._closed = True


def test_cut_after_compaction_is_refused(tmp_path: pathlib.Path) -> None:
    """A compacted store cut at a line boundary inside the file the compaction wrote."""
    make_store(tmp_path / "s", closed=False)
    _compacted_and_dropped(tmp_path / "s")
    path = tmp_path / "s" / "runs.jsonl"
    mutate(path, lambda d: _cut_at_line(d, 1))
    refused(tmp_path / "s")


def test_cut_after_compaction_beside_the_lock_is_refused(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction that runs on its own beside the lock vouches for its file too."""
    monkeypatch.setattr(_limits, "RETAIN_CHANGES", 2)
    monkeypatch.setattr(store_module.Store, "_compaction_due",
                        lambda self: self._view.lines - self._view.live() > 2)
    path = make_store(tmp_path / "s", closed=False)
    vouch = _vouch.read_vouch(os.open(tmp_path / "s" / "runs.lock", os.O_RDONLY))
    assert vouch is not None and vouch.by == "compaction" and vouch.length <= path.stat().st_size
    mutate(path, lambda d: d[:d.rindex(b"\n", 0, vouch.length - 1) + 1])
    refused(tmp_path / "s", "was cut")


def test_cut_after_compaction_broken_variant_opens_short(tmp_path: pathlib.Path,
                                                         no_vouch: None) -> None:
    """Broken: without the vouch, the cut compacted store opens with a run gone."""
    make_store(tmp_path / "s", closed=False)
    before = runs_in(tmp_path / "s")
    _compacted_and_dropped(tmp_path / "s")
    mutate(tmp_path / "s" / "runs.jsonl", lambda d: _cut_at_line(d, 1))
    assert runs_in(tmp_path / "s") != before


def test_a_vouch_of_another_file_does_not_apply(tmp_path: pathlib.Path) -> None:
    """The vouch names the journal by store id and header: a store restored from an older
    compaction, or another store's journal put in its place, is judged on its own."""
    make_store(tmp_path / "a")
    make_store(tmp_path / "b")
    (tmp_path / "a" / "runs.lock").write_bytes((tmp_path / "b" / "runs.lock").read_bytes())
    path = tmp_path / "a" / "runs.jsonl"
    mutate(path, lambda d: _cut_at_line(d, 1))  # only the close mark: a prefix, still sound
    assert len(runs_in(tmp_path / "a")) == 7


# -- a huge zero tail -----------------------------------------------------------------------


def _sparse_tail(path: pathlib.Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size + size)


def test_huge_sparse_zero_tail_is_judged_in_linear_time(tmp_path: pathlib.Path) -> None:
    """512 MiB of zeros (a sparse hole) after the last line of a crashed store: judged by
    reading it in chunks, in seconds and bounded memory, and refused untouched (no append
    tears that much); a reader waiting for the lock is not starved."""
    path = make_store(tmp_path / "s", closed=False)
    _sparse_tail(path, 512 << 20)
    t0 = time.monotonic()
    refused(tmp_path / "s", "too much to be a torn write")
    assert time.monotonic() - t0 < 20
    assert path.stat().st_size > 512 << 20


def test_huge_zero_tail_broken_variant_is_cut(tmp_path: pathlib.Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: with no bound on a torn tail, 80 MiB of zeros are cut as one."""
    monkeypatch.setattr(scan_module, "TORN_TAIL_LIMIT", 1 << 40)
    path = make_store(tmp_path / "s", closed=False)
    good = path.read_bytes()
    _sparse_tail(path, 80 << 20)
    runs_in(tmp_path / "s")
    assert written_once(tmp_path / "s") == good


def test_small_zero_tail_past_the_vouch_is_cut(tmp_path: pathlib.Path) -> None:
    """Zeros after the clean-close mark lie past everything vouched for: a torn append,
    cut off, every run kept."""
    path = make_store(tmp_path / "s")
    good = path.read_bytes()
    before = runs_in(tmp_path / "s")
    _sparse_tail(path, 4096)
    assert runs_in(tmp_path / "s") == before
    assert written_once(tmp_path / "s") == good


# -- the genuine torn tail ------------------------------------------------------------------

_CHILD = """
import faults
faults.writer({state!r}, {log!r}, 7, ops=40, durable=True)
"""


def _killed_writer(tmp_path: pathlib.Path, point: str) -> tuple[pathlib.Path, str]:
    state, log = tmp_path / "s", str(tmp_path / "acks")
    child = spawn_python(_CHILD.format(state=str(state), log=log),
                         {"RUNSTORE_FAILPOINT": point})
    status = wait_pid(child.pid)
    child.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    return state, log


@pytest.mark.parametrize("closed_before", [False, True], ids=["fresh", "closed-before"])
def test_unsynced_append_torn_by_a_kill_is_still_recovered(tmp_path: pathlib.Path,
                                                           closed_before: bool) -> None:
    """A writer SIGKILLed after its write and before its sync, the unsynced line then torn
    as a power loss may leave it: the torn line is cut, every acknowledged change is there,
    whether or not an earlier clean close had vouched for a shorter file."""
    if closed_before:
        make_store(tmp_path / "s")
    state, log = _killed_writer(tmp_path, "append.after_write:15")
    path = state / "runs.jsonl"
    data = path.read_bytes()
    last = data[:-1].rfind(b"\n") + 1
    path.write_bytes(data[:last + (len(data) - last) // 2])
    runs, problems = audit_store(str(state))
    assert problems == []
    assert lost_acks(read_acks([log]), runs) == []
    assert written_once(state) == data[:last]


def test_torn_tail_cut_only_by_a_writer_past_the_vouch(tmp_path: pathlib.Path) -> None:
    """Past the vouched length a torn tail is cut; the vouched bytes stay as they were."""
    path = make_store(tmp_path / "s")
    good = path.read_bytes()
    path.write_bytes(good + b'{"seq":99,"id":"torn')
    runs_in(tmp_path / "s")
    assert path.read_bytes() == good + b'{"seq":99,"id":"torn'  # a read leaves it
    assert written_once(tmp_path / "s") == good
