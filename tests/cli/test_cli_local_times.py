"""Times at the ends of datetime's range, in zones west and east of UTC. Every command that
shows a stored time shows it in local time, or, where the local time is outside datetime's
range, in UTC followed by ``Z``: never a traceback. ``list --since`` reads every date whose
UTC moment is within the range (a date without an offset as local time) and refuses, as a
usage error, only the others."""

from __future__ import annotations

import argparse
import datetime as _dt
import pathlib
from collections.abc import Callable, Iterator

import pytest
from clocks import local_zone

from runstore import Change, ChangeType, Run, Status, Store, _cli_args, _cli_watch, _clifmt

Cli = Callable[..., tuple[int, str, str]]
pytestmark = pytest.mark.usefixtures("clean_cli_env")

_FIRST = _dt.datetime.min.replace(tzinfo=_dt.UTC)
_LAST = _dt.datetime.max.replace(tzinfo=_dt.UTC, microsecond=0)
_SECOND = _dt.timedelta(seconds=1)
_HOUR = _dt.timedelta(hours=1)


@pytest.fixture(params=["UTC", "EST5", "XXX-14"])
def tz(request: pytest.FixtureRequest) -> Iterator[str]:
    """The local zone for the test: UTC, 5 hours west of it, 14 hours east."""
    with local_zone(request.param):
        yield request.param


def _runs() -> list[Run]:
    """Runs started in the first second of the year 1 (one finished, one running) and one
    in the last hour of 9999."""
    return [
        Run("m", "/t", "h", id="y1", status=Status.COMPLETED, exit_code=0,
            started_at=_FIRST, ended_at=_FIRST + _SECOND),
        Run("r", "/t", "h", id="y1r", status=Status.RUNNING, started_at=_FIRST),
        Run("m", "/t", "h", id="y9", status=Status.COMPLETED, exit_code=0,
            started_at=_LAST - _HOUR, ended_at=_LAST),
    ]


@pytest.fixture(params=["compacted", "journal"])
def store(request: pytest.FixtureRequest, store_dir: pathlib.Path) -> pathlib.Path:
    """A store holding ``_runs()``, compacted (``list`` reads the base's lines) or not."""
    with Store(store_dir, durable=False) as s:
        s.import_runs(_runs())
        if request.param == "compacted":
            s.compact()
    return store_dir


def _first_date(tz: str) -> str:
    """How a time in the first second of the year 1 shows as a date."""
    if tz == "EST5":  # 5 hours before the year 1 in local time
        return "0001-01-01Z"
    return _FIRST.astimezone().strftime("%Y-%m-%d")


#: (arguments, the runs whose rows it shows)
_COMMANDS = [
    (["list"], ["y1", "y1r", "y9"]),
    (["list", "--machine", "m"], ["y1", "y9"]),
    (["list", "--status", "running"], ["y1r"]),
    (["list", "--limit", "3"], ["y1", "y1r", "y9"]),
    (["list", "--since", "0001-01-01T00:00Z"], ["y1", "y1r", "y9"]),
    (["active"], ["y1r"]),
    (["active", "r"], ["y1r"]),
]


@pytest.mark.parametrize(("argv", "shown"), _COMMANDS, ids=[" ".join(a) for a, _ in _COMMANDS])
def test_tables_show_times_at_the_edges(run_cli: Cli, store: pathlib.Path, tz: str,
                                        argv: list[str], shown: list[str]) -> None:
    code, out, err = run_cli("--state-dir", str(store), *argv)
    assert (code, err) == (0, ""), err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert sorted(rows) == shown, out
    for run_id in shown:
        if run_id.startswith("y1"):
            assert _first_date(tz) in rows[run_id], out
        else:  # in the future: no date shown
            assert "in" in rows[run_id], out


@pytest.mark.parametrize("run_id", ["y1", "y1r", "y9"])
def test_show_shows_times_at_the_edges(run_cli: Cli, store: pathlib.Path, tz: str,
                                       run_id: str) -> None:
    code, out, err = run_cli("--state-dir", str(store), "show", run_id)
    assert (code, err) == (0, ""), err
    fields = dict(line.split(None, 1) for line in out.splitlines() if " " in line.strip())
    if run_id == "y9":
        assert fields["started_at"].startswith("9999-12-31T22:59:59Z (in "), out
    else:
        assert fields["started_at"] == f"0001-01-01T00:00:00Z ({_first_date(tz)})", out


#: (TZ, a --since value, the UTC moment it means, or None where that is outside the range)
_SINCE: list[tuple[str, str, _dt.datetime | None]] = [
    ("UTC", "0001-01-01", _FIRST),
    ("UTC", "0001-01-01T00:00", _FIRST),
    ("UTC", "9999-12-31", _dt.datetime(9999, 12, 31, tzinfo=_dt.UTC)),
    ("UTC", "9999-12-31T23:59:59.999999", _dt.datetime.max.replace(tzinfo=_dt.UTC)),
    ("EST5", "0001-01-01", _FIRST + 5 * _HOUR),
    ("EST5", "9999-12-31T18:59:59.999999", _dt.datetime.max.replace(tzinfo=_dt.UTC)),
    ("EST5", "9999-12-31T19:00", None),
    ("EST5", "9999-12-31T23:59", None),
    ("XXX-14", "0001-01-01", None),
    ("XXX-14", "0001-01-01T13:59:59.999999", None),
    ("XXX-14", "0001-01-01T14:00", _FIRST),
    ("XXX-14", "9999-12-31T23:59", _dt.datetime(9999, 12, 31, 9, 59, tzinfo=_dt.UTC)),
    ("XXX-14", "9999-12-31T23:59:59.999999", _dt.datetime.max.replace(tzinfo=_dt.UTC)
     - 14 * _HOUR),
]


@pytest.mark.parametrize(("zone", "since", "moment"), _SINCE,
                         ids=[f"TZ={z} {s}" for z, s, _ in _SINCE])
def test_since_takes_every_date_within_the_range(
        run_cli: Cli, store: pathlib.Path, zone: str, since: str,
        moment: _dt.datetime | None) -> None:
    with local_zone(zone):
        if moment is None:
            with pytest.raises(argparse.ArgumentTypeError, match="years 1 to 9999"):
                _cli_args._since(since)
        else:
            assert _cli_args._since(since) == moment
        code, out, err = run_cli("--state-dir", str(store), "list", "--since", since)
    if moment is None:
        assert (code, out) == (2, ""), err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "argument --since: " in err and "years 1 to 9999" in err, err
    else:
        assert (code, err) == (0, ""), err
        listed = sorted(line.split()[0] for line in out.splitlines()[1:])
        assert listed == sorted(r.id for r in _runs() if r.started_at >= moment), out


@pytest.mark.parametrize("moment", [_FIRST, _LAST], ids=["year 1", "year 9999"])
def test_watch_shows_change_times_at_the_edges(tz: str, moment: _dt.datetime) -> None:
    """A change's time (written by another host's clock, or edited) is shown as ``show``
    shows a time: local, or in UTC with ``Z`` where the local time is out of range."""
    change = Change(seq=1, time=moment, type=ChangeType.RUN_CREATED, run=_runs()[0])
    ctx = argparse.Namespace(paint=_clifmt.Painter(False))
    line = _cli_watch._change_line(ctx, change)  # type: ignore[arg-type]
    assert _clifmt.local_text(moment, clock=True) in line
    outside = tz == ("EST5" if moment == _FIRST else "XXX-14")
    assert line.split()[2].endswith("Z") == outside, line
