"""Family 6: I/O errors. A FailingFS makes the k-th write / fdatasync / fsync / replace /
ftruncate / open fail with EIO or ENOSPC, once or from then on. Every failing call must raise
``StoreIOError`` (an ``OSError``), nothing unacknowledged may be reported as done, the
reopened store must hold every acknowledged change with each failed change either applied or
not (old or new), the file must pass its check, and no descriptor may leak. Then an fsync
error followed by a power loss ("fsyncgate": the kernel dropped the pages it failed to
write), explored with the crash-state builder."""

from __future__ import annotations

import errno
import pathlib
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from faults import (
    FailingFS,
    RecordingFS,
    Scratch,
    audit_store,
    check_crash_state,
    crash_states,
    figure,
    open_fds,
    record_history,
    run_for,
    sized,
)

from runstore import Run, Status, Store, StoreIOError, verify
from runstore._fsio import FileSystem

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("quiet_runstore_log")]

KINDS = ("write", "fdatasync", "fsync", "replace", "ftruncate", "open")
ERRNOS = (errno.EIO, errno.ENOSPC)


def _script(store: Store) -> list[tuple[str, Callable[[], Any]]]:
    """The calls each case makes, in order (several appends, a compaction, more appends)."""
    def finish_first() -> Run | None:
        active = store.active()
        return store.finish(active[0].id, Status.FAILED) if active else None

    calls: list[tuple[str, Callable[[], Any]]] = []
    for i in range(3):
        calls.append((f"prepare m{i}", lambda i=i: store.prepare_atomic(
            f"m{i}", "h", lambda i=i: run_for(f"m{i}", "h"))[0]))
    calls.append(("finish", finish_first))
    calls.append(("compact", store.compact))
    calls.append(("prepare m9", lambda: store.prepare_atomic("m9", "h",
                                                             lambda: run_for("m9", "h"))[0]))
    calls.append(("finish", finish_first))
    calls.append(("create", lambda: store.create(run_for("x", "h", status=Status.COMPLETED))))
    return calls


def _case(base: pathlib.Path, kind: str, nth: int, err: int, persistent: bool,
          partial: bool) -> dict[str, Any]:
    state = str(base)
    with Store(state) as seed_store:  # some history to keep safe
        for i in range(4):
            seed_store.create(run_for(f"old{i}", "h", status=Status.COMPLETED))
        before = {r.id: r for r in seed_store.list()}
    fds = open_fds()
    fs = FailingFS(kind, nth, err, persistent=persistent, partial=partial)
    acked: dict[str, Run] = dict(before)
    failed: list[str] = []
    problems: list[str] = []
    store = None
    try:
        store = Store(state, _fs=fs)
        for name, call in _script(store):
            prior = {r.id: r for r in _quiet_list(store)}
            try:
                result = call()
            except StoreIOError as exc:
                failed.append(name)
                if exc.errno != err:
                    problems.append(f"{name}: StoreIOError errno {exc.errno}, injected {err}")
                continue
            except Exception as exc:
                problems.append(f"{name}: {type(exc).__name__} instead of StoreIOError: {exc}")
                continue
            if isinstance(result, Run):
                acked[result.id] = result
            del prior
        try:
            store.close()
        except StoreIOError:
            failed.append("close")
    except StoreIOError:
        failed.append("open")
    except Exception as exc:
        problems.append(f"{type(exc).__name__} instead of StoreIOError: {exc}")
    finally:
        fs.armed = False
        if store is not None:
            try:
                store.close()
            except StoreIOError:
                pass
    leaked = open_fds() - fds
    if leaked:
        problems.append(f"leaked descriptors: {sorted(leaked)}")
    runs, found = audit_store(state)
    problems += found
    for rid, want in acked.items():
        got = runs.get(rid)
        if got is None or got.revision < want.revision or (
            got.revision == want.revision and got != want
        ) or (want.is_terminal and got != want):
            problems.append(f"acknowledged run {rid} rev {want.revision} not as acknowledged: "
                            f"{got and (got.revision, got.status.value)}")
        elif got.revision > want.revision + 1:
            problems.append(f"run {rid} is {got.revision - want.revision} changes past its "
                            "acknowledged version (a failed change can add at most one)")
    return {"injected": fs.failed, "failed_calls": failed, "problems": problems}


