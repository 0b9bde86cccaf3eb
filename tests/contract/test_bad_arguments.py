"""Bad arguments get one clear answer, the same on both backends.

Every public method of the contract (and the constructors) checks its arguments in
``runstore/_validate.py`` before it takes a lock or opens a transaction, so ``Store`` and
``PostgresStore`` refuse the same inputs with the same ``InvalidRunError`` and message, and a
refused call leaves nothing behind. ``BAD`` is the table of inputs x methods; it runs on each
backend (a contract module), then on both at once to compare the answers, then with the
checks bypassed in the PostgreSQL backend alone, to show that the answers then differ (the
tests can fail). The CLI's duration, timeout and count options are usage errors (exit 2).
"""

from __future__ import annotations

import datetime as _dt
import io
import pathlib
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import orjson
import pytest
from backends import Backend

import runstore._ids
from runstore import InvalidRunError, Run, RunStore, RunstoreError, Status, Store

pytestmark = [pytest.mark.contract, pytest.mark.timeout(300)]

BIG = 2**63  # one past the largest signed 64-bit integer
SMALL = -(2**63) - 1
NUL = "a\x00b"
SURROGATE = "a\ud800b"
UTC = _dt.UTC
#: the latest instant whose offset -14:00 cannot be converted to UTC, and the earliest +14:00
LATE = _dt.datetime.max.replace(tzinfo=_dt.timezone(-_dt.timedelta(hours=14)))
EARLY = _dt.datetime.min.replace(tzinfo=_dt.timezone(_dt.timedelta(hours=14)))


@attrs.frozen
class Ctx:
    """What a case may refer to: the store and a pending run in it."""

    store: RunStore
    backend: Backend
    run: Run


Call = Callable[[Ctx], Any]
#: (case, the call, message excerpt); every case raises InvalidRunError
Case = tuple[str, Call, str]


def _run(**fields: Any) -> Run:
    return Run(**{"machine": "mz", "test_dir": "/t", "test_dir_hash": "hz", **fields})


def _record(**fields: Any) -> dict[str, Any]:
    base = {"id": "20260101T000000.000000Z-00000000000000aa", "machine": "mi",
            "test_dir": "/t", "test_dir_hash": "h", "status": "completed"}
    return {**base, **fields}


def _id_cases() -> Iterator[Case]:
    methods: dict[str, Callable[[RunStore, Any], Any]] = {
        "get": lambda s, i: s.get(i),
        "start": lambda s, i: s.start(i),
        "heartbeat": lambda s, i: s.heartbeat(i),
        "finish": lambda s, i: s.finish(i, Status.FAILED),
        "update": lambda s, i: s.update(attrs.evolve(s.get(s.list()[0].id), id=i)),
    }
    empty = "must be a non-empty string"
    bad_ids = {"''": ("", empty), "None": (None, empty), "7": (7, empty),
               "NUL": (NUL, "must not contain NUL characters"),
               "surrogate": (SURROGATE, "must not contain lone surrogates")}
    for method, fn in methods.items():
        for label, (value, excerpt) in bad_ids.items():
            yield (f"{method}(run id {label})", lambda c, fn=fn, v=value: fn(c.store, v),
                   f"run id {excerpt}")


def _text_field_cases() -> Iterator[Case]:
    for field in ("test_dir", "artifacts_path", "logs_path", "error_code", "error_msg",
                  "batch_id", "plan_entry", "owner_host", "owner_start"):
        yield (f"create({field} with NUL)",
               lambda c, f=field: c.store.create(_run(**{f: NUL})), f"{field} must not contain NUL")
        yield (f"create({field} with a lone surrogate)",
               lambda c, f=field: c.store.create(_run(**{f: SURROGATE})),
               f"{field} must not contain lone surrogates")


