"""Forks, clocks and the edges of the id space.

* fork: a child forked (``os.fork``) while other threads of the parent are inside store calls
  uses the store at once: prepare, start, finish, get, close. A stress of many forks into
  threads doing every kind of call (compactions beside the lock included), and a
  deterministic case: the fork lands while a parent thread holds the lock with other
  processes' records held for after the flock. Broken variant: the store's at-fork hook
  disabled, the child's first call fails.
* clock forward step: the reaper's wall clock jumps a day ahead; a run whose owner process
  runs on this host is not reaped, a dead owner's run is (``owner_gone``), and a run whose
  owner cannot be asked (another host) is judged by the wall clock (``heartbeat_stale``).
  Broken variant: the reaper trusts the wall clock alone and reaps the live run.
* clock backward step: ids made by two views of one store, across a compaction and a reopen,
  while the clock steps back, stay unique and increasing. Broken variant: the id ignores the
  greatest id the store holds.
* id edges: after importing a run with the greatest timestamp id (year 9999), ``create`` and
  ``prepare_atomic`` go on making valid, unique, increasing ids that do not grow. Broken
  variant: the id successor without its end-of-time fallback.
"""

from __future__ import annotations

import datetime as _dt
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from clocks import SettableClock
from faults import audit_store, figure, in_thread, sized, wait_pid

import runstore._ids
import runstore._owner
from runstore import (
    PrepareOutcome,
    Run,
    Status,
    Store,
    _ids as ids,
    _limits,
    verify,
)

# -- forks ----------------------------------------------------------------------------------


def _run(machine: str, digest: str = "h") -> Run:
    return Run(machine, f"/tests/{digest}", digest)


def _child_work(store: Store, machine: str, err_path: Path) -> None:
    """In a forked child: prepare, start, finish and read back a run, close, and exit 0;
    on any error write it to ``err_path`` and exit 1. Never returns."""
    code = 1
    try:
        signal.alarm(60)  # a hang in the child ends it instead of the test
        run, outcome = store.prepare_atomic(machine, "h", lambda: _run(machine))
        assert outcome is PrepareOutcome.CREATED, outcome
        store.start(run.id)
        store.finish(run.id, Status.COMPLETED, exit_code=0)
        got = store.get(run.id)
        assert got.status is Status.COMPLETED, got
        assert got.owner_pid == os.getpid(), (got.owner_pid, os.getpid())
        store.close()
        code = 0
    except BaseException:
        err_path.write_text(traceback.format_exc())
    finally:
        os._exit(code)


def _busy_parent(store: Store, other: Store, stop: threading.Event,
                 errors: list[str]) -> list[threading.Thread]:
    """Threads that keep the store busy with every kind of call until ``stop``, and one
    that writes through ``other`` (another view of the store, as another process has), whose
    records the store's catch-ups hold for after the flock."""

    def cycle(machine: str, store: Store = store) -> None:
        try:
            while not stop.is_set():
                run, _ = store.prepare_atomic(machine, "h", lambda: _run(machine))
                store.start(run.id)
                store.heartbeat(run.id)
                store.get(run.id)
                store.active_by_machine(machine)
                store.finish(run.id, Status.COMPLETED, exit_code=0)
        except BaseException:
            errors.append(traceback.format_exc())

    def survey() -> None:
        try:
            rounds = 0
            while not stop.is_set():
                store.list(status=Status.RUNNING)
                store.active()
                store.stats()
                store.reap(stale_after=_dt.timedelta(hours=1), dry_run=True)
                rounds += 1
                if rounds % 20 == 0:
                    store.compact()
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [in_thread(lambda m=f"p{i}": cycle(m)) for i in range(3)]
    threads.append(in_thread(survey))
    threads += [in_thread(lambda m=f"o{i}": cycle(m, other)) for i in range(2)]
    return threads


def _fork_stress(state_dir: Path, tmp_path: Path, forks: int, *, durable: bool) -> dict[str, int]:
    """Fork ``forks`` children into a busy parent; each child must finish its run."""
    errors: list[str] = []
    failed: list[str] = []
    stop = threading.Event()
    store = Store(state_dir, durable=durable, lock_timeout=30)
    other = Store(state_dir, durable=durable, lock_timeout=30)
    threads = _busy_parent(store, other, stop, errors)
    try:
        for k in range(forks):
            err = tmp_path / f"child-{k}.err"
            pid = os.fork()
            if pid == 0:
                _child_work(store, f"c{k}", err)
            status = wait_pid(pid, 90)
            if os.waitstatus_to_exitcode(status) != 0:
                failed.append(f"child {k}: exit {os.waitstatus_to_exitcode(status)}: "
                              f"{err.read_text() if err.exists() else '(no report)'}")
            time.sleep(0.0005 * (k % 4))  # land the forks at varied points of the calls
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        other.close()
        store.close()
    assert not errors, errors[0]
    assert not failed, f"{len(failed)} of {forks} children failed; first:\n{failed[0]}"
    runs, problems = audit_store(str(state_dir))
    assert not problems, problems
    done = {r.machine for r in runs.values()
            if r.machine.startswith("c") and r.status is Status.COMPLETED}
    assert done == {f"c{k}" for k in range(forks)}
    return {"forks": forks, "runs": len(runs)}


