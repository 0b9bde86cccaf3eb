"""Bad input: a damaged or foreign journal, wrong API arguments, a hostile environment. Each
case must fail with a clear error and change nothing: the journal stays byte-for-byte the
same. The one repair runstore makes on its own is cutting a torn (incomplete, zero-filled or
checksum-failing) tail that lies past the durable mark. ``CATALOGUE`` is the table
docs/reliability.md shows."""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import os
import pathlib
import signal
import stat
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from faults import FailingFS, RecordingFS, as_nobody, run_for, snapshot_dir, wait_pid

from runstore import (
    CorruptStoreError,
    InvalidRunError,
    InvalidTransitionError,
    IOKind,
    LockTimeoutError,
    Run,
    Status,
    Store,
    StoreIOError,
    StoreNotFoundError,
    UnsafeStoreError,
    _codec as codec,
    _owner,
    _statedir,
    verify,
)

pytestmark = pytest.mark.timeout(120)


def _seal(data: dict[str, Any]) -> bytes:
    return codec.reseal(data)[:-1]


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")[:-1]


def _join(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def _edit(line: bytes, **changes: Any) -> bytes:
    """A record line with some fields changed and a valid checksum (written that way)."""
    data = orjson.loads(line)
    data.update(changes)
    return _seal(data)


def _records(data: bytes) -> list[int]:
    """Indexes of the record lines (not the header, not marks)."""
    return [i for i, line in enumerate(_lines(data)) if i and b'"seq":' in line]


def make_store(path: pathlib.Path, *, closed: bool = True) -> pathlib.Path:
    """Three finished runs and one running one; ``closed=False`` leaves no clean-close mark
    (the last records then lie past the durable mark, like after a crash)."""
    s = Store(path)
    for i in range(3):
        run, _ = s.prepare_atomic(f"m{i}", "h", lambda i=i: run_for(f"m{i}", "h"))
        s.start(run.id)
        s.finish(run.id, Status.COMPLETED)
    run, _ = s.prepare_atomic("m9", "h", lambda: run_for("m9", "h"))
    s.start(run.id)
    if closed:
        s.close()
    return path / "runs.jsonl"


Mutation = Callable[[bytes], bytes]


def _middle(fn: Callable[[bytes], bytes]) -> Mutation:
    """Apply ``fn`` to the second record line."""
    def mutate(data: bytes) -> bytes:
        lines = _lines(data)
        i = _records(data)[1]
        lines[i] = fn(lines[i])
        return _join(lines)
    return mutate


def _last(fn: Callable[[bytes], bytes]) -> Mutation:
    """Apply ``fn`` to the last record line."""
    def mutate(data: bytes) -> bytes:
        lines = _lines(data)
        i = _records(data)[-1]
        lines[i] = fn(lines[i])
        return _join(lines)
    return mutate


def _duplicate(which: int) -> Mutation:
    def mutate(data: bytes) -> bytes:
        lines = _lines(data)
        i = _records(data)[which]
        return _join([*lines[:i + 1], lines[i], *lines[i + 1:]])
    return mutate


def _big_line_middle(data: bytes) -> bytes:
    lines = _lines(data)
    i = _records(data)[1]
    return _join([*lines[:i], b"x" * (100 << 20), *lines[i:]])


def _bad_utf8_sealed(line: bytes) -> bytes:
    body = line[:line.rfind(b',"crc":')] + b',"note":"\xff\xfe"'
    import zlib
    return body + b',"crc":%d}' % zlib.crc32(body)


#: (case, where, mutation, store closed?, error class, message excerpt)
CATALOGUE: list[tuple[str, str, Mutation, bool, type[Exception], str]] = [
    ("garbage line", "middle", _middle(lambda _l: b"garbage!!"), True, CorruptStoreError,
     "no checksum field"),
    ("zero-filled bytes", "durable part", _middle(lambda line: bytes(len(line))), True,
     CorruptStoreError, "a valid record at byte"),
    ("truncated header", "first line", lambda d: d[:40], True, CorruptStoreError,
     "the header line is truncated"),
    ("damaged header", "first line", lambda d: d[:5] + b"#" + d[6:], True, CorruptStoreError,
     "the header line is damaged"),
    ("not a runstore file", "whole file", lambda d: _seal({"format": "other"}) + b"\n", True,
     CorruptStoreError, "not a runstore journal"),
    ("duplicated line", "middle", _duplicate(1), True, CorruptStoreError,
     "where 3 was expected"),
    ("duplicated line", "end, past the durable mark", _duplicate(-1), False,
     CorruptStoreError, "not a torn write"),
    ("wrong field type (active run)", "end", _last(lambda l_: _edit(l_, test_dir=5)), False,
     CorruptStoreError, "has a malformed field"),
    ("wrong field type (meta)", "middle", _middle(lambda l_: _edit(l_, seq="2")), True,
     CorruptStoreError, "bad seq '2'"),
    ("unknown status", "middle", _middle(lambda l_: _edit(l_, status="skipped")), True,
     CorruptStoreError, "unknown status 'skipped'"),
    ("unknown status", "end, past the durable mark",
     _last(lambda l_: _edit(l_, status="skipped")), False, CorruptStoreError,
     "not a torn write"),
    ("newer format version", "header",
     lambda d: _join([_edit(_lines(d)[0], version=99), *_lines(d)[1:]]), True,
     CorruptStoreError, "newer than this runstore understands"),
    ("100 MB line", "end", lambda d: d + b"x" * (100 << 20) + b"\n", True, CorruptStoreError,
     "too much to be a torn write"),
    ("100 MB line", "middle", _big_line_middle, True, CorruptStoreError,
     "no checksum field"),
    ("invalid UTF-8", "middle", _middle(lambda _l: b"\xff\xfe\xfd"), True, CorruptStoreError,
     "no checksum field"),
    ("invalid UTF-8 in a sealed line", "end, past the durable mark", _last(_bad_utf8_sealed),
     False, CorruptStoreError, "not valid JSON"),
    ("empty file", "whole file", lambda d: b"", True, CorruptStoreError, "the file is empty"),
]


@pytest.mark.parametrize(("case", "where", "mutate", "closed", "error", "excerpt"), CATALOGUE,
                         ids=[f"{c[0]} ({c[1]})" for c in CATALOGUE])
def test_damaged_file_is_refused_untouched(tmp_path: pathlib.Path, case: str, where: str,
                                           mutate: Mutation, closed: bool,
                                           error: type[Exception], excerpt: str) -> None:
    """The store refuses the file with a clear error and leaves it byte-for-byte alone."""
    path = make_store(tmp_path / "s", closed=closed)
    damaged = mutate(path.read_bytes())
    path.write_bytes(damaged)
    with pytest.raises(error) as info, Store(tmp_path / "s") as s:
        s.list()
    assert excerpt in str(info.value)
    assert path.read_bytes() == damaged
    assert not verify.check(tmp_path / "s").ok
    assert path.read_bytes() == damaged


def test_wrong_type_in_a_finished_run_fails_on_read_untouched(tmp_path: pathlib.Path) -> None:
    """A finished run is validated when it is read: get()/list() raise, file unchanged."""
    path = make_store(tmp_path / "s")
    data = path.read_bytes()
    lines = _lines(data)
    i = _records(data)[2]  # the first run's finish
    rid = orjson.loads(lines[i])["id"]
    lines[i] = _edit(lines[i], exit_code="zero")
    damaged = _join(lines)
    path.write_bytes(damaged)
    with Store(tmp_path / "s") as s, pytest.raises(CorruptStoreError, match="exit_code"):
        s.get(rid)
    assert path.read_bytes() == damaged


def test_zero_filled_tail_is_the_one_repair(tmp_path: pathlib.Path) -> None:
    """Zeros after the last record (a torn, unsynced append) are cut off; nothing else
    changes and every run is still there."""
    path = make_store(tmp_path / "s", closed=False)
    good = path.read_bytes()
    with Store(tmp_path / "s") as s:
        runs = s.list()
    path.write_bytes(good + bytes(300))
    with Store(tmp_path / "s") as s:
        assert s.list() == runs
        assert path.read_bytes()[:len(good)] == good


# -- torn tail: bit flips ------------------------------------------------------------------


def test_bit_flips_in_the_last_record_cut_only_that_record(tmp_path: pathlib.Path) -> None:
    """Every single-bit flip in the last record of an unclosed store: the record cannot be
    told from a torn write, so exactly it is cut off; all earlier records stay."""
    path = make_store(tmp_path / "s", closed=False)
    data = path.read_bytes()
    start = data[:-1].rfind(b"\n") + 1
    with Store(tmp_path / "s") as s:
        last_id = orjson.loads(data[start:])["id"]
        before_last = {r.id: r for r in s.list()}
    flips = 0
    for pos in range(start, len(data), 7):
        for bit in (0, 5):
            flipped = data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:]
            path.write_bytes(flipped)
            with Store(tmp_path / "s") as s:
                got = {r.id: r for r in s.list()}
            assert path.read_bytes()[:start] == data[:start]
            assert got.keys() == before_last.keys()
            assert got[last_id].revision == before_last[last_id].revision - 1
            flips += 1
    assert flips > 100