BAD: list[Case] = [
    *_id_cases(),
    # prepare_atomic
    *[(f"prepare_atomic(machine {v!r})", lambda c, v=v: c.store.prepare_atomic(
        v, "h", lambda: _run()), "machine must") for v in ("", None, 7, NUL, SURROGATE)],
    *[(f"prepare_atomic(hash {v!r})", lambda c, v=v: c.store.prepare_atomic(
        "m1", v, lambda: _run()), "test_dir_hash must") for v in ("", None, 3, NUL, SURROGATE)],
    ("prepare_atomic(make=None)", lambda c: c.store.prepare_atomic("m7", "h", None),
     "make must be a callable"),
    ("prepare_atomic(reap='yes')", lambda c: c.store.prepare_atomic(
        "m7", "h", lambda: _run(), reap="yes"), "reap must be True or False"),
    ("prepare_atomic(make() gives exit_code 2**63)", lambda c: c.store.prepare_atomic(
        "m7", "h7", lambda: Run("m7", "/t", "h7", exit_code=BIG)), "signed 64-bit range"),
    # create: the run's own fields
    *_text_field_cases(),
    *[(f"create(machine {v!r})", lambda c, v=v: c.store.create(
        Run(v, "/t", "h")), "machine must") for v in ("", NUL, SURROGATE)],
    ("create(exit_code 2**63)", lambda c: c.store.create(
        _run(status=Status.FAILED, exit_code=BIG)), "exit_code 9223372036854775808 is outside"),
    ("create(exit_code -2**63 - 1)", lambda c: c.store.create(
        _run(status=Status.FAILED, exit_code=SMALL)), "signed 64-bit range"),
    ("create(owner_pid 2**63)", lambda c: c.store.create(
        _run(status=Status.FAILED, owner_pid=BIG)), "owner_pid 9223372036854775808"),
    ("create(revision 2**63)", lambda c: c.store.create(_run(revision=BIG)),
     "revision 9223372036854775808"),
    ("create(exit_code '0')", lambda c: c.store.create(_run(exit_code="0")),
     "exit_code must be an int or None"),
    ("create(ended_at max at -14:00)", lambda c: c.store.create(
        _run(status=Status.FAILED, ended_at=LATE)), "ended_at 9999-12-31T23:59:59.999999-14:00"
     " is outside the datetime range once converted to UTC"),
    ("create(started_at min at +14:00)", lambda c: c.store.create(_run(started_at=EARLY)),
     "started_at 0001-01-01T00:00:00+14:00 is outside the datetime range"),
    ("create(naive heartbeat_at)", lambda c: c.store.create(
        _run(heartbeat_at=_dt.datetime(2026, 1, 1))), "heartbeat_at is a naive datetime"),
    ("create(status 'skipped')", lambda c: c.store.create(_run(status="skipped")),
     "unknown status 'skipped'"),
    ("create(not a Run)", lambda c: c.store.create({"machine": "m"}), "expected a runstore.Run"),
    # update
    ("update(exit_code 2**64)", lambda c: c.store.update(attrs.evolve(
        c.store.get(c.run.id), exit_code=2**64)), "exit_code 18446744073709551616 is outside"),
    ("update(error_msg with NUL)", lambda c: c.store.update(attrs.evolve(
        c.store.get(c.run.id), error_msg=NUL)), "error_msg must not contain NUL"),
    ("update(heartbeat_at max at -14:00)", lambda c: c.store.update(attrs.evolve(
        c.store.get(c.run.id), heartbeat_at=LATE)), "heartbeat_at 9999-12-31T23:59:59.999999"),
    # finish
    ("finish(exit_code 2**63)", lambda c: c.store.finish(c.run.id, "failed", exit_code=BIG),
     "exit_code 9223372036854775808 is outside the signed 64-bit range"),
    ("finish(exit_code -2**63 - 1)", lambda c: c.store.finish(
        c.run.id, "failed", exit_code=SMALL), "signed 64-bit range"),
    ("finish(exit_code True)", lambda c: c.store.finish(c.run.id, "failed", exit_code=True),
     "exit_code must be an int or None, got True"),
    ("finish(error_msg with NUL)", lambda c: c.store.finish(c.run.id, "failed",
                                                           error_msg=NUL), "error_msg must not"),
    ("finish(error_code with a lone surrogate)", lambda c: c.store.finish(
        c.run.id, "failed", error_code=SURROGATE), "error_code must not contain lone"),
    ("finish(error_msg 5)", lambda c: c.store.finish(c.run.id, "failed", error_msg=5),
     "error_code and error_msg must be strings"),
    ("finish(status 'skipped')", lambda c: c.store.finish(c.run.id, "skipped"),
     "unknown status 'skipped'"),
    # queries
    ("list(machine=7)", lambda c: c.store.list(machine=7), "machine must be a non-empty"),
    ("list(machine='')", lambda c: c.store.list(machine=""), "machine must be a non-empty"),
    ("list(machine with NUL)", lambda c: c.store.list(machine=NUL), "machine must not"),
    ("list(batch_id=7)", lambda c: c.store.list(batch_id=7), "batch_id must be a string"),
    ("list(batch_id with a lone surrogate)", lambda c: c.store.list(batch_id=SURROGATE),
     "batch_id must not contain lone surrogates"),
    ("list(status=7)", lambda c: c.store.list(status=7), "status must be a status"),
    ("list(status='skipped')", lambda c: c.store.list(status="skipped"), "unknown status"),
    *[(f"active_by_machine({v!r})", lambda c, v=v: c.store.active_by_machine(v),
       "machine must") for v in (None, "", 7, NUL, SURROGATE)],
    ("find_by_test_dir_hash_and_machine(7, 'm1')",
     lambda c: c.store.find_by_test_dir_hash_and_machine(7, "m1"), "test_dir_hash must"),
    ("find_by_test_dir_hash_and_machine('h', None)",
     lambda c: c.store.find_by_test_dir_hash_and_machine("h", None), "machine must"),
    ("find_by_test_dir_hash_and_machine(hash with NUL)",
     lambda c: c.store.find_by_test_dir_hash_and_machine(NUL, "m1"), "test_dir_hash must"),
    *[(f"batch_summary({v!r})", lambda c, v=v: c.store.batch_summary(v), "batch_id must")
      for v in ("", None, NUL)],
    # reap and prune
    ("reap(stale_after=timedelta.max)", lambda c: c.store.reap(
        stale_after=_dt.timedelta.max), "stale_after must not reach back before the year 1"),
    ("reap(stale_after=-1 s)", lambda c: c.store.reap(
        stale_after=_dt.timedelta(seconds=-1)), "stale_after must be a non-negative timedelta"),
    ("reap(stale_after=60)", lambda c: c.store.reap(stale_after=60),
     "stale_after must be a non-negative timedelta"),
    ("reap(dry_run='no')", lambda c: c.store.reap(stale_after=_dt.timedelta(1), dry_run="no"),
     "dry_run must be True or False"),
    ("prune(older_than=timedelta.max)", lambda c: c.store.prune(
        older_than=_dt.timedelta.max), "older_than must not reach back before the year 1"),
    ("prune(older_than=-1 day)", lambda c: c.store.prune(older_than=_dt.timedelta(-1)),
     "older_than must be a non-negative timedelta"),
    ("prune()", lambda c: c.store.prune(), "exactly one of older_than or keep_last"),
    ("prune(keep_last=-1)", lambda c: c.store.prune(keep_last=-1), "keep_last must be"),
    ("prune(keep_last=True)", lambda c: c.store.prune(keep_last=True), "keep_last must be"),
    ("prune(keep_last=2**63)", lambda c: c.store.prune(keep_last=BIG),
     "keep_last 9223372036854775808 is outside"),
    ("prune(archive=7)", lambda c: c.store.prune(keep_last=0, archive=7),
     "archive must be a path"),
    ("prune(archive='')", lambda c: c.store.prune(keep_last=0, archive=""),
     "archive must be a non-empty path"),
    ("prune(archive with NUL)", lambda c: c.store.prune(keep_last=0, archive="/tmp/a\x00"),
     "archive must not contain NUL"),
    ("prune(dry_run=1)", lambda c: c.store.prune(keep_last=0, dry_run=1),
     "dry_run must be True or False"),
    # the change feed
    *[(f"changes({v!r})", lambda c, v=v: c.store.changes(v), "since_seq must")
      for v in (-1, True, "1")],
    ("changes(2**63)", lambda c: c.store.changes(BIG), "since_seq 9223372036854775808"),
    ("watch(since_seq=-1)", lambda c: c.store.watch(-1, timeout=0), "since_seq must"),
    *[(f"watch(timeout={v!r})", lambda c, v=v: c.store.watch(0, timeout=v),
       "timeout must be a") for v in (float("nan"), float("inf"), -1.0, "1", 1e300)],
    *[(f"watch(poll_interval={v!r})", lambda c, v=v: c.store.watch(
        0, timeout=0, poll_interval=v), "poll_interval must be a")
      for v in (float("nan"), float("inf"), -0.5, None)],
    # export and import
    ("export(7)", lambda c: c.store.export(7), "export needs a file object"),
    ("export(None)", lambda c: c.store.export(None), "export needs a file object"),
    ("import_runs(7)", lambda c: c.store.import_runs(7), "import_runs needs a file object"),
    ("import_runs('runs.json')", lambda c: c.store.import_runs("runs.json"),
     "to import a file by name, open it"),
    ("import_runs(exit_code 2**63)", lambda c: c.store.import_runs([_record(exit_code=BIG)]),
     "exit_code 9223372036854775808 is outside"),
    ("import_runs(revision 2**63)", lambda c: c.store.import_runs([_record(revision=BIG)]),
     "revision 9223372036854775808 is outside"),
    ("import_runs(machine with NUL)", lambda c: c.store.import_runs([_record(machine=NUL)]),
     "machine must not contain NUL"),
    ("import_runs(error_msg with a lone surrogate)", lambda c: c.store.import_runs(
        [_record(error_msg=SURROGATE)]), "error_msg must not contain lone surrogates"),
    ("import_runs(id '')", lambda c: c.store.import_runs([_record(id="")]),
     "id must be a non-empty string"),
    ("import_runs(a Run with a NUL logs_path)", lambda c: c.store.import_runs(
        [attrs.evolve(_run(status=Status.FAILED, logs_path=NUL), id="r1")]),
     "logs_path must not contain NUL"),
    # the constructors
    *[(f"open(lock_timeout={v!r})", lambda c, v=v: c.backend.open(lock_timeout=v),
       "lock_timeout must be a") for v in (float("nan"), float("inf"), -1, "1", True, 1e300)],
    ("open(durable='yes')", lambda c: c.backend.open(durable="yes"),
     "durable must be True or False"),
]


