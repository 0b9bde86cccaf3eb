"""Concurrency: processes and threads racing prepare_atomic -> start -> finish never let two
runs of one machine be active at once, never share an id and never break the journal's
sequence; lock waits are bounded; a forked child neither shares nor releases its parent's lock.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson
import pytest
from faults import lock_held, stop_all
from racing import merge as _merge, overlaps as _overlaps, replay as _replay, threads as _threads

from runstore import (
    LockTimeoutError,
    PrepareOutcome,
    Run,
    Status,
    Store,
    _limits,
    _lock as lock_module,
    store as store_module,
)

FORK = multiprocessing.get_context("fork")

# -- the dispatcher cycle and its checks ----------------------------------------------------



def _finish(child: Any, timeout: float = 30) -> None:
    """Wait for a started child; kill it if it overruns, and always reap it."""
    try:
        child.join(timeout)
    finally:
        if child.is_alive():
            child.kill()
        child.join()


def _run_to_end(child: Any, timeout: float = 30) -> None:
    """Start a child and wait for it as ``_finish`` does."""
    child.start()
    _finish(child, timeout)




def _set_knobs(knobs: dict[str, Any]) -> None:
    """Set ``"_limits.NAME"`` / ``"lock.Class.NAME"`` attributes (in a worker process only)."""
    for name, value in knobs.items():
        module, *path = name.split(".")
        target: Any = {"_limits": _limits, "lock": lock_module}[module]
        for part in path[:-1]:
            target = getattr(target, part)
        assert hasattr(target, path[-1]), f"{name} no longer exists; update this test"
        setattr(target, path[-1], value)


def _process(state_dir: str, machines: Sequence[str], attempts: int, threads: int, seed: int,
             out: str, go: Any, knobs: dict[str, Any], make_delay: float = 0.0) -> None:
    """A dispatcher process: ``threads`` threads sharing one Store; results as JSON."""
    try:
        _set_knobs(knobs)
        store = Store(state_dir, lock_timeout=60)
        go.wait(30)
        result = _threads(lambda i: store, machines, attempts, threads, seed, make_delay)
        store.close()
    except Exception:
        result = {"created": [], "counts": {}, "errors": [traceback.format_exc()]}
    pathlib.Path(out).write_text(json.dumps(result))


def _race_processes(state_dir: pathlib.Path, tmp: pathlib.Path, *, procs: int, threads: int,
                    attempts: int, machines: Sequence[str], knobs: dict[str, Any] | None = None,
                    make_delay: float = 0.0, timeout: float = 120) -> dict[str, Any]:
    Store(state_dir).close()  # create the store before the race
    go = FORK.Event()
    outs = [tmp / f"worker-{i}.json" for i in range(procs)]
    workers = [
        FORK.Process(target=_process, args=(str(state_dir), machines, attempts, threads, i,
                                            str(outs[i]), go, knobs or {}, make_delay))
        for i in range(procs)
    ]
    try:
        for p in workers:
            p.start()
        go.set()
        deadline = time.monotonic() + timeout
        for p in workers:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [p.pid for p in workers if p.is_alive()]
    finally:
        stop_all(workers)
    assert not hung, f"workers {hung} did not finish within {timeout} s"
    assert [p.exitcode for p in workers] == [0] * procs
    return _merge([json.loads(out.read_text()) for out in outs])



def _journal(path: pathlib.Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return lines[0], [d for d in lines[1:] if "seq" in d]



def _check_race(result: dict[str, Any], state_dir: pathlib.Path, *,
                full_history: bool = True) -> dict[str, int]:
    """Assert the race left no overlap, no duplicate id and a sound journal; return figures."""
    assert not result["errors"], "\n".join(result["errors"][:3])
    created = result["created"]
    ids = [c[1] for c in created]
    overlapping = _overlaps(created)
    duplicates = len(ids) - len(set(ids))
    assert duplicates == 0, f"{duplicates} duplicate ids"
    assert not overlapping, f"{len(overlapping)} overlapping active runs: {overlapping[:5]}"

    header, records = _journal(state_dir / "runs.jsonl")
    seqs = [d["seq"] for d in records]
    if full_history:
        assert header["compacted_through"] == 0
        assert seqs == list(range(1, len(seqs) + 1)), "sequence numbers are not gap-free"
        assert len(records) == 3 * len(ids) + sum(1 for d in records
                                                  if d["change"] == "heartbeat")
        problems = _replay(records)
        assert not problems, problems[:5]
        assert {d["id"] for d in records if d["change"] == "run_created"} == set(ids)
    else:
        # after a compaction: the latest version of every run (base_bytes after the header),
        # then the retained history and the new appends, gap-free from compacted_through + 1
        raw = (state_dir / "runs.jsonl").read_bytes()
        latest_end = raw.index(b"\n") + 1 + header["base_bytes"]
        tail = [orjson.loads(line).get("seq") for line in raw[latest_end:].splitlines()]
        tail = [n for n in tail if n is not None]
        through = header["compacted_through"]
        assert tail == list(range(through + 1, through + 1 + len(tail))), "seq gap after compaction"
    with Store(state_dir) as s:
        runs = s.list()
        assert s.active() == []
    assert sorted(r.id for r in runs) == sorted(ids)
    assert all(r.status is Status.COMPLETED for r in runs)
    return {"created": len(ids), "seqs": len(seqs), "overlapping": len(overlapping),
            "duplicates": duplicates}


@pytest.fixture
def figures(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """print() for the figures CI must show, past pytest's capture."""
    def show(line: str) -> None:
        with capsys.disabled():
            print(f"\n{line}", flush=True)
    yield show