def test_bit_flips_in_the_durable_part_raise_untouched(tmp_path: pathlib.Path) -> None:
    """A flipped bit anywhere in the part known to be synced (header included, and the last
    record of a cleanly closed store): CorruptStoreError, file byte-for-byte unchanged."""
    path = make_store(tmp_path / "s", closed=True)
    data = path.read_bytes()
    mark = data[:-1].rfind(b"\n") + 1  # the clean-close mark proves all before it synced
    flips = 0
    for pos in range(0, mark, 13):
        flipped = data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1:]
        path.write_bytes(flipped)
        with pytest.raises(CorruptStoreError):
            Store(tmp_path / "s")
        assert path.read_bytes() == flipped
        flips += 1
    assert flips > 100


def test_a_flipped_newline_before_the_clean_close_mark_raises_untouched(
        tmp_path: pathlib.Path) -> None:
    """The newline ending the last record flipped: that record and the mark line read as one
    damaged line. The mark inside it still proves the record was synced: CorruptStoreError,
    not a torn tail cut off (the strided flips above hit this byte only now and then)."""
    path = make_store(tmp_path / "s", closed=True)
    data = path.read_bytes()
    pos = data[:-1].rfind(b"\n")
    flipped = data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1:]
    path.write_bytes(flipped)
    with pytest.raises(CorruptStoreError, match="shows this part had been synced"):
        Store(tmp_path / "s")
    assert path.read_bytes() == flipped