def _state(store: RunStore) -> tuple[int, list[Run]]:
    return store.last_seq(), store.list()


def _answers(store: RunStore, backend: Backend, run: Run) -> dict[str, tuple[str, str]]:
    """(error type, message with the run's id replaced by <id>) of every case of ``BAD``;
    ("no error", repr of the result) when a call was not refused."""
    ctx = Ctx(store, backend, run)
    out = {}
    for name, call, _excerpt in BAD:
        try:
            result = call(ctx)
        except Exception as exc:
            out[name] = (type(exc).__name__, str(exc).replace(run.id, "<id>"))
        else:
            if hasattr(result, "close"):
                result.close()
            out[name] = ("no error", repr(result)[:200])
    return out


def _seed(store: RunStore) -> Run:
    """One finished and one pending run; the pending one is returned."""
    done = store.create(Run("m0", "/t", "h0"))
    store.finish(done.id, Status.FAILED, exit_code=0)
    return store.create(Run("m1", "/t", "h1"))


def test_names_are_unique() -> None:
    """Each case of the table has its own name (the answers are compared by name)."""
    names = [name for name, _call, _excerpt in BAD]
    assert len(names) == len(set(names))
    assert len(names) > 120


def test_every_bad_input_is_refused_and_changes_nothing(store: RunStore,
                                                       backend: Backend) -> None:
    """Every case of the table, on this backend: InvalidRunError with the message excerpt,
    and the store's runs and change feed exactly as before."""
    run = _seed(store)
    before = _state(store)
    wrong = []
    for name, answer in _answers(store, backend, run).items():
        excerpt = next(e for n, _c, e in BAD if n == name)
        if answer[0] != InvalidRunError.__name__ or excerpt not in answer[1]:
            wrong.append((name, answer, excerpt))
    assert wrong == []
    assert _state(store) == before


