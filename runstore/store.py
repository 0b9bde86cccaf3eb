"""``Store``: the run-store contract on a JSON-lines journal, with one read-modify-write path.

Every public method runs ``_transact(decide)``: take the lock (mutex, then flock), bring the
in-memory view up to date with what other processes appended (or reload when the file was
replaced), let ``decide`` look at the view and return its result plus the new run versions to
store, append those as one write, update the view, and release the lock. In durable mode the
``fdatasync`` happens after the flock is released and before the call returns (group commit:
one sync can cover the writes of several processes), so other processes may *read* a change a
moment before it is durable; a change is acknowledged only once it is.

The view keeps what queries need and no more: the offset of every run's latest version, the
non-terminal runs themselves (by id and by machine), and counters. Terminal runs are read back
from the file on demand, so the cost of an operation does not grow with the history.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import attrs

from . import codec, ids, owner, transitions
from .errors import (
    ConflictError,
    CorruptStoreError,
    InvalidRunError,
    InvalidTransitionError,
    MachineBusyError,
    RunNotFoundError,
    StoreIOError,
)
from .fsio import DEFAULT as DEFAULT_FS
from .fsio import FileSystem
from .journal import TORN_TAIL_LIMIT, Cursor, Damage, Header, Journal, durable_beyond, scan
from .lock import StoreLock
from .model import ChangeType, PrepareOutcome, Run, Status

T = TypeVar("T")
_Decision = tuple[T, list[tuple[ChangeType, Run]]]

#: automatic compaction runs when superseded lines exceed both this and the live run count,
#: so the file stays within about twice its live size plus this many lines
COMPACT_MIN_SUPERSEDED = 1024
_ACTIVE = frozenset({Status.PENDING.value, Status.RUNNING.value})


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class Store:
    """Run records in one journal file under ``state_dir``; safe across threads and processes.

    ``durable=False`` skips ``fdatasync`` (a power loss may then lose the latest changes, never
    corrupt older ones). ``lock_timeout`` bounds every wait for the lock
    (``LockTimeoutError``).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        durable: bool = True,
        lock_timeout: float = 30.0,
        _fs: FileSystem | None = None,
    ) -> None:
        self.state_dir = os.fspath(state_dir)
        self.durable = durable
        self.lock_timeout = lock_timeout
        self._journal = Journal(self.state_dir, _fs or DEFAULT_FS)
        self._lock = StoreLock(self._journal.open_lock_file, self._journal.lock_path)
        self._pid = os.getpid()
        self._closed = False
        self._unmarked_writes = False
        self._reset_view()
        try:
            self._transact(lambda: (None, []))  # open (or create) now: fail fast on a bad store
        except BaseException:
            self._lock.close()
            self._journal.close()
            raise

    # -- the view -----------------------------------------------------------------------

    def _reset_view(self) -> None:
        self._header: Header | None = None
        self._cur: Cursor | None = None
        self._index: dict[str, int] = {}  # id -> offset of its latest version (insertion order)
        self._active: dict[str, Run] = {}  # the non-terminal runs
        self._machines: dict[str, list[str]] = {}  # machine -> its non-terminal run ids
        self._extras: dict[str, dict[str, Any]] = {}  # fields we do not know, per run id
        self._max_id = ""
        self._superseded = 0
        self._synced = 0  # bytes of the current file this process knows to be synced
        self._stale = True

    def _index_version(self, offset: int, run_id: str, active: Run | None) -> None:
        """Record that the latest version of ``run_id`` is at ``offset``; ``active`` is the
        run when it is non-terminal, else None."""
        if run_id in self._index:
            self._superseded += 1
        elif run_id > self._max_id:
            self._max_id = run_id
        self._index[run_id] = offset
        before = self._active.get(run_id)
        if active is not None:
            self._active[run_id] = active
            if before is None:
                self._machines.setdefault(active.machine, []).append(run_id)
        elif before is not None:
            del self._active[run_id]
            peers = self._machines[before.machine]
            peers.remove(run_id)
            if not peers:
                del self._machines[before.machine]

    def _ingest_record(self, offset: int, data: dict[str, Any]) -> None:
        run_id = data["id"]
        active = None
        if data["status"] in _ACTIVE:
            try:
                active = codec.run_from_dict(data)
            except codec.BadLine as exc:
                raise CorruptStoreError(self._journal.path, offset,
                                        f"run {run_id!r} has a malformed field: {exc.reason}")
        extra = codec.extra_fields(data)
        if extra:
            self._extras[run_id] = extra
        else:
            self._extras.pop(run_id, None)
        self._index_version(offset, run_id, active)

    # -- catching up with the file ------------------------------------------------------

    def _catch_up(self) -> None:
        j = self._journal
        if self._pid != os.getpid():  # forked: the parent's view and descriptors are not ours
            self._pid = os.getpid()
            j.after_fork()
            self._stale = True
        if self._stale or j.fd is None or j.disk_ident() != j.ident:
            self._load()
            return
        cur = self._cur
        assert cur is not None
        buf = j.read_from(cur.end)
        if buf:
            self._ingest(buf, cur.end)

    def _load(self) -> None:
        """(Re)build the view from the whole file, creating the journal when missing."""
        self._reset_view()
        j = self._journal
        header = j.open() if j.exists() else j.create()
        j.remove_stale_temps()
        self._header = header
        first_end = j.read_line(0)
        start = len(first_end) + 1
        self._cur = Cursor(end=start, next_seq=header.compacted_through + 1,
                           durable=header.base_end, base_end=header.base_end,
                           compacted_through=header.compacted_through)
        buf = j.read_from(start)
        self._ingest(buf, start)
        self._synced = self._cur.durable
        self._stale = False

    def _ingest(self, buf: bytes, start: int) -> None:
        cur = self._cur
        assert cur is not None
        result = scan(buf, start, cur)
        try:
            for offset, data in result.records:
                self._ingest_record(offset, data)
        except BaseException:
            self._stale = True
            raise
        if result.damage is not None:
            self._recover(buf, start, result.damage)

    def _recover(self, buf: bytes, start: int, damage: Damage) -> None:
        """A damaged line: cut it off when it can only be a torn, unsynced write; raise,
        leaving the file untouched, when it lies in data known to be durable."""
        cur = self._cur
        assert cur is not None
        path = self._journal.path
        self._stale = True  # whatever happens next, do not trust this view without a reload
        if damage.offset < cur.durable:
            raise CorruptStoreError(
                path, damage.offset,
                f"{damage.reason}, inside the part of the file known to be synced "
                f"(the first {cur.durable} bytes)")
        proof = durable_beyond(buf, start, damage)
        if proof is not None:
            raise CorruptStoreError(
                path, damage.offset,
                f"{damage.reason}; a valid record at byte {proof} shows this part had been synced")
        dropped = start + len(buf) - damage.offset
        if dropped > TORN_TAIL_LIMIT:
            raise CorruptStoreError(
                path, damage.offset,
                f"{damage.reason}, followed by {dropped} bytes: too much to be a torn write")
        self._journal.truncate(damage.offset, damage.reason)
        self._stale = False

    # -- the one read-modify-write path -------------------------------------------------

    def _transact(self, decide: Callable[[], _Decision[T]]) -> T:
        if self._closed:
            raise ValueError(f"the store at {self.state_dir} is closed")
        lock = self._lock
        lock.acquire(self.lock_timeout)
        wrote_to = -1
        try:
            self._catch_up()
            result, changes = decide()
            if changes:
                wrote_to = self._commit(changes)
                if self._superseded > max(COMPACT_MIN_SUPERSEDED, len(self._index)):
                    self._compact()
        except BaseException:
            lock.release()
            raise
        lock.release_file()
        try:
            if wrote_to >= 0 and self.durable and self._synced < wrote_to:
                try:
                    self._journal.sync()
                except StoreIOError:
                    self._stale = True  # after a failed sync, trust only what a re-read shows
                    raise
                self._synced = max(self._synced, wrote_to)
        finally:
            lock.release_mutex()
        return result

    def _commit(self, changes: list[tuple[ChangeType, Run]]) -> int:
        """Append one line per change and index them; return the new end of the file."""
        cur = self._cur
        assert cur is not None
        now = _utcnow()
        durable = max(self._synced, cur.durable)
        seq = cur.next_seq
        lines = []
        for change, run in changes:
            lines.append(codec.encode_record(seq, change, now, durable, run,
                                             self._extras.get(run.id)))
            seq += 1
        start = cur.end
        try:
            self._journal.append(b"".join(lines), start)
        except StoreIOError:
            self._stale = True
            raise
        offset = start
        for (_change, run), line in zip(changes, lines):
            self._index_version(offset, run.id, None if run.status.is_terminal else run)
            offset += len(line)
        cur.end, cur.next_seq = offset, seq
        self._unmarked_writes = True
        return offset

    def _compact(self) -> None:
        """Rewrite the file with the latest version of each run (the lock is held)."""
        j, cur, header = self._journal, self._cur, self._header
        assert cur is not None and header is not None
        buf = j.read_from(0)
        lines = []
        for offset in self._index.values():
            lines.append(buf[offset:buf.index(b"\n", offset) + 1])
        del buf
        base = sum(map(len, lines))
        head = codec.encode_header(header.store_id, header.created, cur.next_seq - 1, base)
        try:
            j.replace_with([head, *lines])
            self._header = j.open()
        except BaseException:
            self._stale = True
            raise
        offset = len(head)
        for run_id, line in zip(list(self._index), lines):
            self._index[run_id] = offset
            offset += len(line)
        self._cur = Cursor(end=offset, next_seq=cur.next_seq, durable=offset, base_end=offset,
                           compacted_through=cur.next_seq - 1)
        self._synced = offset
        self._superseded = 0

    # -- reading runs -------------------------------------------------------------------

    def _run_at(self, offset: int, line: bytes | None = None) -> Run:
        raw = self._journal.read_line(offset) if line is None else line
        try:
            data = codec.decode_line(raw)
            return codec.run_from_dict(data)
        except codec.BadLine as exc:
            raise CorruptStoreError(self._journal.path, offset,
                                    f"a stored run is unreadable: {exc.reason}") from None

    def _lookup(self, run_id: str) -> Run:
        transitions.require_text("run id", run_id)
        run = self._active.get(run_id)
        if run is not None:
            return run
        offset = self._index.get(run_id)
        if offset is None:
            raise RunNotFoundError(run_id, self._journal.path)
        return self._run_at(offset)

    def _all_runs(self) -> Iterator[Run]:
        buf = self._journal.read_from(0)
        for run_id, offset in self._index.items():
            run = self._active.get(run_id)
            if run is None:
                run = self._run_at(offset, buf[offset:buf.index(b"\n", offset)])
            yield run

    # -- the public contract ------------------------------------------------------------

    def prepare_atomic(
        self, machine: str, test_dir_hash: str, make: Callable[[], Run]
    ) -> tuple[Run, PrepareOutcome]:
        """In one critical section: return the machine's non-terminal run (REUSE when its
        hash matches, else BUSY), or call ``make()`` and store its run as pending (CREATED)."""
        transitions.require_text("machine", machine)
        transitions.require_text("test_dir_hash", test_dir_hash)

        def decide() -> _Decision[tuple[Run, PrepareOutcome]]:
            peers = self._machines.get(machine)
            if peers:
                active = self._active[peers[0]]
                same = active.test_dir_hash == test_dir_hash
                return (active, PrepareOutcome.REUSE if same else PrepareOutcome.BUSY), []
            made = make()
            if not isinstance(made, Run):
                raise InvalidRunError(f"make() must return a runstore.Run, got {made!r}")
            if made.machine != machine or made.test_dir_hash != test_dir_hash:
                raise InvalidRunError(
                    f"make() returned a run for machine {made.machine!r} and hash "
                    f"{made.test_dir_hash!r}; prepare_atomic was asked for machine "
                    f"{machine!r} and hash {test_dir_hash!r}")
            run = self._new(made, Status.PENDING)
            return (run, PrepareOutcome.CREATED), [(ChangeType.RUN_CREATED, run)]

        return self._transact(decide)

    def _new(self, run: Run, status: Status) -> Run:
        """A validated fresh version of ``run`` with a new id, revision 1 and, when
        non-terminal, this process as owner."""
        run = transitions.validate(attrs.evolve(run, status=status))
        fields: dict[str, Any] = {"id": ids.new_run_id(self._max_id), "revision": 1}
        if not status.is_terminal:
            fields.update(zip(("owner_host", "owner_pid", "owner_start"), owner.current()))
        return attrs.evolve(run, **fields)

    def create(self, run: Run) -> Run:
        """Store ``run`` under a new unique id (any id it has is overwritten)."""
        run = transitions.validate(run)

        def decide() -> _Decision[Run]:
            if not run.status.is_terminal and run.machine in self._machines:
                occupant = self._active[self._machines[run.machine][0]]
                raise MachineBusyError(run.machine, occupant.id)
            new = self._new(run, run.status)
            return new, [(ChangeType.RUN_CREATED, new)]

        return self._transact(decide)

    def get(self, run_id: str) -> Run:
        """The run with this id; ``RunNotFoundError`` if there is none."""
        return self._transact(lambda: (self._lookup(run_id), []))

    def update(self, run: Run) -> Run:
        """Replace the stored run with the same id; returns what was stored.

        Refuses a stale copy (``ConflictError``), a forbidden status change
        (``InvalidTransitionError``) and a change of machine or hash (``InvalidRunError``).
        An unchanged copy of a terminal run is an idempotent no-op.
        """
        run = transitions.validate(run)

        def decide() -> _Decision[Run]:
            stored = self._lookup(run.id)
            if run.revision != stored.revision:
                raise ConflictError(run.id, run.revision, stored.revision)
            transitions.check_update(stored, run)
            if stored.status.is_terminal:
                if transitions.same_content(stored, run):
                    return stored, []
                raise InvalidTransitionError(run.id, stored.status.value, run.status.value,
                                             "terminal runs are final")
            new = attrs.evolve(run, revision=stored.revision + 1)
            return new, [(_change_type(stored.status, new.status), new)]

        return self._transact(decide)

    def start(self, run_id: str) -> Run:
        """pending -> running: sets ``started_at`` and makes this process the owner."""

        def decide() -> _Decision[Run]:
            stored = self._lookup(run_id)
            if stored.status is not Status.PENDING:
                raise InvalidTransitionError(run_id, stored.status.value, Status.RUNNING.value,
                                             "only a pending run can be started")
            host, pid, started = owner.current()
            new = attrs.evolve(stored, status=Status.RUNNING, started_at=_utcnow(),
                               owner_host=host, owner_pid=pid, owner_start=started,
                               revision=stored.revision + 1)
            return new, [(ChangeType.RUN_STARTED, new)]

        return self._transact(decide)

    def finish(
        self,
        run_id: str,
        status: Status | str,
        *,
        exit_code: int | None = None,
        error_code: str = "",
        error_msg: str = "",
    ) -> Run:
        """Move a run to a terminal status and set ``ended_at``. Repeating the run's current
        terminal status returns it unchanged; any other change of a terminal run is refused."""
        target = _terminal_status(run_id, status)
        if exit_code is not None and (type(exit_code) is not int):
            raise InvalidRunError(f"exit_code must be an int or None, got {exit_code!r}")
        if not isinstance(error_code, str) or not isinstance(error_msg, str):
            raise InvalidRunError("error_code and error_msg must be strings")

        def decide() -> _Decision[Run]:
            stored = self._lookup(run_id)
            if stored.status is target:
                return stored, []
            transitions.check_transition(run_id, stored.status, target)
            new = attrs.evolve(stored, status=target, ended_at=_utcnow(), exit_code=exit_code,
                               error_code=error_code, error_msg=error_msg,
                               revision=stored.revision + 1)
            return new, [(ChangeType.RUN_FINISHED, new)]

        return self._transact(decide)

    def heartbeat(self, run_id: str) -> Run:
        """Refresh ``heartbeat_at`` of a non-terminal run (as cheap as any update)."""

        def decide() -> _Decision[Run]:
            stored = self._lookup(run_id)
            if stored.status.is_terminal:
                raise InvalidTransitionError(run_id, stored.status.value, stored.status.value,
                                             "a finished run takes no heartbeat")
            new = attrs.evolve(stored, heartbeat_at=_utcnow(), revision=stored.revision + 1)
            return new, [(ChangeType.HEARTBEAT, new)]

        return self._transact(decide)

    def list(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
    ) -> list[Run]:
        """Every run (the latest version of each) matching the filters, in insertion order."""
        wanted = _status_set(status)

        def decide() -> _Decision[list[Run]]:
            runs = [
                run for run in self._all_runs()
                if (machine is None or run.machine == machine)
                and (wanted is None or run.status in wanted)
                and (batch_id is None or run.batch_id == batch_id)
            ]
            return runs, []

        return self._transact(decide)

    def active_by_machine(self, machine: str) -> Run | None:
        """The earliest-inserted non-terminal run of ``machine``, or None."""

        def decide() -> _Decision[Run | None]:
            peers = self._machines.get(machine)
            return (self._active[peers[0]] if peers else None), []

        return self._transact(decide)

    def active(self) -> list[Run]:
        """Every non-terminal run, in insertion order."""
        return self._transact(
            lambda: ([self._active[i] for i in self._index if i in self._active], []))

    def find_by_test_dir_hash_and_machine(self, test_dir_hash: str, machine: str) -> list[Run]:
        """Every run of ``machine`` with this hash, in insertion order."""
        return [r for r in self.list(machine=machine) if r.test_dir_hash == test_dir_hash]

    def compact(self) -> None:
        """Rewrite the file now, keeping only the latest version of each run."""

        def decide() -> _Decision[None]:
            self._compact()
            return None, []

        self._transact(decide)

    # -- life cycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Sync what this process wrote, mark it durable in the file, release descriptors."""
        if self._closed:
            return
        try:
            if self._unmarked_writes and self._pid == os.getpid():
                self._transact(self._mark_clean)
        finally:
            self._closed = True
            self._lock.close()
            self._journal.close()

    def _mark_clean(self) -> _Decision[None]:
        cur = self._cur
        assert cur is not None
        j = self._journal
        j.sync()
        j.append(codec.encode_mark(cur.end), cur.end)
        j.sync()
        cur.end = os.fstat(j.fd).st_size if j.fd is not None else cur.end
        self._unmarked_writes = False
        return None, []

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.state_dir!r}, durable={self.durable})"


def _change_type(old: Status, new: Status) -> ChangeType:
    if new is old:
        return ChangeType.RUN_UPDATED
    if new is Status.RUNNING:
        return ChangeType.RUN_STARTED
    return ChangeType.RUN_FINISHED if new.is_terminal else ChangeType.RUN_UPDATED


def _terminal_status(run_id: str, status: Status | str) -> Status:
    try:
        target = Status(status)
    except ValueError:
        raise InvalidRunError(f"unknown status {status!r}; use one of "
                              + ", ".join(s.value for s in Status)) from None
    if not target.is_terminal:
        raise InvalidTransitionError(run_id, "?", target.value,
                                     "finish() needs a terminal status "
                                     "(completed, failed, interrupted or timeout)")
    return target


def _status_set(status: Status | str | Iterable[Status | str] | None) -> frozenset[Status] | None:
    if status is None:
        return None
    items = [status] if isinstance(status, str) else list(status)
    try:
        return frozenset(Status(s) for s in items)
    except ValueError:
        raise InvalidRunError(f"unknown status in {status!r}") from None