@pytest.fixture
def low_compaction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compact beside the lock every few writes, so that forks land in compactions too."""
    monkeypatch.setattr(_limits, "COMPACT_MIN_SUPERSEDED", 32)
    monkeypatch.setattr(_limits, "RETAIN_CHANGES", 16)


@pytest.mark.usefixtures("low_compaction")
def test_children_forked_while_threads_are_in_calls_use_the_store(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """200 forks into a parent whose threads prepare, start, beat, read, finish, list,
    reap and compact: every child prepares, starts, finishes and reads back its run."""
    numbers = _fork_stress(store_dir, tmp_path, sized(200, 2000), durable=False)
    figure(capsys, "fork while in call", **numbers, failed_children=0)


@pytest.mark.stress
@pytest.mark.usefixtures("low_compaction")
def test_children_forked_while_threads_are_in_calls_use_the_store_durable_stress(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same, durable (a sync after every write) and ten times longer."""
    numbers = _fork_stress(store_dir, tmp_path, sized(2000, 2000, full_size=True), durable=True)
    figure(capsys, "fork while in call (durable, stress)", **numbers, failed_children=0)


def _fork_mid_call(state_dir: Path, tmp_path: Path) -> tuple[int, str]:
    """Fork while a parent thread is inside ``prepare_atomic`` (in ``make()``, the lock
    held) after catching up held another store's record for after the flock; the child
    then uses the store. Returns the child's exit code and its error report."""
    parent = Store(state_dir, durable=False)
    other = Store(state_dir, durable=False)  # another view: like another process
    try:
        parent.create(_run("m0"))  # the parent's view is current here
        other.create(_run("elsewhere"))  # a record not about m1: held by the catch-up
        inside, release = threading.Event(), threading.Event()
        held: list[int] = []

        def make() -> Run:
            held.append(len(parent._held))
            inside.set()
            release.wait(30)
            return _run("m1")

        t = in_thread(lambda: parent.prepare_atomic("m1", "h", make))
        assert inside.wait(30)
        assert held == [1], held  # the fork lands with a record held mid-call
        err = tmp_path / "mid-call.err"
        pid = os.fork()
        if pid == 0:
            _child_work(parent, "child", err)
        release.set()  # the parent's call finishes; the child waits for the flock
        t.join(30)
        code = os.waitstatus_to_exitcode(wait_pid(pid, 90))
        assert parent.active_by_machine("m1") is not None  # the parent's call was stored
        return code, err.read_text() if err.exists() else ""
    finally:
        other.close()
        parent.close()


def test_a_child_forked_mid_call_drops_the_parents_call(store_dir: Path, tmp_path: Path) -> None:
    """The child of a fork made while a thread held the lock and others' records uses the
    store, and the parent's call completes."""
    code, err = _fork_mid_call(store_dir, tmp_path)
    assert code == 0, err
    with Store(store_dir) as s:
        assert s.active_by_machine("child") is None
        assert [r.status for r in s.list() if r.machine == "child"] == [Status.COMPLETED]


