"""A Hypothesis state machine: random sequences of Store calls, through two handles on one
directory, checked against a plain in-memory model of the contract after every step."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)
from strategies import (
    exit_codes,
    hashes,
    machines,
    new_runs,
    non_terminal_statuses,
    statuses,
    terminal_statuses,
    texts,
    update_changes,
)

from runstore import (
    ConflictError,
    InvalidRunError,
    InvalidTransitionError,
    MachineBusyError,
    PrepareOutcome,
    Run,
    RunNotFoundError,
    Status,
    Store,
    _limits,
)

ALLOWED = {
    Status.PENDING: {Status.RUNNING, Status.FAILED, Status.INTERRUPTED, Status.TIMEOUT},
    Status.RUNNING: {Status.COMPLETED, Status.FAILED, Status.INTERRUPTED, Status.TIMEOUT},
}
handles = st.integers(min_value=0, max_value=1)


def _may_move(old: Status, new: Status) -> bool:
    return old == new or new in ALLOWED.get(old, set())


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class StoreModel(RuleBasedStateMachine):
    """Two Store handles on one directory versus a dict of the runs the contract implies."""

    runs = Bundle("runs")

    def __init__(self) -> None:
        super().__init__()
        # checkpoints every few records, so that reopening begins at one
        self._checkpoint_every = _limits.CHECKPOINT_EVERY
        _limits.CHECKPOINT_EVERY = 3
        self.dir = tempfile.mkdtemp(prefix="runstore-stateful-")
        self.stores = [Store(self.dir, durable=False), Store(self.dir, durable=False)]
        self.model: dict[str, Run] = {}  # id -> latest version, in insertion order
        self.max_id = ""

    def teardown(self) -> None:
        try:
            for s in self.stores:
                s.close()
        finally:
            _limits.CHECKPOINT_EVERY = self._checkpoint_every
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- model helpers -----------------------------------------------------------------

    def _active_on(self, machine: str) -> Run | None:
        return next((r for r in self.model.values()
                     if r.machine == machine and not r.is_terminal), None)

    def _owner(self) -> dict[str, Any]:
        return {"owner_pid": os.getpid()}

    def _stored_new(self, run: Run) -> None:
        assert run.id and run.id not in self.model
        assert run.id > self.max_id, "ids must increase in creation order"
        assert run.revision == 1
        self.max_id = run.id
        self.model[run.id] = run

    # -- rules -------------------------------------------------------------------------

    @initialize(target=runs, machine=machines, h=hashes)
    def first_prepare(self, machine: str, h: str) -> str:
        return self.prepare(0, machine, h)  # type: ignore[return-value]  # always created

    @rule(target=runs, which=handles, machine=machines, h=hashes)
    def prepare(self, which: int, machine: str, h: str) -> object:
        calls: list[int] = []

        def make() -> Run:
            calls.append(1)
            return Run(machine, f"/tests/{h}", h, logs_path="/logs")

        active = self._active_on(machine)
        run, outcome = self.stores[which].prepare_atomic(machine, h, make)
        if active is not None:
            assert calls == []
            assert run == active
            assert outcome is (PrepareOutcome.REUSE if active.test_dir_hash == h
                               else PrepareOutcome.BUSY)
            return multiple()
        assert calls == [1] and outcome is PrepareOutcome.CREATED
        assert run == attrs.evolve(Run(machine, f"/tests/{h}", h, logs_path="/logs"), id=run.id,
                                   revision=1, owner_host=run.owner_host, owner_pid=os.getpid(),
                                   owner_start=run.owner_start)
        self._stored_new(run)
        return run.id

    @rule(target=runs, which=handles, template=new_runs())
    def create(self, which: int, template: Run) -> object:
        occupant = self._active_on(template.machine)
        if not template.is_terminal and occupant is not None:
            try:
                self.stores[which].create(template)
            except MachineBusyError as exc:
                assert exc.occupant_id == occupant.id
                return multiple()
            raise AssertionError("a second active run on a machine was accepted")
        run = self.stores[which].create(template)
        owner = {}
        if not template.is_terminal:
            owner = {"owner_host": run.owner_host, "owner_pid": os.getpid(),
                     "owner_start": run.owner_start}
        assert run == attrs.evolve(template, id=run.id, revision=1, **owner)
        self._stored_new(run)
        return run.id

    @rule(which=handles, run_id=runs)
    def start(self, which: int, run_id: str) -> None:
        old = self.model[run_id]
        if old.status is not Status.PENDING:
            try:
                self.stores[which].start(run_id)
            except InvalidTransitionError:
                return
            raise AssertionError(f"start() of a {old.status.value} run was accepted")
        before = _now()
        new = self.stores[which].start(run_id)
        assert new.started_at is not None and before <= new.started_at <= _now()
        assert new == attrs.evolve(old, status=Status.RUNNING, started_at=new.started_at,
                                   owner_host=new.owner_host, owner_pid=os.getpid(),
                                   owner_start=new.owner_start, revision=old.revision + 1)
        self.model[run_id] = new

    @rule(which=handles, run_id=runs, status=statuses, exit_code=exit_codes, msg=texts)
    def finish(self, which: int, run_id: str, status: Status, exit_code: int | None,
               msg: str) -> None:
        old = self.model[run_id]
        store = self.stores[which]
        if old.status is status and status.is_terminal:
            assert store.finish(run_id, status, exit_code=exit_code, error_msg=msg) == old
            return
        if not status.is_terminal or not _may_move(old.status, status):
            try:
                store.finish(run_id, status, exit_code=exit_code, error_msg=msg)
            except InvalidTransitionError:
                return
            raise AssertionError(f"finish() {old.status.value} -> {status.value} was accepted")
        new = store.finish(run_id, status, exit_code=exit_code, error_msg=msg)
        assert new.ended_at is not None and new.ended_at.utcoffset() == _dt.timedelta(0)
        assert new == attrs.evolve(old, status=status, ended_at=new.ended_at,
                                   exit_code=exit_code, error_code="", error_msg=msg,
                                   revision=old.revision + 1)
        self.model[run_id] = new

    @rule(which=handles, run_id=runs, changes=update_changes,
          stale=st.sampled_from([0, 0, 0, -1, 1]))
    def update(self, which: int, run_id: str, changes: dict[str, Any], stale: int) -> None:
        old = self.model[run_id]
        copy = attrs.evolve(old, revision=old.revision + stale, **changes)
        valid = _may_move(old.status, copy.status)
        if old.is_terminal:
            valid = valid and attrs.evolve(copy, revision=old.revision) == old
        store = self.stores[which]
        if stale:
            expected: Any = ConflictError if valid else (ConflictError, InvalidTransitionError)
            with pytest.raises(expected):
                store.update(copy)
            return
        if not valid:
            with pytest.raises(InvalidTransitionError):
                store.update(copy)
            return
        new = store.update(copy)
        if old.is_terminal:
            assert new == old  # an unchanged copy of a terminal run: a no-op
            return
        assert new == attrs.evolve(copy, revision=old.revision + 1)
        self.model[run_id] = new

    @rule(which=handles, run_id=runs, field=st.sampled_from(["machine", "test_dir_hash"]))
    def update_identity(self, which: int, run_id: str, field: str) -> None:
        old = self.model[run_id]
        with pytest.raises(InvalidRunError):
            self.stores[which].update(attrs.evolve(old, **{field: "changed"}))

    @rule(which=handles, run_id=runs)
    def heartbeat(self, which: int, run_id: str) -> None:
        old = self.model[run_id]
        if old.is_terminal:
            with pytest.raises(InvalidTransitionError):
                self.stores[which].heartbeat(run_id)
            return
        new = self.stores[which].heartbeat(run_id)
        assert new.heartbeat_at is not None
        assert new == attrs.evolve(old, heartbeat_at=new.heartbeat_at,
                                   revision=old.revision + 1)
        self.model[run_id] = new

    @rule(which=handles, run_id=runs)
    def get(self, which: int, run_id: str) -> None:
        assert self.stores[which].get(run_id) == self.model[run_id]

    @rule(which=handles)
    def get_missing(self, which: int) -> None:
        with pytest.raises(RunNotFoundError):
            self.stores[which].get("19990101T000000.000000Z-ffffffffffffffff")

    @rule(which=handles, machine=st.none() | machines,
          status=st.none() | statuses | st.lists(statuses, max_size=3),
          batch_id=st.none() | st.sampled_from(["", "b1", "b2"]))
    def list_filtered(self, which: int, machine: str | None,
                      status: Status | list[Status] | None, batch_id: str | None) -> None:
        wanted = None if status is None else set([status] if isinstance(status, Status)
                                                 else status)
        expected = [r for r in self.model.values()
                    if (machine is None or r.machine == machine)
                    and (wanted is None or r.status in wanted)
                    and (batch_id is None or r.batch_id == batch_id)]
        assert self.stores[which].list(machine=machine, status=status,
                                       batch_id=batch_id) == expected

    @rule(which=handles, machine=machines, h=hashes)
    def find(self, which: int, machine: str, h: str) -> None:
        expected = [r for r in self.model.values()
                    if r.machine == machine and r.test_dir_hash == h]
        assert self.stores[which].find_by_test_dir_hash_and_machine(h, machine) == expected

    @rule(which=handles)
    def compact(self, which: int) -> None:
        self.stores[which].compact()

    @rule(which=handles, durable=st.booleans())
    def reopen(self, which: int, durable: bool) -> None:
        """Reopen one handle; before anything reads every run, its non-terminal runs (from
        a checkpoint, when the file has one since the base) already match the model."""
        self.stores[which].close()
        self.stores[which] = Store(self.dir, durable=durable)
        fresh = self.stores[which]
        assert fresh.active() == [r for r in self.model.values() if not r.is_terminal]
        for machine in ("m1", "m2", "m3"):
            assert fresh.active_by_machine(machine) == self._active_on(machine)

    @rule(run_id=consumes(runs), status=terminal_statuses)
    def retire(self, run_id: str, status: Status) -> None:
        """Finish a run for good and forget its id (keeps the bundle on live runs)."""
        old = self.model[run_id]
        if old.is_terminal or not _may_move(old.status, status):
            return
        self.model[run_id] = self.stores[0].finish(run_id, status)

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def lists_match_the_model(self) -> None:
        expected = list(self.model.values())
        for s in self.stores:
            assert s.list() == expected

    @invariant()
    def active_matches_the_model(self) -> None:
        expected = [r for r in self.model.values() if not r.is_terminal]
        machines_seen = [r.machine for r in expected]
        assert len(machines_seen) == len(set(machines_seen)), "two active runs on a machine"
        store = self.stores[1]
        assert store.active() == expected
        for machine in ("m1", "m2", "m3"):
            assert store.active_by_machine(machine) == self._active_on(machine)


StoreModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("RUNSTORE_STATEFUL_EXAMPLES", "60")),
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStoreModel = pytest.mark.timeout(240)(StoreModel.TestCase)

# keep the imported strategies in use even if a rule above stops drawing one
_ = non_terminal_statuses