# -- the file system: a directory, a symlink, no permission ---------------------------------


def test_directory_where_the_journal_should_be(tmp_path: pathlib.Path) -> None:
    """runs.jsonl is a directory: UnsafeStoreError naming it; the directory is untouched."""
    (tmp_path / "s").mkdir(mode=0o700)
    (tmp_path / "s" / "runs.jsonl").mkdir()
    (tmp_path / "s" / "runs.jsonl" / "keep").write_text("x")
    with pytest.raises(UnsafeStoreError, match="directory"):
        Store(tmp_path / "s")
    assert (tmp_path / "s" / "runs.jsonl" / "keep").read_text() == "x"


def test_symlink_where_the_journal_should_be(tmp_path: pathlib.Path) -> None:
    """runs.jsonl is a symlink to a victim file (even a valid journal): refused, the victim
    and the link unchanged."""
    victim = make_store(tmp_path / "real")
    before = victim.read_bytes()
    (tmp_path / "s").mkdir(mode=0o700)
    os.symlink(victim, tmp_path / "s" / "runs.jsonl")
    with pytest.raises(UnsafeStoreError, match="symbolic link"):
        Store(tmp_path / "s")
    assert victim.read_bytes() == before
    assert os.readlink(tmp_path / "s" / "runs.jsonl") == str(victim)


