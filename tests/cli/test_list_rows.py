"""``list`` makes its table's rows from the runs as ``codec.run_to_json`` gives them, without
building a ``Run``: every cell must be the one the ``Run`` gives (``_run_table``)."""

from __future__ import annotations

import datetime as _dt
import pathlib
import types

from runstore import Run, Status, Store, _cli_read as cli_read, _clifmt as fmt

_BASE = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)


def _runs() -> list[Run]:
    return [
        Run("a", "/t", "hash-of-more-than-twelve", id="r1", status=Status.COMPLETED,
            exit_code=0, started_at=_BASE, ended_at=_BASE + _dt.timedelta(seconds=75)),
        Run("b", "/t", "h", id="r2", status=Status.FAILED, exit_code=-9,
            started_at=_BASE + _dt.timedelta(days=300)),
        Run("c", "/t", "h", id="r3", status=Status.TIMEOUT),
        Run("d", "/t", "h", id="r4", status=Status.RUNNING,
            started_at=_BASE + _dt.timedelta(days=364, hours=23)),
        Run("e", "/t", "h", id="r5", status=Status.PENDING),
    ]


def _rows(store_dir: pathlib.Path, paint: bool) -> tuple[list[list[str]], list[list[str]]]:
    ctx = types.SimpleNamespace(now=_BASE + _dt.timedelta(days=365), paint=fmt.Painter(paint))
    with Store(store_dir, durable=False) as s:
        s.import_runs(_runs())
        runs = s.list()
        exported = list(cli_read._exported_rows(ctx, s._iter_json()))  # type: ignore[arg-type]
    table = cli_read._run_table(ctx, runs)  # type: ignore[arg-type]
    built = [[cell.strip() for cell in row] for row in
             (line.split("  ") for line in table[1:])]
    return [[c for c in row if c] for row in built], exported


def test_rows_from_exported_runs_are_the_runs_rows(store_dir: pathlib.Path) -> None:
    built, exported = _rows(store_dir, paint=False)
    assert exported == built
    assert [row[5] for row in exported] == ["1m 15s", "-", "-", "1h 00m", "-"]


def test_rows_from_exported_runs_broken_variant(store_dir: pathlib.Path,
                                                monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Taking every run for a finished one loses a running run's duration so far."""
    monkeypatch.setattr(cli_read, "_TERMINAL", frozenset(s.value for s in Status))
    built, exported = _rows(store_dir, paint=False)
    assert exported != built
