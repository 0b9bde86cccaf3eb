"""The command line: every command through ``main(argv)``, the JSON contract field by field,
exit codes and one-line errors, and human output on a terminal versus a pipe."""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import pty
import select
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
from demo_runs import four_runs, run_for

from runstore import (
    CorruptStoreError,
    HistoryTruncatedError,
    InvalidTransitionError,
    LockTimeoutError,
    RunNotFoundError,
    Status,
    Store,
    StoreIOError,
    UnsafeStoreError,
    _fields,
    cli,
)

UTC = dt.UTC
Cli = Callable[..., tuple[int, str, str]]
#: every test runs without RUNSTORE_DIR, RUNSTORE_URL or NO_COLOR from the environment
pytestmark = pytest.mark.usefixtures("clean_cli_env")


# -- fixtures and helpers --------------------------------------------------------------------

@pytest.fixture
def demo(store_dir: pathlib.Path) -> dict[str, str]:
    """A closed store with four runs: ``done`` (m1, completed, exit 0, batch b1), ``failed``
    (m1, exit 2), ``running`` (m2) and ``pending`` (m3); returns their ids and ``dir``."""
    with Store(store_dir, durable=False) as store:
        ids = four_runs(store, ("aaaaaaaaaaaaaaaa1111", "bbbbbbbbbbbbbbbb2222",
                                "cccccccccccccccc3333", "dddddddddddddddd4444"))
    return {"dir": str(store_dir), **ids}


def _file_records(state_dir: str) -> dict[str, dict[str, Any]]:
    """The latest version of each run as written in the journal, without line metadata."""
    latest: dict[str, dict[str, Any]] = {}
    with open(os.path.join(state_dir, "runs.jsonl"), "rb") as f:
        for raw in f.read().splitlines()[1:]:
            data = json.loads(raw)
            if "mark" in data:
                continue
            latest[data["id"]] = {k: v for k, v in data.items() if k not in _fields.META_KEYS}
    return latest