@pytest.mark.parametrize("mode", [0o000, 0o200, 0o400])
def test_no_permission_on_the_journal(tmp_path: pathlib.Path, mode: int) -> None:
    """The journal is not readable and writable by its owner: UnsafeStoreError
    ("permission denied"), the file unchanged. Runs as uid 65534 (root reads anything)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chown the store to another user and drop to it")
    base = tmp_path / "base"
    base.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(base, 0o755)
    state = base / "s"
    path = make_store(state)
    for p in (state, path, state / "runs.lock"):
        os.chown(p, 65534, 65534)
    os.chmod(path, mode)
    before = path.read_bytes()

    def attempt() -> str:
        try:
            Store(state)
        except UnsafeStoreError as exc:
            return f"UnsafeStoreError: {exc}"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "opened"

    out = as_nobody(attempt)
    assert out.startswith("UnsafeStoreError"), out
    assert "permission denied" in out
    assert path.read_bytes() == before
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


# -- the API -------------------------------------------------------------------------------


def _unchanged(tmp_path: pathlib.Path) -> tuple[Store, Callable[[], None]]:
    path = make_store(tmp_path / "s")
    before = snapshot_dir(str(tmp_path / "s"))
    s = Store(tmp_path / "s")

    def check() -> None:
        assert snapshot_dir(str(tmp_path / "s")) == before
        assert path.exists()

    return s, check


@pytest.mark.parametrize("machine", ["", None, 5, b"m1", "m\x00"])
def test_bad_machine(tmp_path: pathlib.Path, machine: Any) -> None:
    """An empty, non-string or NUL-carrying machine: InvalidRunError, nothing written."""
    s, unchanged = _unchanged(tmp_path)
    with pytest.raises(InvalidRunError, match="machine"):
        s.prepare_atomic(machine, "h", lambda: run_for("m1", "h"))
    with pytest.raises(InvalidRunError, match="machine"):
        s.create(Run(machine=machine, test_dir="/t", test_dir_hash="h"))
    s.close()
    unchanged()


@pytest.mark.parametrize("digest", ["", None, 3])
def test_bad_hash(tmp_path: pathlib.Path, digest: Any) -> None:
    """An empty or non-string test_dir_hash: InvalidRunError, nothing written."""
    s, unchanged = _unchanged(tmp_path)
    with pytest.raises(InvalidRunError, match="test_dir_hash"):
        s.prepare_atomic("m1", digest, lambda: run_for("m1", "h"))
    s.close()
    unchanged()


@pytest.mark.parametrize("run_id", ["", None, 7])
def test_bad_id(tmp_path: pathlib.Path, run_id: Any) -> None:
    """An empty or non-string run id: InvalidRunError from every call taking one."""
    s, unchanged = _unchanged(tmp_path)
    for call in (s.get, s.start, s.heartbeat, lambda i: s.finish(i, Status.FAILED)):
        with pytest.raises(InvalidRunError, match="run id"):
            call(run_id)
    s.close()
    unchanged()


@pytest.mark.parametrize("made", [run_for("other", "h"), run_for("m1", "other"), "a string"])
def test_make_returning_the_wrong_run(tmp_path: pathlib.Path, made: Any) -> None:
    """make() returns a run for another machine or hash, or not a run: InvalidRunError."""
    s, unchanged = _unchanged(tmp_path)
    with pytest.raises(InvalidRunError, match="make"):
        s.prepare_atomic("m1", "h", lambda: made)
    s.close()
    unchanged()


def test_make_raising(tmp_path: pathlib.Path) -> None:
    """make() raises: the exception reaches the caller, nothing is written, and the lock is
    released (another store gets it at once)."""
    s, unchanged = _unchanged(tmp_path)

    def boom() -> Run:
        raise KeyError("no test dir")

    with pytest.raises(KeyError, match="no test dir"):
        s.prepare_atomic("m1", "h", boom)
    unchanged()
    started = time.monotonic()
    with Store(tmp_path / "s", lock_timeout=0.3) as other:
        other.list()
    assert time.monotonic() - started < 0.3
    _run, outcome = s.prepare_atomic("m1", "h", lambda: run_for("m1", "h"))
    assert outcome.value == "created"
    s.close()


@pytest.mark.parametrize("status", [Status.PENDING, Status.RUNNING, "running"])
def test_finish_with_a_non_terminal_status(tmp_path: pathlib.Path, status: Any) -> None:
    """finish() with a non-terminal status: InvalidTransitionError, nothing written."""
    s, unchanged = _unchanged(tmp_path)
    active = s.active()[0]
    with pytest.raises(InvalidTransitionError, match="terminal"):
        s.finish(active.id, status)
    with pytest.raises(InvalidRunError, match="unknown status"):
        s.finish(active.id, "skipped")
    s.close()
    unchanged()


def test_naive_datetime(tmp_path: pathlib.Path) -> None:
    """A naive datetime in a run: InvalidRunError that says how to fix it, nothing written."""
    s, unchanged = _unchanged(tmp_path)
    naive = _dt.datetime(2026, 1, 1, 12, 0)
    with pytest.raises(InvalidRunError, match="naive datetime"):
        s.create(run_for("m5", "h", status=Status.COMPLETED, ended_at=naive))
    active = s.active()[0]
    import attrs
    with pytest.raises(InvalidRunError, match="timezone-aware"):
        s.update(attrs.evolve(active, heartbeat_at=naive))
    s.close()
    unchanged()


# -- the environment -------------------------------------------------------------------------


@pytest.mark.parametrize("during", ["append", "compaction"])
def test_disk_full(tmp_path: pathlib.Path, during: str) -> None:
    """ENOSPC: StoreIOError (an OSError with errno ENOSPC) that says nothing was
    acknowledged; the journal is byte-for-byte unchanged and no temp file is left."""
    make_store(tmp_path / "s")
    before = snapshot_dir(str(tmp_path / "s"))
    fs = FailingFS("write", 1, errno.ENOSPC, persistent=True)
    fs.armed = False
    s = Store(tmp_path / "s", _fs=fs)
    fs.armed = True
    with pytest.raises(StoreIOError) as info:
        if during == "append":
            s.prepare_atomic("m7", "h", lambda: run_for("m7", "h"))
        else:
            s.compact()
    assert info.value.errno == errno.ENOSPC
    assert "not acknowledged" in str(info.value)
    assert snapshot_dir(str(tmp_path / "s")) == before
    fs.armed = False
    s.close()


def test_lock_held_by_a_stopped_process(tmp_path: pathlib.Path) -> None:
    """A process takes the store lock and is stopped (SIGSTOP): LockTimeoutError after the
    timeout, naming the lock file; once it is killed the store works again."""
    make_store(tmp_path / "s")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            s = Store(tmp_path / "s")
            s._lock.acquire(5)
            os.write(w, b"locked")
            os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(0)
    try:
        os.close(w)
        assert os.read(r, 16) == b"locked"
        reader = Store(tmp_path / "s", lock_timeout=0.3)  # opening reads: no lock needed
        started = time.monotonic()
        with pytest.raises(LockTimeoutError) as info:
            reader.create(run_for("m9", "h"))
        waited = time.monotonic() - started
        reader.close()
        assert 0.3 <= waited < 2.0
        assert "runs.lock" in str(info.value) and info.value.timeout == 0.3
    finally:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
        wait_pid(pid)
        os.close(r)
    with Store(tmp_path / "s", lock_timeout=2) as s:
        assert len(s.list()) == 4


# -- planted files around compaction (security) --------------------------------------------


def test_temp_files_are_created_exclusively_without_following_links(
        tmp_path: pathlib.Path) -> None:
    """Every temp file the store creates is opened O_CREAT|O_EXCL|O_NOFOLLOW (a planted
    symlink at its random name makes the open fail instead of writing through it) and ends
    up 0600 whatever the umask."""
    rec = RecordingFS()
    old = os.umask(0)
    try:
        with Store(tmp_path / "s", _fs=rec) as s:
            s.create(run_for("m1", "h", status=Status.COMPLETED))
            s.compact()
    finally:
        os.umask(old)
    temps = [(n, f) for n, f in rec.opened if n.startswith(_statedir.TMP_PREFIX)]
    assert len(temps) >= 2  # creation and compaction
    want = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    assert all(f & want == want for _n, f in temps), temps
    assert all(f & os.O_NOFOLLOW for _n, f in rec.opened)
    assert stat.S_IMODE(os.stat(tmp_path / "s" / "runs.jsonl").st_mode) == 0o600


def test_stale_temp_cleanup_removes_only_our_regular_files(tmp_path: pathlib.Path) -> None:
    """The first write removes temp files a crashed compaction left, and nothing else:
    not a symlink (nor its target), a directory, a FIFO, a file owned by someone else or a
    file whose name only looks similar."""
    make_store(tmp_path / "s")
    d = tmp_path / "s"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    ours = d / f"{_statedir.TMP_PREFIX}0123456789abcdef{_statedir.TMP_SUFFIX}"
    ours.write_bytes(b"half a compaction")
    link = d / f"{_statedir.TMP_PREFIX}link{_statedir.TMP_SUFFIX}"
    os.symlink(victim, link)
    folder = d / f"{_statedir.TMP_PREFIX}dir{_statedir.TMP_SUFFIX}"
    folder.mkdir()
    fifo = d / f"{_statedir.TMP_PREFIX}fifo{_statedir.TMP_SUFFIX}"
    os.mkfifo(fifo)
    similar = d / f"{_statedir.TMP_PREFIX}x.tmp.keep"
    similar.write_text("not ours")
    theirs = d / f"{_statedir.TMP_PREFIX}theirs{_statedir.TMP_SUFFIX}"
    theirs.write_text("someone else's")
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)
    with Store(d) as s:
        assert len(s.list()) == 4
        s.create(run_for("m8", "h"))
    assert not ours.exists()
    assert os.path.islink(link) and victim.read_text() == "precious"
    assert folder.is_dir() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert similar.read_text() == "not ours"
    if os.geteuid() == 0:
        assert theirs.read_text() == "someone else's"


# -- check, reap, export and prune on bad arguments ----------------------------------------


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 1e300, -1, -0.5, "1", None,
                                     True])
def test_check_refuses_a_bad_lock_timeout(tmp_path: pathlib.Path, timeout: Any) -> None:
    """``check(lock_timeout=)`` is checked as ``Store(lock_timeout=)`` is: InvalidRunError
    naming it, at once, while another holder keeps the lock (no wait, no hang)."""
    make_store(tmp_path / "s")
    before = snapshot_dir(str(tmp_path / "s"))
    with pytest.raises(InvalidRunError, match="lock_timeout") as info:
        Store(tmp_path / "s", lock_timeout=timeout)
    expected = str(info.value)
    fd = os.open(tmp_path / "s", os.O_RDONLY | os.O_DIRECTORY)  # the store's lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(InvalidRunError) as got:
            verify.check(tmp_path / "s", lock_timeout=timeout)
        assert time.monotonic() - started < 5
    finally:
        os.close(fd)
    assert str(got.value) == expected
    assert snapshot_dir(str(tmp_path / "s")) == before


@pytest.mark.parametrize(("where", "reason"), [
    ("missing", "the directory does not exist"),
    ("missing/deeper", "the directory does not exist"),
    ("a-file", "it is not a directory"),
    ("empty-dir", "the directory holds no runs.jsonl"),
])
def test_check_of_a_missing_store(tmp_path: pathlib.Path, where: str, reason: str) -> None:
    """``check`` of a place that holds no store: StoreNotFoundError (a FileNotFoundError too)
    naming the path and what is missing; nothing is created."""
    (tmp_path / "a-file").write_bytes(b"")
    (tmp_path / "empty-dir").mkdir(mode=0o700)
    before = sorted(os.listdir(tmp_path))
    path = tmp_path / where
    with pytest.raises(StoreNotFoundError) as info:
        verify.check(path)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"no store at {path} ({reason})")
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(tmp_path / "empty-dir") == []


#: owner pids a run may hold (any int64) that no process on this host can have
_IMPOSSIBLE_PIDS = [0, -1, -(2**63), 2**31, 2**62, 2**63 - 1]


def _owned_here(path: pathlib.Path, pid: int) -> Store:
    """A store with one running run on m1, owned on this host by ``pid``, beating now."""
    s = Store(path)
    now = _dt.datetime.now(_dt.UTC).isoformat()
    s.import_runs([{"id": "owned", "machine": "m1", "test_dir": "/t", "test_dir_hash": "h",
                    "status": "running", "started_at": now, "heartbeat_at": now,
                    "owner_host": os.uname().nodename, "owner_pid": pid,
                    "owner_start": "0:1"}])
    return s


@pytest.mark.parametrize("pid", _IMPOSSIBLE_PIDS)
def test_reap_of_an_owner_pid_no_process_here_can_have(
        tmp_path: pathlib.Path, pid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An owner pid of 0 or below, or beyond what the OS allows: the owner is gone (never
    alive), and ``os.kill`` is never asked about it (0 and -1 signal process groups)."""
    killed: list[int] = []
    real_kill = os.kill

    def kill(target: int, sig: int) -> None:
        killed.append(target)
        real_kill(target, sig)

    monkeypatch.setattr(os, "kill", kill)
    s = _owned_here(tmp_path / "s", pid)
    try:
        assert not _owner.is_alive(os.uname().nodename, pid, "0:1")
        stale = _dt.timedelta(hours=1)
        assert [(r.id, r.error_code) for r in s.reap(stale_after=stale, dry_run=True)] == [
            ("owned", "owner_gone")]
        assert s.get("owned").status is Status.RUNNING
        _, outcome = s.prepare_atomic("m1", "h2", lambda: run_for("m1", "h2"), reap=True)
        assert outcome.name == "CREATED"
        assert s.get("owned").error_code == "owner_gone"
    finally:
        s.close()
    assert not [target for target in killed if target <= 0 or target > _owner.pid_limit()]


