"""The benchmarks still run, at tiny sizes, and their correctness checks pass (never speed)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """``benchmarks.bench_cycle``, importable whatever directory pytest was started from."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("benchmarks.bench_cycle")


def _run(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.timeout(60)
def test_cycle_benchmark_runs_and_its_checks_pass(tmp_path: Path) -> None:
    """bench_cycle at N=100, 1 s per case: every case measured and no correctness problem
    (its --workdir does not exist yet: it is made)."""
    done = _run("benchmarks.bench_cycle", "--sizes", "100", "--seconds", "1",
                "--impls", "runstore,sqlite,wholefile", "--out", str(tmp_path),
                "--workdir", str(tmp_path / "not" / "yet"), "--no-plot")
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    cases = {(c["impl"], c["durable"]): c for c in results["cases"]}
    assert set(cases) == {(i, d) for i in ("runstore", "sqlite", "wholefile")
                          for d in (True, False)}
    for case in cases.values():
        assert case["problems"] == [], case
        assert case["ops"] > 0 and case["outcomes"].get("created", 0) > 0, case
        assert case["rounds"] == 5
    assert {r["versus"] for r in results["ratios"]} == {"sqlite", "wholefile"}
    assert (tmp_path / "results.md").exists()


def test_default_impls_include_runstore_on_postgres(bench: ModuleType) -> None:
    """Without --impls every implementation is asked for, runstore-pg included (it is then
    skipped, with its reason, when no PostgreSQL server can be started)."""
    assert bench.parse_args([]).impls == ["runstore", "sqlite", "wholefile", "postgres",
                                          "runstore-pg"]


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_cycle_benchmark_runstore_pg(bench: ModuleType, tmp_path: Path) -> None:
    """bench_cycle with runstore-pg at N=100: both modes measured, checks pass, and the
    table carries runstore's ratio against it (skipped without PostgreSQL, failed instead
    when RUNSTORE_REQUIRE_POSTGRES=1)."""
    reason = importlib.import_module("benchmarks.impls").RunstorePgImpl.unavailable()
    if reason:
        if os.environ.get("RUNSTORE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"RUNSTORE_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    done = _run("benchmarks.bench_cycle", "--sizes", "100", "--seconds", "1",
                "--impls", "runstore,runstore-pg", "--out", str(tmp_path),
                "--workdir", str(tmp_path), "--no-plot", timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    cases = {(c["impl"], c["durable"]): c for c in results["cases"]}
    assert set(cases) == {(i, d) for i in ("runstore", "runstore-pg") for d in (True, False)}
    for case in cases.values():
        assert case["problems"] == [], case
        assert case["ops"] > 0 and case["outcomes"].get("created", 0) > 0, case
    assert {(r["versus"], r["durable"]) for r in results["ratios"]} == {
        ("runstore-pg", True), ("runstore-pg", False)}
    table = (tmp_path / "results.md").read_text()
    assert sum(line.startswith("| runstore-pg |") for line in table.splitlines()) == 2


@pytest.mark.timeout(60)
def test_fresh_benchmark_runs(tmp_path: Path) -> None:
    """bench_fresh at N=100: both fresh processes create their run and report memory, so
    does runstore's on the store given a tail of 100 cycles, and the process kept open
    through cycles, a full index and a compaction reports its own (its --workdir does not
    exist yet: it is made)."""
    done = _run("benchmarks.bench_fresh", "--sizes", "100", "--repeat", "1",
                "--out", str(tmp_path), "--workdir", str(tmp_path / "not" / "yet"))
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "fresh.json").read_text())
    assert results["problems"] == []
    assert {(r["impl"], r["tail_lines"]) for r in results["rows"]} == {
        ("runstore", 0), ("sqlite", 0), ("runstore", 300)}
    assert all(r["vmhwm_mb"] > 0 and r["process_s"] > 0 for r in results["rows"])
    [life] = results["lifetime"]
    assert life["n"] == 100
    assert 0 < life["open_vmrss_mb"] <= life["vmhwm_mb"]
    assert life["index_vmrss_mb"] <= life["vmhwm_mb"]
    assert life["compact_s"] > 0
    assert "RSS indexed" in (tmp_path / "fresh.md").read_text()


def test_rounds_rotate_the_implementations(bench: ModuleType,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A case's seconds are split into rounds; every implementation runs once per round,
    the order rotating, so none always runs first (or last) while the machine drifts."""
    calls: list[tuple[str, float]] = []

    def fake_round(name: str, where: str, durable: bool, seconds: float, args: Any,
                   seed: int) -> list[dict[str, Any]]:
        calls.append((name, seconds))
        return [{"impl": name}]

    monkeypatch.setattr(bench, "run_round", fake_round)
    args = bench.parse_args(["--seconds", "3", "--rounds", "3"])
    rounds = bench.run_rounds(["a", "b", "c"], dict.fromkeys("abc", ""), 10, True, args)
    assert [name for name, _ in calls] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {seconds for _, seconds in calls} == {1.0}
    assert {name: len(each) for name, each in rounds.items()} == {"a": 3, "b": 3, "c": 3}


def test_a_case_counts_only_the_rounds_wall_time(bench: ModuleType) -> None:
    """Operations per second over the rounds: the time between rounds (other
    implementations running) is not counted."""
    def report(start: int, end: int, ops: int) -> dict[str, Any]:
        return {"errors": [], "t_start": start, "t_end": end, "ops": ops, "outcomes": {},
                "lat": {kind: b"" for kind in bench.KINDS}, "open_s": 0.0, "created": [],
                "others": [], "incomplete": []}

    rounds = [[report(0, 10**9, 100), report(10**8, 9 * 10**8, 50)],
              [report(5 * 10**9, 6 * 10**9, 150)]]
    case = bench.summarize("runstore", 10, True, rounds)
    assert case["rounds"] == 2 and case["ops"] == 300
    assert case["wall_s"] == 2.0 and case["ops_per_s"] == 150.0


def _report(created: list[tuple[Any, ...]], others: list[tuple[Any, ...]]) -> dict[str, Any]:
    return {"created": created, "others": others}


def test_checks_accept_a_correct_history(bench: ModuleType) -> None:
    """Sequential runs on a machine and a BUSY answered during one of them pass."""
    reports = [
        _report([("a", 0, 0, 10, 20, 30, 40)], [("a", 0, 1, "busy", 25, 28)]),
        _report([("b", 0, 1, 35, 50, 60, 70)], []),
    ]
    assert bench.check_concurrency(reports) == []


def test_checks_catch_overlapping_active_runs(bench: ModuleType) -> None:
    """Two runs of one machine active at once (created before the other's finish) fail."""
    reports = [_report([("a", 0, 0, 10, 20, 30, 40)], []),
               _report([("b", 0, 0, 12, 25, 60, 70)], [])]
    problems = bench.check_concurrency(reports)
    assert len(problems) == 1 and "while run a was active" in problems[0]


def test_checks_catch_wrong_prepare_answers(bench: ModuleType) -> None:
    """REUSE/BUSY naming an unknown run, another machine's run, a run not active during the
    call, or disagreeing with the hashes is reported."""
    created = [("a", 0, 0, 10, 20, 30, 40), ("c", 1, 0, 10, 20, 30, 40)]
    others = [("zz", 0, 0, "busy", 25, 26), ("c", 0, 0, "busy", 25, 26),
              ("a", 0, 0, "reuse", 50, 60), ("a", 0, 1, "reuse", 25, 26)]
    problems = bench.check_concurrency([_report(created, others)])
    assert len(problems) == 4, problems


def test_checks_catch_duplicate_run_ids(bench: ModuleType) -> None:
    """The same run id created twice (on any machines) is reported."""
    reports = [_report([("a", 0, 0, 10, 20, 30, 40)], []),
               _report([("a", 2, 0, 100, 110, 120, 130)], [])]
    assert bench.check_concurrency(reports) == ["run id a created 2 times"]


def test_checks_know_runs_whose_cycle_an_error_cut_short(bench: ModuleType) -> None:
    """A BUSY naming a run created just before a worker's error is not itself reported."""
    reports = [{"created": [], "others": [], "incomplete": [("a", 0, 0, 10, 20)]},
               _report([], [("a", 0, 1, "busy", 500, 510)])]
    assert bench.check_concurrency(reports) == []


def test_verify_store_finds_lost_runs(bench: ModuleType, tmp_path: Path) -> None:
    """A created run id the store does not hold is reported after the measurement."""
    impls = importlib.import_module("benchmarks.impls")
    where = str(tmp_path / "store")
    impls.RunstoreImpl.preload(where, 3)
    problems = bench.verify_store("runstore", where, 3, ["no-such-run"])
    assert any("missing" in p for p in problems), problems
    assert bench.verify_store("runstore", where, 3, []) == []


def test_sync_benchmark_runs(tmp_path: Path) -> None:
    """bench_sync, a fraction of a second per way: every way commits and reports its syncs
    (the gate may skip some, the others sync once per commit)."""
    done = _run("benchmarks.bench_sync", "--seconds", "0.2", "--workdir", str(tmp_path / "w"))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| way")}
    assert set(rows) == {"inside", "after", "gate", "prealloc", "sidelog"}
    for way, line in rows.items():
        commits, syncs = (float(x.replace(",", "")) for x in line.split("|")[2:4])
        assert commits > 0 and 0 < syncs <= commits, (way, line)


@pytest.mark.timeout(60)
def test_inlock_benchmark_runs() -> None:
    """bench_inlock: the timed two-process cycle reports every call with time under the flock
    no longer than the call (and, durable, time in fdatasync within it), and the two-store
    turns count their operations."""
    done = _run("benchmarks.bench_inlock", "--seconds", "0.5")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if "under the flock" in line]
    assert [row[0] for row in rows] == ["prepare_atomic", "start", "finish"]
    for row in rows:
        held, whole = float(row[4]), float(row[8])
        assert 0 < held <= whole, row
    durable = _run("benchmarks.bench_inlock", "--seconds", "0.5", "--durable")
    assert durable.returncode == 0, durable.stdout + durable.stderr
    assert "2 processes, durable:" in durable.stdout
    rows = [line.split() for line in durable.stdout.splitlines() if "in fdatasync" in line]
    assert [row[0] for row in rows] == ["prepare_atomic", "start", "finish"]
    for row in rows:
        synced, whole = float(row[8]), float(row[12])
        assert 0 < synced < whole, row  # every write syncs, after the flock, within the call
    turns = _run("benchmarks.bench_inlock", "--turns", "5")
    assert turns.returncode == 0, turns.stdout + turns.stderr
    assert 10 <= int(turns.stdout.split()[0]) <= 40


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_pg_clients_benchmark_quick(tmp_path: Path) -> None:
    """bench_pg_clients --quick, through its delaying proxy too: every case measured without
    a client error, ratios to the anchor reported (skipped without PostgreSQL, failed
    instead when RUNSTORE_REQUIRE_POSTGRES=1)."""
    reason = importlib.import_module("benchmarks.impls").RunstorePgImpl.unavailable()
    if reason:
        if os.environ.get("RUNSTORE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"RUNSTORE_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    done = _run("benchmarks.bench_pg_clients", "--quick", "--proxy-delay-ms", "1",
                "--out", str(tmp_path), "--no-plot", timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "pg_clients.json").read_text())
    got = {(c["impl"], c["clients"], c["via"]) for c in results["cases"]}
    assert got == {*((i, n, "direct") for i in ("postgres-lock", "postgres", "runstore-pg",
                                                 "runstore") for n in (1, 2)),
                   *((i, 2, "proxy 1 ms") for i in ("postgres-lock", "postgres", "runstore-pg"))}
    assert all(c["ops"] > 0 and c["problems"] == [] for c in results["cases"])
    assert all(r["vs_anchor"] is not None for r in results["summary"])
    assert "vs anchor" in (tmp_path / "pg_clients.md").read_text()