def _one_line(err: str) -> str:
    """The single line of an error report (and proof that there is exactly one)."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NO_COLOR", "RUNSTORE_DIR", "RUNSTORE_URL")}
    env["TERM"] = "xterm-256color"
    env.update(extra)
    return env


def _run_attached(argv: Sequence[str], *, stdout_tty: bool, stderr_tty: bool,
                  env: dict[str, str] | None = None,
                  setup: str = "") -> tuple[int, str, str]:
    """Run the CLI in a child process whose stdout/stderr are each a pseudo-terminal or a
    pipe; ``setup`` is Python run in the child before ``main``."""
    code = ("import sys\n" + setup + "\nimport runstore.cli\n"
            "sys.exit(runstore.cli.main(sys.argv[1:]))")
    ends: dict[str, int] = {}
    kwargs: dict[str, Any] = {}
    for name, tty in (("stdout", stdout_tty), ("stderr", stderr_tty)):
        if tty:
            ends[name], kwargs[name] = pty.openpty()
        else:
            kwargs[name] = subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdin=subprocess.DEVNULL,
                            env=env or _subprocess_env(), **kwargs)
    readers: dict[int, str] = {}
    for name in ("stdout", "stderr"):
        if name in ends:
            os.close(kwargs[name])
            readers[ends[name]] = name
        else:
            readers[getattr(proc, name).fileno()] = name
    got = {"stdout": b"", "stderr": b""}
    try:
        while readers:
            ready, _, _ = select.select(list(readers), [], [], 20)
            assert ready, "the child printed nothing for 20 s"
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's other side is closed
                    chunk = b""
                if chunk:
                    got[readers[fd]] += chunk
                else:
                    del readers[fd]
        rc = proc.wait(timeout=20)
    finally:
        proc.kill()
        proc.wait()
        for fd in ends.values():
            os.close(fd)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return rc, got["stdout"].decode(), got["stderr"].decode()


# -- where the store is ------------------------------------------------------------------------

def test_state_dir_option_wins_over_environment(
        run_cli: Cli, demo: dict[str, str], tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--state-dir is used even when RUNSTORE_DIR names another directory."""
    monkeypatch.setenv("RUNSTORE_DIR", str(tmp_path / "elsewhere"))
    code, out, _ = run_cli("--state-dir", demo["dir"], "stats", "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["state_dir"], data["source"]) == (demo["dir"], "--state-dir")


def test_environment_variable_names_the_store(
        run_cli: Cli, demo: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --state-dir, RUNSTORE_DIR is the store, and stats says so."""
    monkeypatch.setenv("RUNSTORE_DIR", demo["dir"])
    code, out, _ = run_cli("stats")
    assert code == 0
    assert f"{demo['dir']} (from RUNSTORE_DIR)" in out


def test_default_state_dir_is_the_platform_state_dir() -> None:
    """With neither option nor variable, the store is platformdirs' user state directory."""
    import platformdirs

    assert cli.resolve_state_dir(None) == (
        os.path.abspath(platformdirs.user_state_dir("runstore")), "default")


def test_default_state_dir_without_platformdirs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """Without platformdirs installed the default is ~/.local/state/runstore."""
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # makes the import fail
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert cli.default_state_dir() == str(tmp_path / ".local" / "state" / "runstore")


@pytest.mark.parametrize("argv", [
    ["list"], ["show", "x"], ["active"], ["stats"], ["watch", "--timeout", "0"], ["check"],
    ["export"],
])
def test_reading_commands_never_create_a_store(
        run_cli: Cli, tmp_path: pathlib.Path, argv: list[str]) -> None:
    """A reading command on a missing directory exits 3 with one line and creates nothing."""
    missing = tmp_path / "missing"
    code, out, err = run_cli("--state-dir", str(missing), *argv)
    assert code == cli.EXIT_NOT_FOUND == 3
    assert out == ""
    assert f"no store at {missing} (the directory does not exist)" in _one_line(err)
    assert not missing.exists()


def test_reading_command_in_a_directory_without_journal(
        run_cli: Cli, tmp_path: pathlib.Path) -> None:
    """An existing directory that holds no journal is 'no store' too, and stays empty."""
    code, _, err = run_cli("--state-dir", str(tmp_path), "list")
    assert code == 3
    assert "holds no runs.jsonl" in _one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_import_does_not_import_the_cli() -> None:
    """`import runstore` loads neither the CLI modules nor platformdirs, nor logging (only a
    recovery logs; a fresh process should not pay for it)."""
    probe = ("import sys, runstore; print(sorted(m for m in ('runstore.cli', "
             "'runstore._clifmt', 'platformdirs', 'logging') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# -- list ------------------------------------------------------------------------------------

def test_list_prints_an_aligned_table(run_cli: Cli, demo: dict[str, str]) -> None:
    """list shows id, machine, status, short hash, started, duration and exit code aligned."""
    code, out, err = run_cli("--state-dir", demo["dir"], "list")
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "MACHINE", "STATUS", "HASH", "STARTED", "DURATION", "EXIT"]
    assert [r.split()[0] for r in rows] == [demo[k] for k in
                                            ("done", "failed", "running", "pending")]
    for column in ("MACHINE", "STATUS", "HASH", "STARTED"):
        start = header.index(column)
        assert all(r[start - 2:start] == "  " and r[start] != " " for r in rows), column
    done = rows[0].split()
    assert done[1:5] == ["m1", "completed", "aaaaaaaaaaaa", "just"]  # 12-char hash, "just now"
    assert done[-1] == "0"
    assert rows[3].split()[-3:] == ["-", "-", "-"]  # pending: not started, no duration


def test_list_filters_by_machine_status_and_batch(run_cli: Cli, demo: dict[str, str]) -> None:
    """--machine, a repeated --status and --batch narrow the list."""
    base = ("--state-dir", demo["dir"], "list", "--json")

    def ids(*extra: str) -> list[str]:
        code, out, _ = run_cli(*base, *extra)
        assert code == 0
        return [r["id"] for r in json.loads(out)]

    assert ids("--machine", "m1") == [demo["done"], demo["failed"]]
    assert ids("--status", "running", "--status", "pending") == [demo["running"], demo["pending"]]
    assert ids("--batch", "b1") == [demo["done"]]
    assert ids("--machine", "m1", "--status", "failed") == [demo["failed"]]
    assert ids("--machine", "nope") == []


def test_list_since_a_duration_or_a_date(run_cli: Cli, demo: dict[str, str]) -> None:
    """--since takes a duration ago or a date; runs started (or created) before are left out."""
    old = {"id": "old-run", "machine": "m9", "test_dir": "/t", "test_dir_hash": "h",
           "status": "completed", "exit_code": 0, "started_at": "2020-01-01T00:00:00Z",
           "ended_at": "2020-01-01T00:01:00Z"}
    with Store(demo["dir"], durable=False) as store:
        store.import_runs([old])
    base = ("--state-dir", demo["dir"], "list", "--json", "--since")
    everything = len(json.loads(run_cli(*base, "2000-01-01")[1]))
    assert everything == 5
    recent = [r["id"] for r in json.loads(run_cli(*base, "1d")[1])]
    assert "old-run" not in recent and len(recent) == 4
    assert json.loads(run_cli(*base, "2999-01-01T00:00Z")[1]) == []
    code, out, _ = run_cli("--state-dir", demo["dir"], "list", "--since", "2999-01-01")
    assert (code, out) == (0, "no runs match\n")


def test_list_limit_keeps_the_most_recent(run_cli: Cli, demo: dict[str, str]) -> None:
    """--limit N shows the last N matching runs, oldest first."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "list", "--json", "--limit", "2")
    assert code == 0
    assert [r["id"] for r in json.loads(out)] == [demo["running"], demo["pending"]]


def test_list_json_is_the_file_records_field_by_field(
        run_cli: Cli, demo: dict[str, str]) -> None:
    """list --json prints one array whose objects are exactly the records in the file."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "list", "--json")
    assert code == 0
    printed = json.loads(out)
    in_file = _file_records(demo["dir"])
    assert [r["id"] for r in printed] == list(in_file)
    with Store(demo["dir"]) as store:
        runs = {r.id: r for r in store.list()}
    for record in printed:
        expected = in_file[record["id"]]
        assert set(record) == set(expected), record["id"]
        for key, value in expected.items():
            assert record[key] == value and type(record[key]) is type(value), key
        assert record == _fields.run_to_json(runs[record["id"]])
    pending = next(r for r in printed if r["id"] == demo["pending"])
    assert pending["started_at"] is None and pending["exit_code"] is None  # unset: null
    assert "batch_id" not in pending and "plan_entry" not in pending  # empty: omitted
    done = next(r for r in printed if r["id"] == demo["done"])
    assert (done["batch_id"], done["plan_entry"], done["status"]) == ("b1", "e1", "completed")
    assert done["started_at"].endswith("Z")


def test_list_of_an_empty_store(run_cli: Cli, store_dir: pathlib.Path) -> None:
    """An empty store lists 'no runs', or [] in JSON."""
    Store(store_dir).close()
    assert run_cli("--state-dir", str(store_dir), "list") == (0, "no runs\n", "")
    assert run_cli("--state-dir", str(store_dir), "list", "--json") == (0, "[]\n", "")


# -- show --------------------------------------------------------------------------------------

def test_show_prints_every_field(run_cli: Cli, demo: dict[str, str]) -> None:
    """show lists every field of the run, one per line, with times absolute and relative."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "show", demo["failed"])
    assert code == 0
    fields = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in out.splitlines()}
    assert list(fields)[:len(cli.SHOW_FIELDS)] == list(cli.SHOW_FIELDS)
    assert fields["id"] == demo["failed"]
    assert (fields["status"], fields["exit_code"], fields["error_msg"]) == ("failed", "2", "boom")
    assert fields["batch_id"] == "-"
    assert fields["started_at"].endswith("Z (just now)")


def test_show_json_is_the_file_record(run_cli: Cli, demo: dict[str, str]) -> None:
    """show --json prints one object equal, field by field, to the record in the file."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "show", demo["done"], "--json")
    assert code == 0
    record = json.loads(out)
    expected = _file_records(demo["dir"])[demo["done"]]
    assert set(record) == set(expected)
    for key in expected:
        assert record[key] == expected[key], key
    assert record["exit_code"] == 0 and record["ended_at"].endswith("Z")


def test_show_unknown_run_exits_3(run_cli: Cli, demo: dict[str, str]) -> None:
    """An unknown run id exits 3 with one line naming the run."""
    code, out, err = run_cli("--state-dir", demo["dir"], "show", "no-such-run")
    assert (code, out) == (3, "")
    line = _one_line(err)
    assert line.startswith("runstore: error: run 'no-such-run' not found")
    assert "list" in line


# -- active ------------------------------------------------------------------------------------

def test_active_lists_the_non_terminal_runs(run_cli: Cli, demo: dict[str, str]) -> None:
    """active prints the pending and running runs; with a machine only that one's."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "active", "--json")
    assert code == 0
    assert [r["id"] for r in json.loads(out)] == [demo["running"], demo["pending"]]
    code, out, _ = run_cli("--state-dir", demo["dir"], "active", "m2", "--json")
    assert [r["id"] for r in json.loads(out)] == [demo["running"]]
    code, out, _ = run_cli("--state-dir", demo["dir"], "active", "m2")
    assert out.splitlines()[1].split()[:3] == [demo["running"], "m2", "running"]


def test_active_of_an_idle_machine(run_cli: Cli, demo: dict[str, str]) -> None:
    """A machine without an active run prints a note (exit 0), or [] in JSON."""
    assert run_cli("--state-dir", demo["dir"], "active", "m1") == (
        0, "machine 'm1' has no active run\n", "")
    assert run_cli("--state-dir", demo["dir"], "active", "m1", "--json") == (0, "[]\n", "")


# -- stats -------------------------------------------------------------------------------------

def test_stats_reports_counts_sizes_and_the_store(run_cli: Cli, demo: dict[str, str]) -> None:
    """stats shows the store used, file size, lines, sequence numbers and counts."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "stats")
    assert code == 0
    assert f"store       {demo['dir']} (from --state-dir)" in out
    assert os.path.join(demo["dir"], "runs.jsonl") in out
    size = os.path.getsize(os.path.join(demo["dir"], "runs.jsonl"))
    assert f"({size:,} bytes)" in out
    assert "4 live, " in out and "last seq    9" in out
    assert any(line.split() == ["completed", "1"] for line in out.splitlines())
    assert any(line.split() == ["m1", "2"] for line in out.splitlines())


def test_stats_json_fields(run_cli: Cli, demo: dict[str, str]) -> None:
    """stats --json carries the store path, counts by status and machine, lines and seqs."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "stats", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["location"] == os.path.join(demo["dir"], "runs.jsonl")
    assert data["size_bytes"] == os.path.getsize(data["location"])
    assert data["runs"] == 4
    assert data["superseded_lines"] == 5
    assert data["retained_changes"] == data["last_seq"] - data["oldest_seq"] + 1
    assert (data["last_seq"], data["oldest_seq"]) == (9, 1)
    assert data["runs_by_status"] == {"pending": 1, "running": 1, "completed": 1, "failed": 1,
                                      "interrupted": 0, "timeout": 0}
    assert data["runs_by_machine"] == {"m1": 2, "m2": 1, "m3": 1}


# -- watch -------------------------------------------------------------------------------------

def test_watch_json_replays_the_changes_since_a_seq(run_cli: Cli, demo: dict[str, str]) -> None:
    """watch --json prints one change object per line with the run record as in the file."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "watch", "--since", "6", "--json",
                           "--timeout", "0")
    assert code == 0
    changes = [json.loads(line) for line in out.splitlines()]
    assert [c["seq"] for c in changes] == [7, 8, 9]
    assert [c["type"] for c in changes] == ["run_created", "run_started", "run_created"]
    assert all(set(c) == {"seq", "time", "type", "run"} for c in changes)
    last = changes[-1]
    assert last["run"] == _file_records(demo["dir"])[demo["pending"]]
    assert last["time"].endswith("Z")


def test_watch_human_lines(run_cli: Cli, demo: dict[str, str]) -> None:
    """watch prints seq, time, change, status, machine and run id per change."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "watch", "--since", "5", "--timeout", "0")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4
    seq, _day, _time, change, status, machine, run_id, *rest = lines[0].split()
    assert (seq, change, status, machine, run_id) == (
        "6", "run_finished", "failed", "m1", demo["failed"])
    assert rest == ["exit", "2,", "E"]


def test_watch_follows_live_and_ctrl_c_exits_0(demo: dict[str, str]) -> None:
    """A real `python -m runstore watch` prints a change made after it started and exits 0,
    silently, on SIGINT."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runstore", "--state-dir", demo["dir"], "watch", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_subprocess_env(), text=True)
    try:
        assert proc.stdout is not None
        line = ""
        with Store(demo["dir"]) as store:
            deadline = time.monotonic() + 60  # a slow start on a busy machine, not a count
            n = 0
            while time.monotonic() < deadline:  # until the watcher is up and prints
                run = store.create(run_for(f"w{n}", "eeee"))
                store.finish(run.id, Status.FAILED)
                n += 1
                ready, _w, _x = select.select([proc.stdout], [], [], 0.05)
                if ready:
                    line = proc.stdout.readline()
                    break
        change = json.loads(line)
        assert change["type"] in ("run_created", "run_finished")
        assert change["run"]["machine"].startswith("w")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert err == ""
    finally:
        proc.kill()
        proc.wait()