@pytest.mark.parametrize("pid", _IMPOSSIBLE_PIDS)
def test_reap_of_an_impossible_owner_pid(tmp_path: pathlib.Path, pid: int) -> None:
    """``reap`` (not ``prepare_atomic``) interrupts such a run as owner_gone."""
    s = _owned_here(tmp_path / "s", pid)
    try:
        reaped = s.reap(stale_after=_dt.timedelta(hours=1))
        assert [(r.id, r.status, r.error_code) for r in reaped] == [
            ("owned", Status.INTERRUPTED, "owner_gone")]
    finally:
        s.close()


@pytest.mark.parametrize("target", ["missing/out.json", "file/out.json"])
def test_export_to_a_path_that_cannot_be_written(tmp_path: pathlib.Path, target: str) -> None:
    """``export(path)`` into a missing directory or below a regular file: StoreIOError
    (``IOKind.EXPORT``) naming the path and saying nothing was written; no temp file is
    left behind."""
    out = tmp_path / "out"
    (out / "dir").mkdir(parents=True)
    (out / "file").write_bytes(b"")
    s, unchanged = _unchanged(tmp_path)
    before = sorted(os.listdir(out))
    path = out / target
    try:
        with pytest.raises(StoreIOError) as info:
            s.export(path)
    finally:
        s.close()
    assert info.value.kind is IOKind.EXPORT and info.value.path == str(path)
    assert str(path) in str(info.value) and "nothing was written" in str(info.value)
    assert sorted(os.listdir(out)) == before and os.listdir(out / "dir") == []
    unchanged()


@pytest.mark.parametrize(("keep_last", "counted"), [(2, "1 run was"), (0, "3 runs were")])
def test_prune_into_a_missing_archive_directory_counts_the_runs(
        tmp_path: pathlib.Path, keep_last: int, counted: str) -> None:
    """A prune whose archive cannot be opened says how many runs it was to remove (the
    count of the runs chosen, not of those taken before the archive failed)."""
    s, unchanged = _unchanged(tmp_path)
    try:
        with pytest.raises(StoreIOError) as info:
            s.prune(keep_last=keep_last, archive=tmp_path / "nodir" / "a.jsonl")
    finally:
        s.close()
    assert info.value.kind is IOKind.ARCHIVE
    assert f"nothing was pruned ({counted} to be removed" in str(info.value)
    unchanged()