def _quiet_list(store: Store) -> list[Run]:
    try:
        return store.list()
    except StoreIOError:
        return []


def _calls_per_kind(base: pathlib.Path) -> dict[str, int]:
    """How many calls of each kind the script makes when nothing fails."""
    counter = FailingFS("none", 1)
    with Store(base) as s:
        for i in range(4):
            s.create(run_for(f"old{i}", "h", status=Status.COMPLETED))
    store = Store(base, _fs=counter)
    for kind in KINDS:  # count calls without failing any
        counter.calls[kind] = 0
    original = counter._fail

    def count(kind: str) -> bool:
        counter.calls[kind] = counter.calls.get(kind, 0) + 1
        return False

    counter._fail = count  # type: ignore[method-assign]  # count only
    for _name, call in _script(store):
        call()
    store.close()
    counter._fail = original  # type: ignore[method-assign]
    return dict(counter.calls)


def _matrix(tmp_path: pathlib.Path, capsys: Any, max_nth: int) -> None:
    started = time.monotonic()
    calls = _calls_per_kind(tmp_path / "count")
    cases = injected = failures = 0
    problems: list[str] = []
    n = 0
    for kind in KINDS:
        for err in ERRNOS:
            for persistent in (False, True):
                for nth in range(1, min(max_nth, calls.get(kind, 0)) + 1):
                    for partial in ((False, True) if kind == "write" else (False,)):
                        n += 1
                        out = _case(tmp_path / f"c{n}", kind, nth, err, persistent, partial)
                        cases += 1
                        injected += bool(out["injected"])
                        failures += len(out["failed_calls"])
                        problems += [f"{kind} #{nth} {errno.errorcode[err]} "
                                     f"{'persistent' if persistent else 'once'}"
                                     f"{' partial' if partial else ''}: {p}"
                                     for p in out["problems"]]
    figure(capsys, "I/O errors", calls_per_kind=calls, cases=cases,
           cases_where_an_error_was_injected=injected, calls_that_raised=failures,
           violations=len(problems), seconds=round(time.monotonic() - started, 1))
    assert problems == [], problems[:8]
    assert injected == cases


def test_io_errors(tmp_path: pathlib.Path, capsys: Any) -> None:
    """EIO and ENOSPC at the 1st..4th call of each kind, once and persistently."""
    _matrix(tmp_path, capsys, sized(4, 40))


@pytest.mark.stress
def test_io_errors_full(tmp_path: pathlib.Path, capsys: Any) -> None:
    """The same at every call of the script (stress size)."""
    _matrix(tmp_path, capsys, sized(40, 40, True))


def test_enospc_during_append_is_clean(tmp_path: pathlib.Path) -> None:
    """A short write then ENOSPC: StoreIOError, the file cut back byte for byte."""
    state = tmp_path / "s"
    with Store(state) as s:
        s.create(run_for("a", "h", status=Status.COMPLETED))
    before = (state / "runs.jsonl").read_bytes()
    with Store(state, _fs=FailingFS("write", 1, errno.ENOSPC, partial=True)) as s:
        with pytest.raises(StoreIOError) as info:
            s.prepare_atomic("m", "h", lambda: run_for("m", "h"))
        assert info.value.errno == errno.ENOSPC
        assert isinstance(info.value, OSError)
        assert "not acknowledged" in str(info.value)
        assert (state / "runs.jsonl").read_bytes() == before
        run, _ = s.prepare_atomic("m", "h", lambda: run_for("m", "h"))  # space is back
    with Store(state) as s:
        assert s.get(run.id) == run


def test_short_writes_are_written_on_until_complete(tmp_path: pathlib.Path) -> None:
    """A file system that takes at most 7 bytes a write call: every line still lands whole,
    in order (the append goes on from where each short write stopped)."""
    class Trickle(FileSystem):
        def write(self, fd: int, data: bytes | memoryview) -> int:
            return super().write(fd, bytes(data[:7]))

    state = tmp_path / "s"
    with Store(state, _fs=Trickle()) as s:
        run, _ = s.prepare_atomic("m", "h", lambda: run_for("m", "h"))
        s.start(run.id)
        done = s.finish(run.id, Status.FAILED, error_msg="x" * 100)
    with Store(state) as s:
        assert s.get(run.id) == done
        assert [c.type.value for c in s.changes()] == ["run_created", "run_started",
                                                        "run_finished"]
    assert verify.check(state).ok