# -- reap, prune, compact ----------------------------------------------------------------------

def test_reap_dry_run_then_for_real(run_cli: Cli, demo: dict[str, str]) -> None:
    """reap --dry-run names the stale runs and changes nothing; reap interrupts them (their
    owner is made a process of another host: a live owner here is never reaped)."""
    with Store(demo["dir"], durable=False) as store:
        for name in ("running", "pending"):
            store.update(attrs.evolve(store.get(demo[name]), owner_host="elsewhere.invalid"))
    base = ("--state-dir", demo["dir"], "reap", "--stale-after")
    assert run_cli(*base, "1h") == (0, "no runs to reap\n", "")
    before = pathlib.Path(demo["dir"], "runs.jsonl").read_bytes()
    code, out, _ = run_cli(*base, "0s", "--dry-run")
    assert code == 0
    assert out.splitlines()[0] == "would reap 2 runs (dry run: nothing was changed):"
    assert {line.split()[0] for line in out.splitlines()[2:]} == {demo["running"],
                                                                  demo["pending"]}
    assert pathlib.Path(demo["dir"], "runs.jsonl").read_bytes() == before
    code, out, _ = run_cli(*base, "0s", "--json")
    assert code == 0
    reaped = json.loads(out)
    assert {r["id"] for r in reaped} == {demo["running"], demo["pending"]}
    assert {r["status"] for r in reaped} == {"interrupted"}
    with Store(demo["dir"]) as store:
        assert store.active() == []


