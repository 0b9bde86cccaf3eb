"""Write-ahead acknowledgement logs of child processes: a child logs each call before it
makes it (``AckLog.invoke``) and after it returned (``AckLog.ack``); the parent reads them
(``read_acks``) and checks the reopened store for acknowledged changes it lost
(``lost_acks``, ``audit_store``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import attrs
import orjson

from runstore import Run, Status, Store, _statedir, verify
from runstore.errors import RunstoreError
from runstore.stress import check_journal

# -- write-ahead acknowledgement logs of child processes ------------------------------------


class AckLog:
    """A child's log: ``invoke(op, key)`` before a call, ``ack(op, run)`` after it returned,
    each flushed at once, so the parent knows what a SIGKILLed child had acknowledged."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _put(self, *item: Any) -> None:
        os.write(self._fd, orjson.dumps(item) + b"\n")

    def invoke(self, op: str, key: str = "") -> None:
        self._put("i", op, key)

    def ack(self, op: str, run: Run | None = None) -> None:
        if run is None:
            self._put("a", op, "", 0, "")
        else:
            self._put("a", op, run.id, run.revision, run.status.value)

    def close(self) -> None:
        os.close(self._fd)


@attrs.define
class Acked:
    """What a set of acknowledgement logs says: the latest acknowledged revision and status
    of each run, and the run (if any) of each call that was in flight when a child died."""

    runs: dict[str, tuple[int, str]] = attrs.Factory(dict)
    in_flight: list[tuple[str, str]] = attrs.Factory(list)
    acks: int = 0


def read_acks(paths: Sequence[str]) -> Acked:
    out = Acked()
    for path in paths:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            continue
        pending = None
        for line in raw.split(b"\n"):
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if item[0] == "i":
                pending = (item[1], item[2])
                continue
            pending = None
            out.acks += 1
            _op, rid, rev, status = item[1:5]
            if rid and rev > out.runs.get(rid, (0, ""))[0]:
                out.runs[rid] = (rev, status)
        if pending is not None:
            out.in_flight.append(pending)
    return out


def lost_acks(acked: Acked, runs: dict[str, Run]) -> list[str]:
    """Acknowledged changes missing from ``runs`` (the reopened store's runs by id): a run
    whose stored revision is older than acknowledged, or whose acknowledged terminal
    version was changed."""
    lost = []
    for rid, (rev, status) in acked.runs.items():
        got = runs.get(rid)
        if got is None:
            lost.append(f"run {rid} (revision {rev}, {status}) is missing")
        elif got.revision < rev or (got.revision == rev and got.status.value != status) or (
            Status(status).is_terminal and got.revision != rev
        ):
            lost.append(f"run {rid}: acknowledged revision {rev} ({status}), stored "
                        f"{got.revision} ({got.status.value})")
    return lost


def audit_store(state_dir: str) -> tuple[dict[str, Run], list[str]]:
    """Open the store, read every run and re-check the file: returns the runs by id and the
    problems found (an unreadable store, a bad file, two active runs on a machine)."""
    problems: list[str] = []
    try:
        with Store(state_dir, lock_timeout=10) as store:
            runs = {r.id: r for r in store.list()}
    except (RunstoreError, OSError) as exc:
        return {}, [f"store unreadable: {type(exc).__name__}: {exc}"]
    report = verify.check(state_dir)
    problems.extend(f"check: {p.message}" for p in report.problems)
    jc = check_journal(os.path.join(state_dir, _statedir.DATA_NAME))
    problems.extend(f"journal: {p}" for p in jc.problems)
    active: dict[str, str] = {}
    for run in runs.values():
        if not run.status.is_terminal:
            if run.machine in active:
                problems.append(f"machine {run.machine} has two active runs "
                                f"{active[run.machine]} and {run.id}")
            active[run.machine] = run.id
    return runs, problems