def test_broken_without_the_at_fork_hook_the_child_fails(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: with the store's at-fork hook doing nothing, the child inherits the
    parent's half-done call and its first call fails."""
    monkeypatch.setattr(Store, "_forget_parent_calls", lambda self: None)
    code, err = _fork_mid_call(store_dir, tmp_path)
    assert code == 1
    assert "AssertionError" in err, err


@pytest.mark.postgres
def test_a_postgres_child_forked_mid_transaction_uses_its_own_pool(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A child forked while a parent thread is inside a PostgresStore transaction uses a
    pool of its own; the parent's transaction then commits on its own connection."""
    from backends import fresh_table

    from runstore.postgres import PostgresStore

    store = PostgresStore(pg_dsn, table=fresh_table(), durable=False, lock_timeout=10)
    try:
        inside, release = threading.Event(), threading.Event()

        def hook(point: str, conn: object) -> None:
            if point == "before_commit" and threading.current_thread() is not main:
                inside.set()
                release.wait(30)

        main = threading.current_thread()
        store._hit = hook
        t = in_thread(lambda: store.prepare_atomic("m1", "h", lambda: _run("m1")))
        assert inside.wait(30)
        err = tmp_path / "pg-child.err"
        pid = os.fork()
        if pid == 0:
            _child_work(store, "child", err)  # type: ignore[arg-type]  # same contract
        release.set()  # the parent commits (the child waits for the feed lock it holds)
        t.join(30)
        code = os.waitstatus_to_exitcode(wait_pid(pid, 90))
        assert code == 0, err.read_text() if err.exists() else ""
        assert store.active_by_machine("m1") is not None  # the parent's commit went through
        assert [r.status for r in store.list() if r.machine == "child"] == [Status.COMPLETED]
    finally:
        store.close()


# -- the reaper's clock steps forward -------------------------------------------------------


@pytest.fixture
def clock_ahead(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to step the store's wall clock a day ahead (an NTP step, a resumed VM)."""

    def step() -> None:
        real = runstore._ids.utcnow
        monkeypatch.setattr(runstore._ids, "utcnow", lambda: real() + _dt.timedelta(days=1))

    return step


@pytest.fixture
def live_owner(store_dir: Path, tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A forked process that started a run on machine "live" and keeps running (pid, id)."""
    ready = tmp_path / "live.id"
    with Store(store_dir, durable=False) as s:
        pid = os.fork()
        if pid == 0:
            try:
                run, _ = s.prepare_atomic("live", "h", lambda: _run("live"))
                s.start(run.id)
                ready.with_suffix(".tmp").write_text(run.id)
                os.replace(ready.with_suffix(".tmp"), ready)  # whole when it appears
                time.sleep(120)
            finally:
                os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        yield pid, ready.read_text()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            wait_pid(pid)
        except (ProcessLookupError, ChildProcessError):
            pass  # the test killed and collected it


def _dead_and_foreign(s: Store) -> tuple[str, str]:
    """A run whose owner process has exited, and one owned by a process of another host."""
    pid = os.fork()
    if pid == 0:
        try:
            run, _ = s.prepare_atomic("dead", "h", lambda: _run("dead"))
            s.start(run.id)
        finally:
            os._exit(0)
    assert os.waitstatus_to_exitcode(wait_pid(pid)) == 0
    dead = s.active_by_machine("dead")
    assert dead is not None
    foreign = s.create(_run("foreign"))
    foreign = s.update(attrs.evolve(foreign, owner_host="elsewhere.invalid"))
    return dead.id, foreign.id


def test_a_clock_step_forward_never_reaps_a_live_owners_run(
    store_dir: Path, live_owner: tuple[int, str], clock_ahead: Callable[[], None]
) -> None:
    """With the clock a day ahead, reap(stale_after=1h) leaves the run of a live process of
    this host, reaps the dead owner's (owner_gone) and the other host's (heartbeat_stale)."""
    pid, live_id = live_owner
    with Store(store_dir) as s:
        dead_id, foreign_id = _dead_and_foreign(s)
        clock_ahead()
        reaped = {r.id: r.error_code for r in s.reap(stale_after=_dt.timedelta(hours=1))}
        assert reaped == {dead_id: "owner_gone", foreign_id: "heartbeat_stale"}
        assert s.get(live_id).status is Status.RUNNING
        assert s.prepare_atomic("live", "h2", lambda: _run("live", "h2"))[1] is \
            PrepareOutcome.BUSY
        os.kill(pid, signal.SIGKILL)  # now the owner is gone: reaped, whatever the clock
        wait_pid(pid)
        reaped = {r.id: r.error_code for r in s.reap(stale_after=_dt.timedelta(hours=1))}
        assert reaped == {live_id: "owner_gone"}


def test_broken_a_reaper_trusting_the_wall_clock_reaps_a_live_run(
    store_dir: Path, live_owner: tuple[int, str], clock_ahead: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: when the reaper does not ask whether the owner runs, the clock step
    reaps the live process's run as heartbeat_stale."""
    monkeypatch.setattr(runstore._owner, "is_alive", lambda host, pid, start: False)
    _pid, live_id = live_owner
    with Store(store_dir) as s:
        clock_ahead()
        reaped = {r.id: r.error_code for r in s.reap(stale_after=_dt.timedelta(hours=1))}
        assert reaped == {live_id: "heartbeat_stale"}


def test_a_live_owner_with_a_reused_pid_is_not_alive(store_dir: Path) -> None:
    """Liveness needs the recorded start time: the same pid started at another time (a
    reused pid) is not the owner, so its silent run is reaped."""
    host, pid, start = runstore._owner.current()
    assert runstore._owner.is_alive(host, pid, start)
    assert not runstore._owner.is_alive(host, pid, start + "0")
    assert not runstore._owner.is_alive(host, pid, "")
    assert not runstore._owner.is_alive("elsewhere.invalid", pid, start)


# -- the id clock steps back ----------------------------------------------------------------


def _ids_while_the_clock_steps_back(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ids made alternately by two views of one store while the clock steps back an hour
    every few runs, across a compaction and a reopen."""
    clock = SettableClock(_dt.datetime(2026, 6, 1, 12, 0, tzinfo=_dt.UTC))
    monkeypatch.setattr(ids, "_dt", clock.module)
    made: list[str] = []
    a, b = Store(state_dir, durable=False), Store(state_dir, durable=False)
    try:
        for k in range(40):
            s = a if k % 2 else b
            if k % 3 == 0:
                clock.moment -= _dt.timedelta(hours=1)
            elif k % 3 == 1:
                clock.moment += _dt.timedelta(microseconds=1)
            if k == 20:
                a.compact()
            made.append(s.create(_run(f"m{k}")).id)
    finally:
        a.close()
        b.close()
    with Store(state_dir, durable=False) as s:  # reopened from the compacted header
        clock.moment -= _dt.timedelta(days=365)
        made.append(s.create(_run("after-reopen")).id)
        made.append(s.prepare_atomic("prepared", "h", lambda: _run("prepared"))[0].id)
        assert [r.id for r in s.list()] == made
    return made


def test_ids_stay_unique_and_increasing_when_the_clock_steps_back(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every id sorts after the ones made before it, by either view, after a compaction and
    a reopen, though the clock stepped back 14 hours and then a year."""
    made = _ids_while_the_clock_steps_back(store_dir, monkeypatch)
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert all(run_id.startswith("2026") for run_id in made)  # still timestamp ids


def test_broken_ids_ignoring_the_greatest_id_go_backwards(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: an id made from the clock alone sorts before earlier ones."""
    real = ids.new_run_id
    monkeypatch.setattr(ids, "new_run_id",
                        lambda after="", now=None: real("", now))
    made = _ids_while_the_clock_steps_back(store_dir, monkeypatch)
    assert made != sorted(made)


# -- ids at the edge of the id space --------------------------------------------------------

_END = "99991231T235959.999999Z"
EDGE_IDS = [f"{_END}-ffffffffffffffff", _END, f"{_END}-0.~00000000000000ff-0123abcd"]


def _create_after_edge(state_dir: Path, edge: str) -> list[str]:
    """Import a finished run with id ``edge``, then create runs in several ways, reopen,
    compact; returns the ids made, in order."""
    made: list[str] = []
    with Store(state_dir, durable=False) as s:
        s.import_runs([Run("imported", "/t", "h", id=edge, status=Status.COMPLETED,
                           exit_code=0)])
        for k in range(30):
            made.append(s.create(_run(f"m{k}")).id)
        made.append(s.prepare_atomic("p", "h", lambda: _run("p"))[0].id)
        s.compact()
    with Store(state_dir, durable=False) as s:
        made.append(s.create(_run("after-reopen")).id)
        assert [r.id for r in s.list()] == [edge, *made]
        for run_id in made:
            assert s.get(run_id).id == run_id
    return made


@pytest.mark.parametrize("edge", EDGE_IDS)
def test_create_after_an_id_at_the_end_of_time(store_dir: Path, edge: str) -> None:
    """After a run with the greatest timestamp id, new ids are unique, sort after it and
    after each other, do not grow, and the store (reopened, compacted) passes check."""
    made = _create_after_edge(store_dir, edge)
    chain = [edge, *made]
    assert chain == sorted(chain)
    assert len(set(chain)) == len(chain)
    assert max(map(len, made)) <= len(edge) + 40
    assert not verify.check(store_dir).problems


def test_broken_an_id_successor_without_the_end_of_time_fallback_fails(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: taking the greatest id's time plus a microsecond, as before, fails
    create after a year-9999 id."""

    def plus_one_microsecond(after: str = "", now: _dt.datetime | None = None) -> str:
        moment = _dt.datetime.strptime(after[:len(_END)], ids._FORMAT)
        return f"{ids._prefix(moment + _dt.timedelta(microseconds=1))}-{os.urandom(8).hex()}"

    monkeypatch.setattr(ids, "new_run_id", plus_one_microsecond)
    with pytest.raises(OverflowError):
        _create_after_edge(store_dir, EDGE_IDS[0])