def test_prune_keep_last_with_archive(
        run_cli: Cli, demo: dict[str, str], tmp_path: pathlib.Path) -> None:
    """prune --dry-run counts; prune --keep-last removes old terminal runs into the archive."""
    base = ("--state-dir", demo["dir"], "prune", "--keep-last", "1")
    assert run_cli(*base, "--dry-run") == (
        0, "would prune 1 run (dry run: nothing was changed)\n", "")
    archive = tmp_path / "archive.jsonl"
    code, out, _ = run_cli(*base, "--archive", str(archive))
    assert (code, out) == (0, f"pruned 1 run, archived to {archive}\n")
    assert [json.loads(line)["id"] for line in archive.read_text().splitlines()] == [demo["done"]]
    code, out, _ = run_cli("--state-dir", demo["dir"], "list", "--json")
    assert demo["done"] not in {r["id"] for r in json.loads(out)}


def test_prune_older_than(run_cli: Cli, demo: dict[str, str]) -> None:
    """prune --older-than keeps runs that ended more recently."""
    assert run_cli("--state-dir", demo["dir"], "prune", "--older-than", "30d") == (
        0, "pruned 0 runs\n", "")


@pytest.mark.parametrize("argv", [
    ["prune"], ["prune", "--older-than", "30d", "--keep-last", "3"],
    ["prune", "--older-than", "soon"], ["prune", "--keep-last", "-1"],
])
def test_prune_needs_exactly_one_rule(run_cli: Cli, demo: dict[str, str],
                                      argv: list[str]) -> None:
    """prune without a rule, with both, or with a bad value is a usage error (exit 2)."""
    code, out, err = run_cli("--state-dir", demo["dir"], *argv)
    assert (code, out) == (2, "")
    assert "see `runstore prune --help`" in _one_line(err)


