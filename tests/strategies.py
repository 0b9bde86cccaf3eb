"""Hypothesis strategies for runstore's records, kept in one place (like attrs' tests)."""

from __future__ import annotations

import datetime as _dt

from hypothesis import strategies as st

from runstore import Run, Status

UTC = _dt.UTC

statuses = st.sampled_from(list(Status))
terminal_statuses = st.sampled_from([s for s in Status if s.is_terminal])
non_terminal_statuses = st.sampled_from([s for s in Status if not s.is_terminal])

#: any text both backends store: no NUL (PostgreSQL text cannot hold one; Hypothesis leaves
#: out lone surrogates by default, and so must this alphabet)
texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
                max_size=40)
#: what ``machine`` / ``test_dir_hash`` / ids accept: non-empty, no NUL
names = st.text(min_size=1, max_size=24).filter(lambda s: "\x00" not in s)
#: small, readable machine names for tests that make machines collide
machines = st.sampled_from(["m1", "m2", "m3"])
hashes = st.sampled_from(["h-a", "h-b"])

exit_codes = st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1)
pids = st.none() | st.integers(min_value=1, max_value=2**22)

#: realistic instants (ids and RFC 3339 need four-digit years)
utc_datetimes = st.datetimes(
    min_value=_dt.datetime(2000, 1, 1), max_value=_dt.datetime(2200, 1, 1), timezones=st.just(UTC)
)
fixed_offsets = st.builds(
    _dt.timezone,
    st.timedeltas(min_value=_dt.timedelta(hours=-23, minutes=-59),
                  max_value=_dt.timedelta(hours=23, minutes=59)).map(
        lambda d: _dt.timedelta(minutes=d // _dt.timedelta(minutes=1))),
)
#: aware datetimes in any fixed offset (the store stores them as UTC)
aware_datetimes = st.datetimes(
    min_value=_dt.datetime(2000, 1, 2), max_value=_dt.datetime(2199, 12, 30),
    timezones=fixed_offsets,
)
optional_utc = st.none() | utc_datetimes


@st.composite
def runs(draw: st.DrawFn, *, status: st.SearchStrategy[Status] = statuses) -> Run:
    """Any valid stored version of a run (UTC timestamps, every field exercised)."""
    return Run(
        machine=draw(names),
        test_dir=draw(texts),
        test_dir_hash=draw(names),
        id=draw(names),
        status=draw(status),
        exit_code=draw(exit_codes),
        started_at=draw(optional_utc),
        ended_at=draw(optional_utc),
        artifacts_path=draw(texts),
        logs_path=draw(texts),
        error_code=draw(texts),
        error_msg=draw(texts),
        batch_id=draw(texts),
        plan_entry=draw(texts),
        revision=draw(st.integers(min_value=0, max_value=2**31)),
        owner_host=draw(texts),
        owner_pid=draw(pids),
        owner_start=draw(texts),
        heartbeat_at=draw(optional_utc),
    )


@st.composite
def new_runs(
    draw: st.DrawFn,
    *,
    machine: st.SearchStrategy[str] = machines,
    test_dir_hash: st.SearchStrategy[str] = hashes,
    status: st.SearchStrategy[Status] = statuses,
) -> Run:
    """A run as a caller hands it to ``create()``: no owner, optional details."""
    return Run(
        machine=draw(machine),
        test_dir=draw(st.sampled_from(["/tests/a", "/tests/b"])),
        test_dir_hash=draw(test_dir_hash),
        status=draw(status),
        exit_code=draw(exit_codes),
        artifacts_path=draw(st.sampled_from(["", "/art/1"])),
        batch_id=draw(st.sampled_from(["", "b1", "b2"])),
        plan_entry=draw(st.sampled_from(["", "plan/1"])),
        error_msg=draw(texts),
    )


#: field changes a caller may make through ``update()`` (status changes included)
update_changes = st.fixed_dictionaries(
    {},
    optional={
        "status": statuses,
        "logs_path": st.sampled_from(["", "/logs/1", "/logs/2"]),
        "artifacts_path": st.sampled_from(["", "/art/2"]),
        "batch_id": st.sampled_from(["", "b1", "b2"]),
        "plan_entry": st.sampled_from(["", "plan/2"]),
        "exit_code": exit_codes,
        "error_msg": texts,
    },
)