def test_enospc_during_compaction_is_clean(tmp_path: pathlib.Path) -> None:
    """ENOSPC while writing the compacted copy: StoreIOError, journal untouched, no temp
    file left behind, the store still works."""
    state = tmp_path / "s"
    with Store(state) as s:
        for i in range(5):
            s.create(run_for(f"m{i}", "h", status=Status.COMPLETED))
    before = (state / "runs.jsonl").read_bytes()
    fs = FailingFS("write", 1, errno.ENOSPC, persistent=True)
    fs.armed = False
    with Store(state, _fs=fs) as s:
        fs.armed = True
        with pytest.raises(StoreIOError) as info:
            s.compact()
        fs.armed = False
        assert info.value.errno == errno.ENOSPC
        assert (state / "runs.jsonl").read_bytes() == before
        assert sorted(p.name for p in state.iterdir()) == ["runs.jsonl", "runs.lock"]
        assert len(s.list()) == 5


# -- an fsync error, then a power loss ------------------------------------------------------


def _fsyncgate(base: pathlib.Path, seeds: range) -> tuple[int, int, list[str]]:
    scratch = Scratch(str(base))
    states = histories = 0
    problems: list[str] = []
    for seed in seeds:
        rng = random.Random(seed)
        fail_at = frozenset({rng.randrange(2, 6)})
        h = record_history(str(base / f"h{seed}"), rng, 8, durable=True,
                           rec=RecordingFS(fail_fdatasync=fail_at))
        histories += 1
        for k, files in crash_states(h.rec, rng, exhaustive=True, limit=120):
            states += 1
            problem = check_crash_state(scratch, files, h, k)
            if problem is not None:
                problems.append(f"seed {seed} (fdatasync #{min(fail_at)} failed): {problem}")
    return histories, states, problems


def test_fsync_error_then_power_loss(tmp_path: pathlib.Path, capsys: Any) -> None:
    """After a failed fdatasync the kernel may have dropped the unsynced pages: a change
    acknowledged after that (by a later, successful sync) must survive a power loss."""
    started = time.monotonic()
    histories, states, problems = _fsyncgate(tmp_path, range(sized(3, 40)))
    figure(capsys, "fsync error then power loss", histories=histories,
           crash_states_explored=states, violations=len(problems),
           seconds=round(time.monotonic() - started, 1))
    assert problems == [], problems[:5]


class _WriteAndCutFail(FailingFS):
    """The first append is short and then fails, and cutting it back fails too: a torn
    line is left in the file."""

    def __init__(self) -> None:
        super().__init__("write", 1, errno.EIO, partial=True)
        self.cut_failed = False

    def ftruncate(self, fd: int, length: int) -> None:
        if not self.cut_failed:
            self.cut_failed = True
            raise OSError(errno.EIO, "injected")
        super().ftruncate(fd, length)


def test_failed_append_whose_cut_back_fails_too(tmp_path: pathlib.Path) -> None:
    """A torn line stays in the file after a failed append: the call raises StoreIOError,
    the next call recovers the torn tail and goes on, nothing acknowledged is lost."""
    state = tmp_path / "s"
    with Store(state) as s:
        kept = s.create(run_for("a", "h", status=Status.COMPLETED))
    fds = open_fds()
    fs = _WriteAndCutFail()
    with Store(state, _fs=fs) as s:
        with pytest.raises(StoreIOError):
            s.prepare_atomic("m", "h", lambda: run_for("m", "h"))
        assert fs.cut_failed
        assert not (state / "runs.jsonl").read_bytes().endswith(b"\n")  # the torn line
        run, outcome = s.prepare_atomic("m", "h", lambda: run_for("m", "h"))
        assert outcome.value == "created"
    assert open_fds() == fds
    runs, problems = audit_store(str(state))
    assert problems == []
    assert runs[kept.id] == kept and runs[run.id] == run
