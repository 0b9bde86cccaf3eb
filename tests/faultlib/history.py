"""What a crash may show: ``record_history`` drives a store through random operations on a
``RecordingFS`` while recording what was acknowledged when (a ``History``), and
``check_crash_state`` opens one crash state and compares it with what a power loss at that
point may leave (a linearizability check against the acknowledged operations)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from runstore import (
    CorruptStoreError,
    Run,
    Status,
    Store,
    StoreIOError,
    _owner as owner,
    _statedir,
    verify,
)
from runstore.errors import RunstoreError

from .basics import run_for
from .powerloss import RecordingFS


@attrs.define
class History:
    """A store driven through random operations on a ``RecordingFS``, remembering after each
    operation the runs the store held (``snaps``), where in the log each operation started
    and returned, which returned (acknowledged) and which were durability barriers even
    without ``durable`` (compaction, close). After a failed sync the store's reads leave the
    unsynced lines out, but a crash may keep them: ``maybe`` holds the runs the file held
    after each operation that raised (None after the others)."""

    rec: RecordingFS
    durable: bool
    snaps: list[dict[str, Run]] = attrs.Factory(list)
    started: list[int] = attrs.Factory(list)
    acked: list[int | None] = attrs.Factory(list)
    barriers: list[bool] = attrs.Factory(list)
    names: list[str] = attrs.Factory(list)
    maybe: list[dict[str, Run] | None] = attrs.Factory(list)

    def allowed(self, k: int) -> tuple[int, int]:
        """The range of snapshots a crash after log position ``k`` may show: from the latest
        acknowledged change (durable mode; else the latest compaction or close) to the
        latest operation that had begun writing."""
        done = [j for j, a in enumerate(self.acked) if a is not None and a <= k
                and (self.barriers[j] if not self.durable else a > self.started[j])]
        low = max(done) if done else 0
        high = max(j for j, s in enumerate(self.started)
                   if s < k or j == 0 or (self.acked[j] is not None and self.acked[j] <= k))
        return low, high


def record_history(state_dir: str, rng: random.Random, steps: int, *, durable: bool = True,
                   rec: RecordingFS | None = None, machines: int = 2,
                   compact_every: int = 0) -> History:
    """Run ``steps`` random operations (prepare, start, heartbeat, update, finish, create,
    compact, close and reopen) on a store in ``state_dir`` through ``rec``. Snapshot 0 is
    the state after opening (creation or recovery)."""
    rec = rec or RecordingFS()
    h = History(rec, durable)
    store: Store | None = None

    def step(name: str, fn: Callable[[], Any], barrier: bool = False) -> None:
        nonlocal store
        h.started.append(rec.position)
        h.names.append(name)
        h.barriers.append(barrier)
        try:
            fn()
            h.acked.append(rec.position)
            h.maybe.append(None)
        except StoreIOError:
            h.acked.append(None)
            h.maybe.append(_runs_in_copy(state_dir))
        assert store is not None
        try:
            h.snaps.append({r.id: r for r in store.list()})
        except StoreIOError:
            h.snaps.append(dict(h.snaps[-1]) if h.snaps else {})

    def open_store() -> None:
        nonlocal store
        store = Store(state_dir, durable=durable, _fs=rec)

    step("open", open_store, barrier=True)
    for n in range(steps):
        assert store is not None
        s = store
        runs = h.snaps[-1]
        active = [r for r in runs.values() if not r.is_terminal]
        pending = [r for r in active if r.status is Status.PENDING]
        roll = rng.random()
        if compact_every and n % compact_every == compact_every - 1:
            step("compact", s.compact, barrier=True)
        elif roll < 0.30 or not active:
            m, d = f"m{rng.randrange(machines)}", f"h{rng.randrange(2)}"
            step("prepare", lambda s=s, m=m, d=d: s.prepare_atomic(m, d, lambda: run_for(m, d)))
        elif roll < 0.45 and pending:
            rid = rng.choice(pending).id
            step("start", lambda s=s, rid=rid: s.start(rid))
        elif roll < 0.55:
            rid = rng.choice(active).id
            step("heartbeat", lambda s=s, rid=rid: s.heartbeat(rid))
        elif roll < 0.62:
            r = rng.choice(active)
            new = attrs.evolve(r, artifacts_path=f"/a/{rng.randrange(1000)}")
            step("update", lambda s=s, new=new: s.update(new))
        elif roll < 0.82:
            rid = rng.choice(active).id
            st = rng.choice([x for x in Status if x.is_terminal
                             and (x is not Status.COMPLETED or runs[rid].status is Status.RUNNING)])
            step("finish", lambda s=s, rid=rid, st=st: s.finish(rid, st))
        elif roll < 0.88:
            m = f"x{rng.randrange(100)}"
            step("create", lambda s=s, m=m: s.create(run_for(m, "hx", status=Status.COMPLETED)))
        elif roll < 0.94:
            step("compact", s.compact, barrier=True)
        else:
            def reopen() -> None:
                assert store is not None
                store.close()
                open_store()
            step("reopen", reopen, barrier=True)
    assert store is not None
    store.close()
    return h


def _runs_in_copy(state_dir: str) -> dict[str, Run]:
    """The runs a copy of the journal in ``state_dir`` holds, every line taken (the store
    itself is left alone)."""
    copy = tempfile.mkdtemp()
    try:
        shutil.copyfile(os.path.join(state_dir, _statedir.DATA_NAME),
                        os.path.join(copy, _statedir.DATA_NAME))
        with Store(copy) as store:
            return {r.id: r for r in store.list()}
    finally:
        shutil.rmtree(copy)


class Scratch:
    """A scratch directory re-created for each crash state."""

    def __init__(self, base: str) -> None:
        self.path = os.path.join(base, "crash")

    def write(self, files: dict[str, bytes]) -> str:
        shutil.rmtree(self.path, ignore_errors=True)
        os.mkdir(self.path, 0o700)
        for name, data in files.items():
            fd = os.open(os.path.join(self.path, name), os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return self.path


def check_crash_state(scratch: Scratch, files: dict[str, bytes], h: History, k: int, *,
                      write_after: bool = False) -> str | None:
    """Open the crash state ``files`` (a power loss after log position ``k`` of ``h``):
    return None when it opens to one of the snapshots the crash may show, else what is
    wrong. With ``write_after`` also write to it and reopen (recovery left a usable store)."""
    path = scratch.write(files)
    low, high = h.allowed(k)
    try:
        with _rebooted(), Store(path, lock_timeout=5) as store:
            got = {r.id: r for r in store.list()}
            if write_after:
                store.create(run_for("after-crash", "h", status=Status.COMPLETED))
        report = verify.check(path)
        if not report.ok:
            return f"crash point {k}: the reopened file fails check: {report.problems[0]}"
        if write_after:
            with Store(path) as store:
                again = {r.id: r for r in store.list() if r.machine != "after-crash"}
            if again != got:
                return f"crash point {k}: a write after recovery changed the recovered runs"
    except CorruptStoreError as exc:
        return f"crash point {k}: a legal crash state was refused: {exc}"
    except (RunstoreError, OSError) as exc:
        return f"crash point {k}: {type(exc).__name__}: {exc}"
    for j in range(high, low - 1, -1):
        if got in (h.snaps[j], h.maybe[j]):
            return None
    detail = _diff(h.snaps[low], got)
    return (f"crash point {k}: the store shows none of the states {low}..{high} "
            f"(after {h.names[low]!r} .. {h.names[high]!r}); vs state {low}: {detail}")


@contextlib.contextmanager
def _rebooted() -> Iterator[None]:
    """Open a crash state as after the reboot a power loss is: another boot id, so that no
    checkpoint is taken on the word of the boot that wrote it."""
    real = owner.boot_id
    owner.boot_id = lambda: "after-the-power-loss"  # type: ignore[assignment]
    try:
        yield
    finally:
        owner.boot_id = real  # type: ignore[assignment]


def _diff(want: dict[str, Run], got: dict[str, Run]) -> str:
    missing = [i for i in want if i not in got]
    extra = [i for i in got if i not in want]
    changed = [f"{i} rev {want[i].revision}->{got[i].revision}" for i in want
               if i in got and want[i] != got[i]]
    return f"missing {missing[:3]}, extra {extra[:3]}, changed {changed[:3]}"