@pytest.mark.postgres
def test_both_backends_give_the_same_answer(tmp_path: pathlib.Path, pg_dsn: str) -> None:
    """The same table on a file store and a PostgreSQL table at once: the same error type
    and the very same message for every case (run ids aside)."""
    file_side = Backend("file", str(tmp_path / "s"))
    pg_side = Backend("postgres", pg_dsn, f"runs_{uuid.uuid4().hex[:8]}")
    with file_side.open() as a, pg_side.open() as b:
        answers_a = _answers(a, file_side, _seed(a))
        answers_b = _answers(b, pg_side, _seed(b))
    differ = {name: (answers_a[name], answers_b[name])
              for name in answers_a if answers_a[name] != answers_b[name]}
    assert differ == {}
    assert {kind for kind, _msg in answers_a.values()} == {"InvalidRunError"}


class _Bypass(types.ModuleType):
    """A stand-in for ``runstore._validate`` that checks nothing: every check returns its
    first argument."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: args[0] if args else None


@pytest.mark.postgres
def test_without_the_shared_checks_the_backends_disagree(
        tmp_path: pathlib.Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: with the shared checks bypassed for the PostgreSQL backend alone, the
    two answer differently (a bad run id is "not found" there, a lone surrogate an encoding
    error, a time the checks refuse is stored), so the comparison above can fail."""
    file_side = Backend("file", str(tmp_path / "s"))
    pg_side = Backend("postgres", pg_dsn, f"runs_{uuid.uuid4().hex[:8]}")
    with file_side.open() as a, pg_side.open() as b:
        import runstore._base
        import runstore.postgres

        answers_a = _answers(a, file_side, _seed(a))
        # the checks both backends share live in their base class: bypass them, and the
        # PostgreSQL backend's own, for the PostgreSQL side only
        monkeypatch.setattr(runstore._base, "_validate", _Bypass("bypass"))
        monkeypatch.setattr(runstore.postgres, "_validate", _Bypass("bypass"))
        answers_b = _answers(b, pg_side, _seed(b))
        # a time the checks refuse on update went in, and the run cannot be read back
        with pytest.raises(InvalidRunError, match="timestamp too large"):
            b.list(machine="m1")
    assert answers_a["get(run id '')"][0] == "InvalidRunError"
    assert answers_b["get(run id '')"][0] == "RunNotFoundError"
    assert answers_b["get(run id 7)"][0] == "DatabaseError"
    assert answers_b["get(run id surrogate)"][0] == "UnicodeEncodeError"
    assert answers_b["update(heartbeat_at max at -14:00)"][0] == "no error"
    differ = [name for name in answers_a if answers_a[name] != answers_b[name]]
    assert len(differ) > 20


