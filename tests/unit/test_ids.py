"""Run ids: sortable, collision-safe, and increasing within a store even when the wall clock
steps back."""

from __future__ import annotations

import datetime as _dt
import re

import pytest
from clocks import SettableClock
from hypothesis import given, strategies as st
from strategies import utc_datetimes

from runstore import Run, Store, _ids as ids

ID_SHAPE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{16}$")


def test_id_shape_is_timestamp_then_random_suffix() -> None:
    """An id is a UTC timestamp prefix (microseconds, Z) and a 64-bit random hex suffix."""
    now = _dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=_dt.UTC)
    run_id = ids.new_run_id("", now)
    assert ID_SHAPE.match(run_id), run_id
    assert run_id.startswith("20260304T050607.890123Z-")


def test_id_prefix_is_in_utc() -> None:
    """An aware time in another offset gives the UTC timestamp prefix."""
    now = _dt.datetime(2026, 3, 4, 7, 6, 7, tzinfo=_dt.timezone(_dt.timedelta(hours=2)))
    assert ids.new_run_id("", now).startswith("20260304T050607.000000Z-")


@given(st.lists(utc_datetimes, min_size=2, max_size=30))
def test_ids_chained_through_after_always_increase(moments: list[_dt.datetime]) -> None:
    """Each id sorts after the previous one whatever the clock does (forward, equal, back)."""
    previous = ""
    for moment in moments:
        run_id = ids.new_run_id(previous, moment)
        assert run_id > previous
        assert ID_SHAPE.match(run_id), run_id
        previous = run_id


@given(utc_datetimes, utc_datetimes)
def test_id_after_a_later_id_takes_the_next_microsecond(
    earlier: _dt.datetime, later: _dt.datetime
) -> None:
    """When the clock is behind the greatest id, the prefix is that id's time plus 1 us."""
    earlier, later = min(earlier, later), max(earlier, later)
    after = ids.new_run_id("", later)
    run_id = ids.new_run_id(after, earlier)
    expected = (later.replace(tzinfo=None) + _dt.timedelta(microseconds=1)).strftime(
        "%Y%m%dT%H%M%S.%fZ")
    assert run_id > after
    assert run_id.startswith(expected + "-")


def test_id_after_an_id_of_another_shape_still_sorts_after_it() -> None:
    """An imported id that is not a runstore id still gets a greater successor."""
    after = "zzz-imported-id"
    run_id = ids.new_run_id(after, _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC))
    assert run_id > after


@pytest.mark.parametrize("after", ["zzz-imported-id", "run-42", "f47ac10b-58cc-4372-a567"])
def test_ids_after_a_foreign_id_do_not_grow(after: str) -> None:
    """A chain of ids after an imported id of another shape (e.g. a UUID, which sorts after
    every timestamp id) keeps increasing without growing: ids must not get longer per run."""
    now = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)
    chain = [after]
    for _ in range(200):
        chain.append(ids.new_run_id(chain[-1], now))
    assert chain == sorted(chain) and len(set(chain)) == len(chain)
    longest = max(len(i) for i in chain)
    assert longest <= len(after) + 40, (
        f"ids grow with every run after {after!r}: the 200th is {len(chain[-1])} characters")


def test_ids_made_at_the_same_instant_are_unique_and_increasing() -> None:
    """10,000 ids made for one frozen instant are all distinct and strictly increasing."""
    now = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)
    made = []
    previous = ""
    for _ in range(10_000):
        previous = ids.new_run_id(previous, now)
        made.append(previous)
    assert len(set(made)) == len(made)
    assert made == sorted(made)


def test_ids_without_after_are_collision_safe() -> None:
    """Ids made independently at one instant differ by their random suffix."""
    now = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)
    made = {ids.new_run_id("", now) for _ in range(10_000)}
    assert len(made) == 10_000


# -- within a store -------------------------------------------------------------------------


def test_store_ids_increase_when_the_wall_clock_steps_back(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs created later in a store get greater ids even after the clock jumps back a day."""
    clock = SettableClock(_dt.datetime(2026, 6, 1, 12, 0, tzinfo=_dt.UTC))
    monkeypatch.setattr(ids, "_dt", clock.module)
    made = [store.create(Run(f"m{i}", "/t", "h")).id for i in range(3)]
    clock.moment = _dt.datetime(2026, 5, 31, 12, 0, tzinfo=_dt.UTC)  # NTP stepped back
    made += [store.create(Run(f"m{i}", "/t", "h")).id for i in range(3, 6)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert [r.id for r in store.list()] == made


def test_store_ids_increase_across_reopen_when_the_clock_steps_back(
    store_dir: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store reopened with the clock set back still hands out greater ids."""
    clock = SettableClock(_dt.datetime(2026, 6, 1, 12, 0, tzinfo=_dt.UTC))
    monkeypatch.setattr(ids, "_dt", clock.module)
    with Store(store_dir, durable=False) as s:  # type: ignore[arg-type]  # a Path
        first = s.create(Run("m1", "/t", "h")).id
    clock.moment = _dt.datetime(2025, 1, 1, tzinfo=_dt.UTC)
    with Store(store_dir, durable=False) as s:  # type: ignore[arg-type]  # a Path
        second = s.create(Run("m2", "/t", "h")).id
        third, _ = s.prepare_atomic("m3", "h", lambda: Run("m3", "/t", "h"))
    assert first < second < third.id


@given(st.datetimes(min_value=_dt.datetime(1000, 1, 1), timezones=st.just(_dt.UTC)))
def test_prefix_formats_like_strftime(moment: _dt.datetime) -> None:
    """The id prefix is written without strftime (for speed) but reads exactly like it."""
    assert ids._prefix(moment) == moment.strftime(ids._FORMAT)


#: 2026-12-07 22:37:24.906147 in Arabic-Indic digits (they sort after every ASCII digit)
_OTHER_DIGITS = "".join(chr(0x660 + int(c)) if c.isdigit() else c
                        for c in "20261207T223724.906147Z") + "-imported"


def test_id_after_an_id_in_other_digits_sorts_after_it() -> None:
    """An imported id whose prefix is written in another script's digits is an id of
    another shape: no time is read from it, and the next id sorts after it."""
    run_id = ids.new_run_id(_OTHER_DIGITS, _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC))
    assert run_id > _OTHER_DIGITS
    assert ids.time_of(_OTHER_DIGITS) is None


_DIGITS = st.text("0123456789", min_size=1, max_size=1)


@given(st.lists(_DIGITS, min_size=20, max_size=20))
def test_a_prefix_is_read_as_strptime_reads_its_ascii_form(digits: list[str]) -> None:
    """Any 20 ASCII digits in the prefix's places are read as ``strptime`` reads them: the
    same time, or no time for a date or time that does not exist."""
    text = "{}{}{}{}{}{}{}{}T{}{}{}{}{}{}.{}{}{}{}{}{}Z".format(*digits)
    try:
        expected: _dt.datetime | None = _dt.datetime.strptime(text, ids._FORMAT)
    except ValueError:
        expected = None
    assert ids._parse_prefix(text) == expected
    assert ids._parse_prefix(text + "-") is None and ids._parse_prefix(text[:-1]) is None