def test_compact_keeps_every_run(run_cli: Cli, demo: dict[str, str]) -> None:
    """compact rewrites the file, reports the sizes, and every run is still there."""
    before = run_cli("--state-dir", demo["dir"], "list", "--json")[1]
    code, out, _ = run_cli("--state-dir", demo["dir"], "compact")
    assert code == 0
    assert out.startswith(f"compacted {os.path.join(demo['dir'], 'runs.jsonl')}: ")
    assert " -> " in out
    assert run_cli("--state-dir", demo["dir"], "list", "--json")[1] == before
    assert run_cli("--state-dir", demo["dir"], "check")[0] == 0


# -- check -------------------------------------------------------------------------------------

def test_check_healthy_store(run_cli: Cli, demo: dict[str, str]) -> None:
    """check on a sound file prints ok with its size and records, exit 0."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "check")
    assert code == 0
    assert out.startswith(f"{os.path.join(demo['dir'], 'runs.jsonl')}: ok (")
    code, out, _ = run_cli("--state-dir", demo["dir"], "check", "--json")
    report = json.loads(out)
    assert (report["ok"], report["records"], report["last_seq"], report["problems"]) == (
        True, 9, 9, [])


def _damage(state_dir: str) -> tuple[pathlib.Path, int]:
    """Alter one byte in the third line (durable data); return the path and that line's
    offset."""
    path = pathlib.Path(state_dir, "runs.jsonl")
    data = path.read_bytes()
    offset = data.index(b"\n", data.index(b"\n") + 1) + 1
    at = data.index(b'"machine":"m1"', offset) + len(b'"machine":"m')
    path.write_bytes(data[:at] + b"X" + data[at + 1:])
    return path, offset


def test_check_reports_damage_and_leaves_the_file_alone(
        run_cli: Cli, demo: dict[str, str]) -> None:
    """check on a damaged file exits 1 naming line, offset and remedy; the file is
    byte-identical afterwards, and other commands exit 5 with one line."""
    path, offset = _damage(demo["dir"])
    before = path.read_bytes()
    code, out, err = run_cli("--state-dir", demo["dir"], "check")
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"{path}: DAMAGED (")
    assert lines[1].startswith(f"  line 3, byte {offset}: ")
    assert "checksum" in lines[1]
    assert lines[2].startswith("    remedy: ")
    assert path.read_bytes() == before
    code, out, err = run_cli("--state-dir", demo["dir"], "list")
    assert (code, out) == (5, "")
    assert f"{path} at byte {offset}" in _one_line(err)
    assert path.read_bytes() == before


def test_check_json_of_a_damaged_store(run_cli: Cli, demo: dict[str, str]) -> None:
    """check --json reports each problem with offset, line, message and remedy."""
    path, offset = _damage(demo["dir"])
    code, out, _ = run_cli("--state-dir", demo["dir"], "check", "--json")
    assert code == 1
    report = json.loads(out)
    assert (report["path"], report["ok"], report["size"]) == (
        str(path), False, path.stat().st_size)
    [problem] = report["problems"]
    assert (problem["offset"], problem["line"]) == (offset, 3)
    assert problem["message"] and problem["remedy"]


# -- export and import -------------------------------------------------------------------------

def test_export_to_stdout_is_one_json_document(run_cli: Cli, demo: dict[str, str]) -> None:
    """export prints one JSON array of the file's records, and nothing else."""
    code, out, err = run_cli("--state-dir", demo["dir"], "export")
    assert (code, err) == (0, "")
    exported = json.loads(out)
    assert {r["id"]: r for r in exported} == _file_records(demo["dir"])