@pytest.mark.postgres
def test_without_the_shared_checks_a_file_store_keeps_what_cannot_migrate(
        tmp_path: pathlib.Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant, the other way round: with the checks bypassed in the file store, it
    stores an exit code between 2**63 and 2**64 (its JSON holds unsigned 64-bit integers)
    and a NUL in a message, and the export then cannot be imported into PostgreSQL. With
    the checks, the file store refuses them at once."""
    import runstore._base
    import runstore.store

    pg_side = Backend("postgres", pg_dsn, f"runs_{uuid.uuid4().hex[:8]}")
    with Store(tmp_path / "s") as a, pg_side.open() as b:
        run = a.create(Run("m1", "/t", "h"))
        with pytest.raises(InvalidRunError, match="exit_code"):
            a.finish(run.id, Status.FAILED, exit_code=BIG)
        monkeypatch.setattr(runstore._base, "_validate", _Bypass("bypass"))
        monkeypatch.setattr(runstore.store, "_validate", _Bypass("bypass"))
        a.finish(run.id, Status.FAILED, exit_code=BIG, error_msg="x\x00y")
        assert a.get(run.id).exit_code == BIG
        buf = io.StringIO()
        a.export(buf)
        with pytest.raises(InvalidRunError, match="error_msg must not contain NUL"):
            b.import_runs(io.StringIO(buf.getvalue()))
        record = {**orjson.loads(buf.getvalue())[0], "error_msg": "x"}
        with pytest.raises(InvalidRunError, match="exit_code 9223372036854775808 is outside"):
            b.import_runs([record])
        assert b.list() == []


# -- a refused call leaves nothing behind -----------------------------------------------------


def test_the_corrected_call_then_succeeds(store: RunStore, backend: Backend) -> None:
    """After each refusal, the same call with the argument corrected succeeds in the same
    process (no lock held, no transaction left open, nothing half stored)."""
    with pytest.raises(InvalidRunError, match="machine must not contain NUL"):
        store.prepare_atomic("m\x00", "h", lambda: Run("m", "/t", "h"))
    run, outcome = store.prepare_atomic("m", "h", lambda: Run("m", "/t", "h"))
    assert outcome.value == "created"
    with pytest.raises(InvalidRunError, match="signed 64-bit"):
        store.prepare_atomic("m2", "h", lambda: Run("m2", "/t", "h", exit_code=BIG))
    assert store.prepare_atomic("m2", "h", lambda: Run("m2", "/t", "h"))[1].value == "created"
    with pytest.raises(InvalidRunError, match="exit_code"):
        store.finish(run.id, Status.FAILED, exit_code=BIG)
    with pytest.raises(InvalidRunError, match="error_msg"):
        store.finish(run.id, Status.FAILED, exit_code=1, error_msg="bad\x00")
    done = store.finish(run.id, Status.FAILED, exit_code=1, error_msg="bad")
    assert (done.status, done.exit_code, done.revision) == (Status.FAILED, 1, 2)
    with pytest.raises(InvalidRunError, match="test_dir"):
        store.create(Run("m3", "/t\x00", "h"))
    assert store.create(Run("m3", "/t", "h")).revision == 1
    with pytest.raises(InvalidRunError, match="exit_code"):
        store.import_runs([_record(exit_code=BIG)])
    assert store.import_runs([_record(exit_code=BIG - 1)]) == 1
    with pytest.raises(InvalidRunError, match="older_than"):
        store.prune(older_than=_dt.timedelta.max)
    assert store.prune(older_than=_dt.timedelta(0), dry_run=True) == 1  # the one finished
    with pytest.raises(InvalidRunError, match="stale_after"):
        store.reap(stale_after=_dt.timedelta.max)
    assert store.reap(stale_after=_dt.timedelta(days=1)) == []
    with pytest.raises(InvalidRunError, match="timeout"):
        store.watch(0, timeout=float("inf"))
    kinds = [c.type.value for c in store.watch(0, timeout=0)]
    assert kinds == ["run_created", "run_created", "run_finished", "run_created",
                     "run_created"]
    assert [r.machine for r in store.list()] == ["m", "m2", "m3", "mi"]


def test_a_refused_constructor_leaves_the_store_usable(backend: Backend,
                                                      store: RunStore) -> None:
    """A handle refused for its lock_timeout holds nothing: another one opens at once and
    writes."""
    for value in (float("nan"), float("inf")):
        with pytest.raises(InvalidRunError, match="lock_timeout"):
            backend.open(lock_timeout=value)
    with backend.open(lock_timeout=0.5) as other:
        assert other.lock_timeout == 0.5
        other.create(Run("m5", "/t", "h"))
    assert [r.machine for r in store.list()] == ["m5"]


def test_the_limits_themselves_are_stored_and_read_back(store: RunStore,
                                                       backend: Backend) -> None:
    """What the checks let through, both backends store and return unchanged: the ends of
    the 64-bit range, the first and last instants in UTC, any other Unicode."""
    first = _dt.datetime.min.replace(tzinfo=UTC)
    last = _dt.datetime.max.replace(tzinfo=UTC)
    text = "naïve ☃ 𝄞 \u200b\t\n"
    made = store.create(Run("m-\u00e9", text, "h", status=Status.FAILED, exit_code=BIG - 1,
                            started_at=first, ended_at=last, error_msg=text,
                            owner_pid=-BIG))
    again = store.get(made.id)
    assert again == made
    assert (again.exit_code, again.owner_pid) == (BIG - 1, -BIG)
    assert (again.started_at, again.ended_at) == (first, last)
    with backend.open() as other:
        assert other.get(made.id) == made
        buf = io.StringIO()
        other.export(buf)
    assert str(BIG - 1) in buf.getvalue()


def test_a_path_is_an_export_target_on_both(store: RunStore, backend: Backend,
                                           tmp_path: pathlib.Path) -> None:
    """export(path) writes the document on both backends (the same call, the same file)."""
    store.create(Run("m1", "/t", "h"))
    target = tmp_path / "out.json"
    assert store.export(target) == 1
    assert '"machine":"m1"' in target.read_text().replace(" ", "")


# -- the CLI: usage errors, never a traceback -----------------------------------------------


CLI_BAD = [
    (["prune", "--older-than", "999999999d"], "argument --older-than: '999999999d' reaches "
     "back before the year 1"),
    (["prune", "--older-than", "99999999999d"], "reaches back before the year 1"),
    (["reap", "--stale-after", "999999999d"], "argument --stale-after: '999999999d' reaches"),
    (["list", "--since", "999999999d"], "argument --since: '999999999d' reaches back"),
    (["list", "--since", "99999999999w"], "reaches back before the year 1"),
    (["--lock-timeout", "1e400", "list"], "argument --lock-timeout: expected a number of "
     "seconds >= 0 (finite"),
    (["--lock-timeout", "nan", "list"], "argument --lock-timeout: expected a number"),
    (["--lock-timeout", "inf", "list"], "got 'inf'"),
    (["--lock-timeout", "1e300", "list"], "at most 2147483"),
    (["watch", "--timeout", "inf"], "argument --timeout: expected a number of seconds"),
    (["prune", "--keep-last", "9223372036854775808"], "argument --keep-last: expected an "
     "integer >= 0 (at most 2**63 - 1)"),
    (["watch", "--since", "9223372036854775808"], "argument --since: expected an integer"),
]


@pytest.mark.file_only
@pytest.mark.usefixtures("clean_cli_env")
@pytest.mark.parametrize(("argv", "excerpt"), CLI_BAD, ids=[" ".join(a) for a, _ in CLI_BAD])
def test_cli_out_of_range_options_are_usage_errors(
        run_cli: Callable[..., tuple[int, str, str]], tmp_path: pathlib.Path,
        argv: list[str], excerpt: str) -> None:
    """Exit 2 with one line naming the option, nothing on stdout, no traceback; the store
    is not created."""
    code, out, err = run_cli("--state-dir", str(tmp_path / "s"), *argv)
    assert (code, out) == (2, "")
    assert excerpt in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.file_only
@pytest.mark.usefixtures("clean_cli_env")
def test_cli_without_its_checks_fails_later(
        run_cli: Callable[..., tuple[int, str, str]], tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: with the CLI's own range checks gone (its durations taken as
    parsed, any float a timeout), the same inputs are no usage errors: the library refuses
    them after the store was opened (exit 1), or the subtraction overflows."""
    from runstore import _clifmt, cli

    monkeypatch.setattr(cli, "_duration", _clifmt.parse_duration)
    monkeypatch.setattr(cli, "_since",
                        lambda t: runstore._ids.utcnow() - _clifmt.parse_duration(t))
    monkeypatch.setattr(cli, "_seconds", float)
    Store(tmp_path / "s").close()
    code, _out, err = run_cli("--state-dir", str(tmp_path / "s"), "prune", "--older-than",
                              "999999999d")
    assert code == 1 and "older_than must not reach back" in err
    code, _out, err = run_cli("--state-dir", str(tmp_path / "s"), "--lock-timeout", "1e400",
                              "list")
    assert code == 1 and "lock_timeout must be a finite number" in err
    with pytest.raises(OverflowError):
        run_cli("--state-dir", str(tmp_path / "s"), "list", "--since", "999999999d")


# -- a run's kept fields count towards its size ----------------------------------------------

#: a kept (unknown) field of an imported run that leaves about 150 KB of the record's limit
KEPT = {"kept_blob": "k" * 900_000}


def _grow_beside_kept_fields(store: RunStore) -> dict[str, str]:
    """A run imported with a 900 KB kept field, then changes that would take its record
    past ``MAX_RECORD_BYTES`` only with the kept field counted: each call's outcome (the
    error's type and message, or "ok"), then whether the stored run changed."""
    record = _record(id="20260101T000000.000000Z-00000000000000bb", machine="mk",
                     status="pending", **KEPT)
    store.import_runs([record])
    run_id = record["id"]
    out = {}
    calls = {
        "start": lambda: store.start(run_id),
        "finish(error_msg 200 KB)": lambda: store.finish(run_id, Status.FAILED,
                                                          error_msg="z" * 200_000),
        "update(logs_path 200 KB)": lambda: store.update(
            attrs.evolve(store.get(run_id), logs_path="/l/" + "y" * 200_000)),
        "heartbeat": lambda: store.heartbeat(run_id),
        "finish(error_msg 1 KB)": lambda: store.finish(run_id, Status.FAILED,
                                                        error_msg="z" * 1000),
    }
    for name, call in calls.items():
        before = store.get(run_id)
        try:
            call()
            out[name] = "ok"
        except RunstoreError as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
            assert store.get(run_id) == before, f"{name} changed the run it refused"
    return out


def test_kept_fields_count_towards_a_run_s_size(store: RunStore) -> None:
    """A change that takes a run with large kept fields past the limit is refused, as on
    the file store, and leaves the run as it was; smaller changes go through."""
    out = _grow_beside_kept_fields(store)
    assert {name: answer.split(":")[0] for name, answer in out.items()} == {
        "start": "ok", "finish(error_msg 200 KB)": "InvalidRunError",
        "update(logs_path 200 KB)": "InvalidRunError", "heartbeat": "ok",
        "finish(error_msg 1 KB)": "ok"}


@pytest.mark.postgres
def test_kept_fields_count_the_same_on_both_backends(tmp_path: pathlib.Path,
                                                     pg_dsn: str) -> None:
    """The same changes on a file store and a PostgreSQL table: the same answers, word for
    word."""
    file_side = Backend("file", str(tmp_path / "s"))
    pg_side = Backend("postgres", pg_dsn, f"runs_{uuid.uuid4().hex[:8]}")
    with file_side.open() as a, pg_side.open() as b:
        assert _grow_beside_kept_fields(a) == _grow_beside_kept_fields(b)


#: kept fields whose values and order the store must give back as imported
KEPT_AS_WRITTEN = {"xb": 1, "xf": 1e16, "xz": -0.0, "xa": 2.5e-300, "xn": [1e15, 0.1]}


def _kept_back(store: RunStore) -> list[tuple[str, str]]:
    """A run imported with ``KEPT_AS_WRITTEN``, then changed, exported: each kept field's
    name, type and value (with its sign), in the exported order."""
    record = _record(id="20260101T000000.000000Z-00000000000000cc", machine="mk",
                     status="pending", **KEPT_AS_WRITTEN)
    store.import_runs([record])
    store.start(record["id"])
    out = io.StringIO()
    store.export(out)
    (exported,) = orjson.loads(out.getvalue())
    return [(name, f"{type(value).__name__} {value!r}") for name, value in exported.items()
            if name in KEPT_AS_WRITTEN]


def test_kept_fields_come_back_as_imported(store: RunStore) -> None:
    """A float stays a float (1e16, not 10000000000000000), -0.0 keeps its sign, and the
    kept fields keep their order."""
    assert _kept_back(store) == [
        ("xb", "int 1"), ("xf", "float 1e+16"), ("xz", "float -0.0"),
        ("xa", "float 2.5e-300"), ("xn", "list [1000000000000000.0, 0.1]")]