# -- the checks catch what they must --------------------------------------------------------


def test_overlap_check_flags_overlapping_intervals() -> None:
    """The interval check reports two runs of one machine active at the same time."""
    created = [("m1", "a", 1.0, 2.0), ("m1", "b", 1.5, 3.0), ("m2", "c", 1.2, 1.8),
               ("m1", "c", 3.1, 4.0), ("m1", "d", 5.0, 9.0), ("m1", "e", 6.0, 6.5)]
    assert _overlaps(created) == [("a", "b"), ("d", "e")]


def test_replay_flags_two_active_runs_on_a_machine() -> None:
    """The journal replay reports a second active run, a reused id and a skipped revision."""
    def rec(seq: int, run_id: str, change: str, status: str, revision: int) -> dict[str, Any]:
        return {"seq": seq, "id": run_id, "machine": "m1", "change": change,
                "status": status, "revision": revision}
    records = [rec(1, "a", "run_created", "pending", 1), rec(2, "b", "run_created", "pending", 1),
               rec(3, "a", "run_created", "pending", 1), rec(4, "b", "run_finished", "failed", 3)]
    problems = _replay(records)
    assert any("active runs" in p for p in problems)
    assert any("created twice" in p for p in problems)
    assert any("revision 3" in p for p in problems)


# -- races ----------------------------------------------------------------------------------