def test_export_to_a_file_and_import_it_elsewhere(
        run_cli: Cli, demo: dict[str, str], tmp_path: pathlib.Path) -> None:
    """export FILE then import FILE into a new store reproduces every run."""
    target = tmp_path / "runs.json"
    assert run_cli("--state-dir", demo["dir"], "export", str(target)) == (
        0, f"exported 4 runs to {target}\n", "")
    assert [p.name for p in tmp_path.iterdir() if p.name != "state"] == ["runs.json"]
    other = tmp_path / "other"
    code, out, _ = run_cli("--state-dir", str(other), "import", str(target))
    assert (code, out) == (0, f"imported 4 runs from {target} into {other}\n")
    copied = json.loads(run_cli("--state-dir", str(other), "list", "--json")[1])
    original = json.loads(run_cli("--state-dir", demo["dir"], "list", "--json")[1])
    assert [r["id"] for r in copied] == [r["id"] for r in original]
    assert copied == original


def test_import_of_duplicates_fails_whole(
        run_cli: Cli, demo: dict[str, str], tmp_path: pathlib.Path) -> None:
    """Importing runs the store already has exits 1 with one line and imports nothing."""
    target = tmp_path / "runs.json"
    run_cli("--state-dir", demo["dir"], "export", str(target))
    before = pathlib.Path(demo["dir"], "runs.jsonl").read_bytes()
    code, out, err = run_cli("--state-dir", demo["dir"], "import", str(target))
    assert (code, out) == (1, "")
    assert "already exists" in _one_line(err)
    assert pathlib.Path(demo["dir"], "runs.jsonl").read_bytes() == before


def test_import_of_a_missing_file(run_cli: Cli, tmp_path: pathlib.Path) -> None:
    """A missing input file exits 1 naming it, and no store is created."""
    code, _, err = run_cli("--state-dir", str(tmp_path / "new"), "import",
                           str(tmp_path / "nope.json"))
    assert code == 1
    assert _one_line(err) == (f"runstore: error: {tmp_path / 'nope.json'}: "
                              "No such file or directory")
    assert not (tmp_path / "new").exists()


# -- mark --------------------------------------------------------------------------------------

def test_mark_pending_as_running_starts_it(run_cli: Cli, demo: dict[str, str]) -> None:
    """mark RUN running moves a pending run through start(): started_at is set."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "mark", demo["pending"], "running")
    assert (code, out) == (0, f"run {demo['pending']}: pending -> running\n")
    with Store(demo["dir"]) as store:
        run = store.get(demo["pending"])
    assert run.status is Status.RUNNING and run.started_at is not None


def test_mark_running_as_interrupted_with_details(run_cli: Cli, demo: dict[str, str]) -> None:
    """mark RUN interrupted --exit-code --error-code --error-msg finishes the run."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "mark", demo["running"], "interrupted",
                           "--exit-code", "130", "--error-code", "operator",
                           "--error-msg", "stopped by hand", "--json")
    assert code == 0
    record = json.loads(out)
    assert (record["status"], record["exit_code"], record["error_code"], record["error_msg"]) == (
        "interrupted", 130, "operator", "stopped by hand")
    assert record == _file_records(demo["dir"])[demo["running"]]


def test_mark_same_status_changes_nothing(run_cli: Cli, demo: dict[str, str]) -> None:
    """Marking a run with the status it has is a no-op, exit 0."""
    code, out, _ = run_cli("--state-dir", demo["dir"], "mark", demo["done"], "completed")
    assert (code, out) == (0, f"run {demo['done']} is already completed; nothing changed\n")


@pytest.mark.parametrize(("run", "status"), [
    ("done", "failed"), ("running", "pending"), ("failed", "running"),
])
def test_mark_refuses_what_the_state_machine_forbids(
        run_cli: Cli, demo: dict[str, str], run: str, status: str) -> None:
    """A forbidden transition exits 1 with the state machine's one-line reason."""
    code, out, err = run_cli("--state-dir", demo["dir"], "mark", demo[run], status)
    assert (code, out) == (1, "")
    assert f"run {demo[run]!r} cannot go from" in _one_line(err)


