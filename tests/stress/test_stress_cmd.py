"""``python -m runstore stress`` (``runstore.stress.main``): its options, its report, its exit
status, and that its checks do fail when the store misbehaves."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
from faults import break_stress_workers, figure

from runstore import Store, stress

pytestmark = pytest.mark.timeout(300)


def _json_run(capsys: Any, *args: str) -> tuple[int, dict[str, Any]]:
    code = stress.main(["--json", *args])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_json_report(capsys: Any) -> None:
    """A short default-shaped run: exit 0 and a report with every figure and check."""
    code, report = _json_run(capsys, "--seconds", "1.5", "--procs", "2", "--threads", "2")
    assert code == 0, report
    assert report["ok"] and report["violations"] == 0
    assert report["operations"] > 0 and report["ops_per_second"] > 0
    assert set(report["latency_us"]) == {"prepare", "start", "heartbeat", "finish"}
    assert report["latency_us"]["prepare"]["p99"] >= report["latency_us"]["prepare"]["p50"]
    assert set(report["outcomes"]) == {"created", "reuse", "busy"}
    names = " ".join(c["name"] for c in report["checks"])
    for word in ("overlapping", "duplicate", "gap-free", "acknowledged", "reopens"):
        assert word in names
    assert all(c["checked"] > 0 for c in report["checks"])
    figure(capsys, "stress command (2x2, 1.5 s)", operations=report["operations"],
           ops_per_second=report["ops_per_second"], violations=report["violations"])


def test_text_report(capsys: Any) -> None:
    """The human report: throughput, p50/p99 per operation, outcomes, each check."""
    code = stress.main(["--seconds", "1", "--procs", "2", "--threads", "1", "--no-durable"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "not durable" in out and "ops/s" in out
    assert "prepare p50" in out and "p99" in out
    assert "created" in out and "reuse" in out and "busy" in out
    assert out.count("ok  ") >= 5 and out.rstrip().endswith("result: OK")


def test_kill_mode(capsys: Any) -> None:
    """--kill: workers are SIGKILLed and replaced, their runs reaped, and every check still
    holds (what a killed worker had acknowledged is in the store)."""
    code, report = _json_run(capsys, "--seconds", "3", "--kill", "--procs", "3",
                             "--threads", "2", "--machines", "2")
    assert code == 0, [c for c in report["checks"] if c["violations"]]
    assert report["kills"] >= 2
    figure(capsys, "stress command --kill (3x2, 3 s)", kills=report["kills"],
           operations=report["operations"], violations=report["violations"])


def test_state_dir_is_kept_and_reusable(tmp_path: pathlib.Path, capsys: Any) -> None:
    """--state-dir: the store stays afterwards, and a second run on it passes too."""
    state = tmp_path / "state"
    for _ in range(2):
        code, report = _json_run(capsys, "--seconds", "0.7", "--procs", "2",
                                 "--state-dir", str(state))
        assert code == 0, report
    with Store(state) as s:
        assert len(s.list()) >= report["runs"] > 0


def test_attempts_bound_the_run(capsys: Any) -> None:
    """--attempts stops after that many prepare attempts in total."""
    code, report = _json_run(capsys, "--attempts", "200", "--seconds", "60", "--procs", "2",
                             "--threads", "2")
    assert code == 0
    assert 200 <= report["prepare_attempts"] <= 203
    assert report["seconds"] < 30


def test_usage_errors(capsys: Any) -> None:
    """Bad options exit 2 with a message; --help exits 0."""
    assert stress.main(["--procs", "0"]) == 2
    assert "--procs" in capsys.readouterr().err
    assert stress.main(["--bogus"]) == 2
    assert stress.main(["--help"]) == 0
    assert "--kill" in capsys.readouterr().out


def test_violations_exit_1(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose checks found violations prints them and exits 1."""
    break_stress_workers(monkeypatch, "no_cross_process_lock")
    # the race is probabilistic: on a loaded machine one short run may not hit it
    for _attempt in range(3):
        code = stress.main(["--seconds", "2", "--procs", "4", "--threads", "2",
                            "--machines", "1"])
        out = capsys.readouterr().out
        if code == 1:
            break
    assert code == 1
    assert "FAIL" in out and "VIOLATIONS" in out


def test_check_journal_finds_gaps_and_duplicates(tmp_path: pathlib.Path) -> None:
    """The independent journal checker reports a sequence gap, a repeat and a bad line."""
    with Store(tmp_path / "s") as s:
        from faults import run_for
        for i in range(3):
            s.prepare_atomic(f"m{i}", "h", lambda i=i: run_for(f"m{i}", "h"))
    path = tmp_path / "s" / "runs.jsonl"
    assert stress.check_journal(str(path)).problems == []
    lines = path.read_bytes().split(b"\n")[:-1]
    doubled = [*lines[:2], lines[1], *lines[2:]]
    path.write_bytes(b"\n".join(doubled) + b"\n")
    found = stress.check_journal(str(path))
    assert any("repeat" in p for p in found.problems) and found.duplicate_ids
    gapped = [lines[0], lines[1], *lines[3:]]
    path.write_bytes(b"\n".join(gapped) + b"\n")
    assert any("gap" in p for p in stress.check_journal(str(path)).problems)
    path.write_bytes(b"\n".join([*lines, b"junk"]) + b"\n")
    assert any("checksum" in p for p in stress.check_journal(str(path)).problems)


@pytest.mark.parametrize("how", ["python -c", "python -m runstore"])
def test_runs_as_a_command(how: str) -> None:
    """It works through ``python -c "...runstore.stress.main(...)"`` and the CLI."""
    args = ["--seconds", "1", "--procs", "2", "--threads", "1", "--json"]
    if how == "python -c":
        cmd = [sys.executable, "-c",
               f"import runstore.stress,sys; sys.exit(runstore.stress.main({args!r}))"]
    else:
        cmd = [sys.executable, "-m", "runstore", "stress", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"]


def test_progress_line_only_on_a_terminal(capsys: Any) -> None:
    """Without a terminal on stderr there is no progress line (nothing on stderr at all)."""
    assert stress.main(["--seconds", "0.5", "--procs", "1", "--threads", "1"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.stress
def test_default_run_full(capsys: Any) -> None:
    """The README's command at its default size (4 x 2, 10 s) passes (stress size)."""
    code, report = _json_run(capsys)
    assert code == 0
    figure(capsys, "stress command defaults", operations=report["operations"],
           ops_per_second=report["ops_per_second"], violations=report["violations"])