SIZES = {
    "default": {"procs": 8, "threads": 2, "attempts": 320},  # 5,120 attempts per race
    "stress": {"procs": 8, "threads": 4, "attempts": 700},  # 22,400 attempts per race
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("machines", [1, 4], ids=["1-machine", "4-machines"])
@pytest.mark.parametrize(
    "size", ["default", pytest.param("stress", marks=pytest.mark.stress)])
def test_processes_racing_prepare_never_overlap(
    store_dir: pathlib.Path, tmp_path: pathlib.Path, figures: Any, machines: int, size: str
) -> None:
    """8 processes x 2 threads racing the dispatcher cycle: 0 overlapping active runs,
    0 duplicate ids, gap-free sequence numbers in runs.jsonl."""
    procs, threads, attempts = (SIZES[size][k] for k in ("procs", "threads", "attempts"))
    started = time.monotonic()
    result = _race_processes(
        store_dir, tmp_path, procs=procs, threads=threads, attempts=attempts,
        machines=[f"m{i}" for i in range(machines)],
        knobs={"_limits.COMPACT_MIN_SUPERSEDED": 10**9})  # keep the whole history to replay
    seconds = time.monotonic() - started
    found = _check_race(result, store_dir)
    total = procs * threads * attempts
    assert sum(result["counts"].values()) == total >= 2000
    figures(
        f"race: {total} prepare attempts, {procs} procs x {threads} threads, {machines} "
        f"machine(s), {found['created']} created / {result['counts'].get('REUSE', 0)} reuse / "
        f"{result['counts'].get('BUSY', 0)} busy, {found['overlapping']} overlapping, "
        f"{found['duplicates']} duplicate ids, {found['seqs']} gap-free seqs, {seconds:.1f} s")


@pytest.mark.timeout(180)
def test_processes_racing_through_frequent_compactions(
    store_dir: pathlib.Path, tmp_path: pathlib.Path, figures: Any
) -> None:
    """The race stays sound while automatic compaction keeps replacing the file under it."""
    knobs = {"_limits.COMPACT_MIN_SUPERSEDED": 64, "_limits.RETAIN_CHANGES": 16}
    if not hasattr(store_module, "RETAIN_CHANGES"):
        del knobs["_limits.RETAIN_CHANGES"]
    result = _race_processes(store_dir, tmp_path, procs=4, threads=2, attempts=120,
                             machines=["m0", "m1"], knobs=knobs)
    found = _check_race(result, store_dir, full_history=False)
    header, _ = _journal(store_dir / "runs.jsonl")
    assert header["compacted_through"] > 0, "no compaction happened during the race"
    figures(f"race with compaction: 960 attempts, 4 procs x 2 threads, {found['created']} "
            f"created, compacted through seq {header['compacted_through']}, "
            f"{found['overlapping']} overlapping, {found['duplicates']} duplicate ids")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sharing", ["one-store", "store-per-thread"])
def test_threads_racing_prepare_never_overlap(
    store_dir: pathlib.Path, figures: Any, sharing: str
) -> None:
    """8 threads of one process (sharing one Store, or one Store each) on 1 machine."""
    Store(store_dir).close()
    stores = [Store(store_dir, lock_timeout=60) for _ in range(1 if sharing == "one-store" else 8)]
    try:
        result = _threads(lambda i: stores[i % len(stores)], ["m0"], 150, 8, seed=1)
    finally:
        for s in stores:
            s.close()
    found = _check_race(result, store_dir)
    figures(f"race: 1200 prepare attempts, 1 proc x 8 threads ({sharing}), 1 machine, "
            f"{found['created']} created, {found['overlapping']} overlapping, "
            f"{found['duplicates']} duplicate ids, {found['seqs']} gap-free seqs")


@pytest.mark.timeout(120)
def test_race_checks_fail_when_the_file_lock_is_broken(
    store_dir: pathlib.Path, tmp_path: pathlib.Path, figures: Any
) -> None:
    """With the flock disabled (mutex only) the same race is caught: the checks are not blind."""
    knobs = {"lock.StoreLock._lock_file": lambda self, fd, deadline, timeout: None,
             "lock.StoreLock.release_file": lambda self: None,
             "_limits.COMPACT_MIN_SUPERSEDED": 10**9}
    for name in knobs:
        module, *path = name.split(".")
        if not hasattr(lock_module.StoreLock, path[-1]) and module == "lock":
            pytest.skip(f"{name} no longer exists; update this sabotage")
    try:
        result = _race_processes(store_dir, tmp_path, procs=4, threads=1, attempts=60,
                                 machines=["m0"], knobs=knobs, make_delay=0.001, timeout=60)
    except AssertionError as exc:  # a worker crashed outright: caught as well
        result = {"errors": [str(exc)], "created": [], "counts": {}}
    with pytest.raises(AssertionError) as info:
        _check_race(result, store_dir)
    lines = [line for line in str(info.value).splitlines() if line.strip()]
    caught = next((line for line in lines if "Error:" in line), lines[0])
    figures(f"race with the flock disabled: caught, as it must be ({caught.strip()[:150]})")


# -- lock timeouts --------------------------------------------------------------------------

def _all_time_out(calls: Sequence[Callable[[], object]]) -> None:
    for call in calls:
        started = time.monotonic()
        with pytest.raises(LockTimeoutError):
            call()
        assert time.monotonic() - started < 5


@pytest.fixture
def lock_held_elsewhere(store_dir: pathlib.Path) -> Iterator[None]:
    """Another process holding the store's lock."""
    Store(store_dir).close()
    with lock_held(store_dir):
        yield


@pytest.mark.timeout(60)
def test_open_reads_without_the_lock_and_a_write_times_out(
    store_dir: pathlib.Path, lock_held_elsewhere: None
) -> None:
    """Store() of an existing store reads without the lock; its first write waits at most
    lock_timeout, then raises LockTimeoutError naming lock and time."""
    s = Store(store_dir, lock_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(LockTimeoutError) as info:
        s.create(Run("m1", "/t", "h"))
    waited = time.monotonic() - started
    s.close()
    assert 0.2 <= waited < 5, waited
    assert isinstance(info.value, TimeoutError)
    assert info.value.lock_path == str(store_dir / "runs.lock")
    assert info.value.timeout == 0.2
    assert str(store_dir / "runs.lock") in str(info.value) and "0.2" in str(info.value)


@pytest.mark.timeout(60)
def test_calls_time_out_and_recover_when_the_lock_comes_back(store_dir: pathlib.Path) -> None:
    """An open store's writes raise LockTimeoutError while another process holds the lock,
    and work again (mutex not leaked) once it is released. The reads (``get``, ``list``,
    ``active``, ``last_seq``, ``stats``) answer without the lock, also after another
    writer has appended (they catch up without it)."""
    s = Store(store_dir, lock_timeout=0.2)
    other = Store(store_dir, lock_timeout=0.2)
    try:
        run, _ = s.prepare_atomic("m1", "h", lambda: Run("m1", "/t", "h"))
        second, _ = s.prepare_atomic("m2", "h", lambda: Run("m2", "/t", "h"))
        with lock_held(store_dir):
            assert s.get(run.id) == run  # nothing changed: no lock needed
            assert s.list() == [run, second] and s.active() == [run, second]
            assert s.last_seq() == 2 and s.stats().runs == 2
            _all_time_out([lambda: s.start(run.id), s.compact])
        assert s.start(run.id).status is Status.RUNNING
        other.start(second.id)  # s has not seen this one
        with lock_held(store_dir):  # the file grew: the reads catch up, without the lock
            assert s.get(second.id).status is Status.RUNNING
            assert [r.status for r in s.list()] == [Status.RUNNING] * 2
            assert s.active() == other.active()
            assert s.last_seq() == 4 and s.stats().runs == 2
            _all_time_out([lambda: s.finish(run.id, Status.COMPLETED)])
        assert s.get(second.id).status is Status.RUNNING
    finally:
        other.close()
        s.close()


@pytest.mark.timeout(60)
def test_reads_about_a_run_others_did_not_touch_need_no_lock(store_dir: pathlib.Path) -> None:
    """After other processes appended lines about other runs and machines, ``get`` and
    ``active_by_machine`` answer from the view without waiting for the lock (a writer's
    critical section); a read about a run or machine those lines mention catches up,
    without the lock too."""
    with Store(store_dir, lock_timeout=0.2) as s, Store(store_dir) as other:
        mine, _ = s.prepare_atomic("m1", "h", lambda: Run("m1", "/t", "h"))
        theirs, _ = s.prepare_atomic("m2", "h", lambda: Run("m2", "/t", "h"))
        other.start(theirs.id)
        made, _ = other.prepare_atomic("m3", "h", lambda: Run("m3", "/t", "h"))
        with lock_held(store_dir):
            assert s.get(mine.id) == mine
            assert s.active_by_machine("m1") == mine
            assert s.active_by_machine("m9") is None
            assert s.get(theirs.id).status is Status.RUNNING
            assert s.active_by_machine("m3") == made
        assert s.get(theirs.id).status is Status.RUNNING
        assert s.active_by_machine("m3") == made
        assert s.active() == other.active()


@pytest.mark.timeout(60)
def test_reads_past_too_many_unread_lines_need_no_lock(store_dir: pathlib.Path) -> None:
    """More than ``_UNREAD_LIMIT`` bytes appended since the view was brought up to date: a
    read catches up (without the lock) instead of looking through them."""
    with Store(store_dir, lock_timeout=0.2) as s, Store(store_dir, durable=False) as other:
        mine, _ = s.prepare_atomic("m1", "h", lambda: Run("m1", "/t", "h"))
        size = (store_dir / "runs.jsonl").stat().st_size
        while (store_dir / "runs.jsonl").stat().st_size - size <= _limits.UNREAD_LIMIT:
            other.create(Run("elsewhere", "/t", "h", status=Status.COMPLETED))
        with lock_held(store_dir):
            assert s.get(mine.id) == mine
            assert len(s.list()) == len(other.list())


# -- fork -----------------------------------------------------------------------------------


def _flock_free(lock_path: pathlib.Path) -> bool:
    """Whether a separate process can take the flock right now (non-blocking)."""
    probe = subprocess.run(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
         "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
         "except BlockingIOError:\n    sys.exit(3)\n"
         "sys.exit(0)\n",
         str(lock_path)], check=False, timeout=30)
    assert probe.returncode in (0, 3), probe
    return probe.returncode == 0


class _HeldLock:
    """A thread of this process inside prepare_atomic's make(), holding the store's lock."""

    def __init__(self, store: Store) -> None:
        self.inside = threading.Event()
        self.leave = threading.Event()
        self.outcome: list[Any] = []
        self.thread = threading.Thread(target=self._run, args=(store,))

    def _run(self, store: Store) -> None:
        def make() -> Run:
            self.inside.set()
            self.leave.wait(30)
            return Run("m-held", "/t", "h")
        self.outcome.append(store.prepare_atomic("m-held", "h", make))

    def __enter__(self) -> _HeldLock:
        self.thread.start()
        assert self.inside.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave.set()
        self.thread.join(30)


def _child_uses_inherited_store(store: Store, out: str) -> None:
    try:
        seen = [r.machine for r in store.list()]
        run = store.create(Run("m-child", "/t", "h", status=Status.COMPLETED, exit_code=0))
        store.close()
        pathlib.Path(out).write_text(json.dumps({"seen": seen, "created": run.id}))
    except Exception:
        pathlib.Path(out).write_text(json.dumps({"error": traceback.format_exc()}))


@pytest.mark.timeout(60)
def test_child_forked_after_use_can_use_the_store(store: Store, tmp_path: pathlib.Path) -> None:
    """A child forked after the parent used the store reads and writes through it; the parent
    sees the child's run and keeps working."""
    parent_run, _ = store.prepare_atomic("m-parent", "h", lambda: Run("m-parent", "/t", "h"))
    out = tmp_path / "child.json"
    child = FORK.Process(target=_child_uses_inherited_store, args=(store, str(out)))
    _run_to_end(child)
    assert child.exitcode == 0
    report = json.loads(out.read_text())
    assert "error" not in report, report.get("error")
    assert report["seen"] == ["m-parent"]
    assert [r.id for r in store.list()] == [parent_run.id, report["created"]]
    assert store.start(parent_run.id).status is Status.RUNNING


def _child_under_parent_lock(store: Store, out: str) -> None:
    try:
        store.lock_timeout = 0.3
        try:
            store.compact()  # a write (reads need no lock)
            verdict = "the child got in while the parent held the lock"
        except LockTimeoutError:
            verdict = "blocked"
        store.close()  # must not unlock the parent's open file description
        pathlib.Path(out).write_text(json.dumps({"verdict": verdict}))
    except Exception:
        pathlib.Path(out).write_text(json.dumps({"verdict": traceback.format_exc()}))


@pytest.mark.timeout(60)
def test_forked_child_neither_shares_nor_releases_the_parents_lock(
    store: Store, store_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A child forked while a parent thread holds the lock is kept out, and closing its store
    does not release the parent's flock (a third process still cannot take it)."""
    store.create(Run("m-before", "/t", "h", status=Status.FAILED))
    lock_path = store_dir  # the store's lock is a flock of its directory
    out = tmp_path / "child.json"
    with _HeldLock(store) as held:
        assert not _flock_free(lock_path)
        child = FORK.Process(target=_child_under_parent_lock, args=(store, str(out)))
        _run_to_end(child)
        assert child.exitcode == 0
        assert json.loads(out.read_text())["verdict"] == "blocked"
        assert not _flock_free(lock_path), "the child's close() released the parent's flock"
    assert held.outcome and held.outcome[0][1] is PrepareOutcome.CREATED
    assert _flock_free(lock_path)
    assert [r.machine for r in store.list()] == ["m-before", "m-held"]


def _child_waits_then_writes(store: Store, go: Any, out: str) -> None:
    try:
        go.wait(30)
        store.lock_timeout = 10
        run = store.create(Run("m-child", "/t", "h"))
        store.close()
        pathlib.Path(out).write_text(json.dumps({"created": run.id}))
    except Exception:
        pathlib.Path(out).write_text(json.dumps({"error": traceback.format_exc()}))


@pytest.mark.timeout(60)
def test_child_forked_under_the_lock_can_use_the_store_once_released(
    store: Store, tmp_path: pathlib.Path
) -> None:
    """A child forked while a parent thread held the mutex and flock gets its own mutex and
    lock: it writes once the parent lets go."""
    out = tmp_path / "child.json"
    go = FORK.Event()
    with _HeldLock(store):
        child = FORK.Process(target=_child_waits_then_writes, args=(store, go, str(out)))
        child.start()
    go.set()
    _finish(child)
    assert child.exitcode == 0
    report = json.loads(out.read_text())
    assert "error" not in report, report.get("error")
    assert [r.machine for r in store.list()] == ["m-held", "m-child"]


def _fork_worker(state_dir: str, n: int, out: str) -> None:
    try:
        with Store(state_dir, lock_timeout=30) as s:
            for i in range(n):
                run = s.create(Run(f"m-{os.getpid()}-{i}", "/t", "h"))
                s.finish(run.id, Status.FAILED)
        pathlib.Path(out).write_text("ok")
    except Exception:
        pathlib.Path(out).write_text(traceback.format_exc())


@pytest.mark.timeout(60)
def test_spawned_processes_share_the_store(store_dir: pathlib.Path,
                                           tmp_path: pathlib.Path) -> None:
    """Processes started with "spawn" (no inherited state) write to one store safely."""
    Store(store_dir).close()
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"spawn-{i}.txt" for i in range(2)]
    workers = [ctx.Process(target=_fork_worker, args=(str(store_dir), 20, str(o))) for o in outs]
    try:
        for p in workers:
            p.start()
        for p in workers:
            p.join(45)
    finally:
        stop_all(workers)
    assert [o.read_text() for o in outs] == ["ok", "ok"]
    with Store(store_dir) as s:
        assert len(s.list(status=Status.FAILED)) == 40
    _, records = _journal(store_dir / "runs.jsonl")
    assert [d["seq"] for d in records] == list(range(1, 81))


def test_lock_is_the_directory_s_and_the_lock_file_kept(store_dir: pathlib.Path) -> None:
    """The flock is taken on the state directory, neither on runs.lock (which a cleaner may
    delete) nor on the journal (which compaction replaces); runs.lock stays."""
    with Store(store_dir) as s, _HeldLock(s):
        assert not _flock_free(store_dir)
        assert _flock_free(store_dir / "runs.lock")
        fd = os.open(store_dir / "runs.jsonl", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the journal itself is not locked
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    assert (store_dir / "runs.lock").exists()