def test_mark_unknown_run_exits_3(run_cli: Cli, demo: dict[str, str]) -> None:
    """mark on an unknown id exits 3 with one line naming it."""
    code, _, err = run_cli("--state-dir", demo["dir"], "mark", "ghost", "failed")
    assert code == 3
    assert "run 'ghost' not found" in _one_line(err)


def test_mark_details_need_a_terminal_status(run_cli: Cli, demo: dict[str, str]) -> None:
    """--exit-code with a non-terminal status is a usage error (exit 2)."""
    code, _, err = run_cli("--state-dir", demo["dir"], "mark", demo["pending"], "running",
                           "--exit-code", "1")
    assert code == 2
    assert "terminal status" in _one_line(err)


# -- stress ------------------------------------------------------------------------------------

def test_stress_passes_its_arguments_through(
        run_cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """stress hands every following argument, options included, to runstore.stress.main."""
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    fake = types.ModuleType("runstore.stress")
    fake.main = fake_main  # type: ignore[attr-defined]  # a module built on the fly
    monkeypatch.setitem(sys.modules, "runstore.stress", fake)
    code, _, _ = run_cli("stress", "--seconds", "5", "-h", "--state-dir", "x")
    assert code == 7
    assert seen == [["--seconds", "5", "-h", "--state-dir", "x"]]


def test_stress_notes_that_the_global_store_does_not_apply(
        run_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """A global --state-dir before stress earns a one-line note (stress has its own)."""
    fake = types.ModuleType("runstore.stress")
    fake.main = lambda argv: 0  # type: ignore[attr-defined]  # a module built on the fly
    monkeypatch.setitem(sys.modules, "runstore.stress", fake)
    code, _, err = run_cli("--state-dir", str(tmp_path), "stress", "--seconds", "1")
    assert code == 0
    assert "stress --state-dir DIR" in _one_line(err)


def test_export_to_a_missing_directory_names_the_file(
        run_cli: Cli, demo: dict[str, str], tmp_path: pathlib.Path) -> None:
    """export into a directory that does not exist exits 1 naming the file asked for,
    not the temp file beside it, and saying that nothing was written."""
    target = tmp_path / "no" / "such" / "out.json"
    code, _, err = run_cli("--state-dir", demo["dir"], "export", str(target))
    assert code == 1
    assert _one_line(err).startswith(
        f"runstore: error: exporting to {target} failed (No such file or directory); "
        "nothing was written")


# -- errors and exit codes ---------------------------------------------------------------------

def test_held_lock_exits_4(run_cli: Cli, demo: dict[str, str]) -> None:
    """While another process holds the lock, a write with --lock-timeout 0.2 gives exit 4
    and one line (reads need no lock)."""
    lock = os.path.join(demo["dir"], "runs.lock")
    holder = subprocess.Popen(  # the store's lock: a flock of its directory
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({demo['dir']!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        code, out, err = run_cli("--state-dir", demo["dir"], "--lock-timeout", "0.2", "list")
        assert code == 0 and out
        code, out, err = run_cli("--state-dir", demo["dir"], "--lock-timeout", "0.2",
                                 "compact")
        assert (code, out) == (4, "")
        assert _one_line(err) == (
            f"runstore: error: could not lock {lock} within 0.2 s: another process holds "
            f"it; find it with `fuser {lock}`, or retry with a larger --lock-timeout")
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


@pytest.mark.parametrize(("argv", "fragment"), [
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["list", "--limit", "0"], "argument --limit: expected a positive integer, got '0'"),
    (["list", "--since", "yesterday"], "'yesterday' is neither a duration"),
    (["list", "--status", "done"], "argument --status: invalid choice: 'done'"),
    (["--lock-timeout", "-1", "list"], "expected a number of seconds >= 0"),
    (["reap"], "the following arguments are required: --stale-after"),
])
def test_usage_errors_exit_2_with_one_line(
        run_cli: Cli, demo: dict[str, str], argv: list[str], fragment: str) -> None:
    """Bad arguments exit 2 with one line (no usage dump) pointing at --help."""
    code, out, err = run_cli(*argv)
    assert (code, out) == (2, "")
    line = _one_line(err)
    assert line.startswith("runstore: error: ") and fragment in line and "--help`)" in line


def test_help_and_version_exit_0(run_cli: Cli) -> None:
    """--help lists the commands and the exit codes; --version prints the version."""
    code, out, _ = run_cli("--help")
    assert code == 0
    assert "exit codes: 0 ok, 1 failure, 2 usage, 3 not found" in out
    for command in ("list", "show", "active", "stats", "watch", "reap", "prune", "compact",
                    "check", "export", "import", "stress", "mark", "migrate"):
        assert f"    {command} " in out
    code, out, _ = run_cli("--version")
    assert (code, out.split()[0]) == (0, "runstore")


@pytest.mark.parametrize(("error", "code"), [
    (RunNotFoundError("r1", "/s/runs.jsonl"), 3),
    (HistoryTruncatedError(3, 10), 3),
    (cli.NoStoreError("/s", "the directory does not exist"), 3),
    (LockTimeoutError("/s/runs.lock", 1.0), 4),
    (CorruptStoreError("/s/runs.jsonl", 12, "checksum mismatch"), 5),
    (InvalidTransitionError("r1", "completed", "failed", "terminal states are final"), 1),
    (UnsafeStoreError("/s", "a symlink", "remove it"), 1),
    (StoreIOError("/s/runs.jsonl", "syncing", OSError(5, "Input/output error")), 1),
    (FileNotFoundError(2, "No such file or directory", "/x.json"), 1),
    (cli.UsageError("bad"), 2),
])
def test_exit_codes_and_messages_of_errors(error: Exception, code: int) -> None:
    """Each library error maps to its documented exit code and a one-line message."""
    assert cli.exit_code_for(error) == code
    message = cli.message_for(error)
    assert message and "\n" not in message


def test_history_truncated_message_says_what_to_do() -> None:
    """The compacted-history message tells the CLI user which commands resynchronise."""
    assert cli.message_for(HistoryTruncatedError(3, 10)).endswith(
        "read the current state with `list`, then follow with `watch --since 9`")


# -- terminal versus pipe ------------------------------------------------------------------------

def test_colour_only_on_a_terminal(demo: dict[str, str]) -> None:
    """The status column is coloured on a pseudo-terminal and plain through a pipe."""
    argv = ["--state-dir", demo["dir"], "list"]
    code, out, _ = _run_attached(argv, stdout_tty=True, stderr_tty=True)
    assert code == 0
    assert "\x1b[32mcompleted\x1b[0m" in out and "\x1b[31mfailed\x1b[0m" in out
    code, out, _ = _run_attached(argv, stdout_tty=False, stderr_tty=False)
    assert code == 0
    assert "\x1b" not in out and "completed" in out


def test_color_option_overrides_the_terminal_test(run_cli: Cli, demo: dict[str, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--color always colours a pipe (even with NO_COLOR); --color never keeps it plain."""
    monkeypatch.setenv("NO_COLOR", "1")
    code, out, _ = run_cli("--color", "always", "--state-dir", demo["dir"], "list")
    assert code == 0 and "\x1b[36mrunning\x1b[0m" in out
    code, out, _ = run_cli("--color", "never", "--state-dir", demo["dir"], "list")
    assert code == 0 and "\x1b" not in out


def test_no_color_is_honoured_on_a_terminal(demo: dict[str, str]) -> None:
    """With NO_COLOR set nothing is coloured, on a terminal too, and errors stay plain."""
    env = _subprocess_env(NO_COLOR="1")
    code, out, _ = _run_attached(["--state-dir", demo["dir"], "list"], stdout_tty=True,
                                 stderr_tty=True, env=env)
    assert code == 0 and "completed" in out and "\x1b" not in out
    code, _, err = _run_attached(["--state-dir", demo["dir"], "show", "ghost"],
                                 stdout_tty=True, stderr_tty=True, env=env)
    assert code == 3 and "error:" in err and "\x1b" not in err


def test_progress_bar_only_when_stderr_is_a_terminal(demo: dict[str, str]) -> None:
    """Long work (here: any, with the delay at 0) draws a bar on a terminal's stderr, erased
    before the result; through a pipe stderr stays empty."""
    setup = "import runstore._clifmt as f; f.PROGRESS_DELAY = 0"
    argv = ["--state-dir", demo["dir"], "check"]
    code, out, err = _run_attached(argv, stdout_tty=False, stderr_tty=True, setup=setup)
    assert code == 0 and out.startswith(f"{demo['dir']}/runs.jsonl: ok")
    assert err.startswith("\rchecking ") and "<=>" in err
    assert err.endswith("\r") and err.rstrip("\r").split("\r")[-1].strip() == ""  # erased
    code, out, err = _run_attached(argv, stdout_tty=False, stderr_tty=False, setup=setup)
    assert (code, err) == (0, "")


def test_python_dash_m_runstore_in_a_subprocess(demo: dict[str, str]) -> None:
    """`python -m runstore list --json` works as a program: JSON on stdout, exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", "runstore", "--state-dir", demo["dir"], "list", "--json"],
        capture_output=True, text=True, env=_subprocess_env(), timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)[0]["id"] == demo["done"]
