"""Bad values typed on the command line: every one exits 2 with one line naming the option or
argument (never a traceback, never exit 1), before any store is opened, so nothing is written;
a closed stdout is reported the same way; and table columns are sized on what is printed."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from demo_runs import four_runs

from runstore import OutputTargetError, Store, _location, _targets, cli, stress

Cli = Callable[..., tuple[int, str, str]]
pytestmark = pytest.mark.usefixtures("clean_cli_env")
#: a byte that is not UTF-8, as Python hands it over in ``sys.argv`` and ``os.environ``
BAD_BYTE = os.fsdecode(b"\xff")


@pytest.fixture
def default_home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Where the default store would be (``$XDG_STATE_HOME/runstore``): it must stay
    missing."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


@pytest.fixture
def demo(store_dir: pathlib.Path, default_home: pathlib.Path) -> Iterator[pathlib.Path]:
    """A closed store with four runs; after the test, its files are as they were and the
    default store was never created."""
    with Store(store_dir, durable=False) as store:
        four_runs(store, ("a" * 12, "b" * 12, "c" * 12, "d" * 12))
    before = {name: (store_dir / name).read_bytes() for name in os.listdir(store_dir)}
    yield store_dir
    assert {name: (store_dir / name).read_bytes() for name in os.listdir(store_dir)} == before
    assert not default_home.exists()


def _usage_line(code: int, out: str, err: str) -> str:
    assert (code, out) == (2, ""), err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("runstore: error: ") and "--help`)" in lines[0]
    return lines[0]


#: (arguments after the command's global options, the option named, a fragment of the reason)
BAD_VALUES = [
    # times and durations
    (["list", "--since", "0001-01-01T00:00+01:00"], "--since", "years 1 to 9999"),
    (["list", "--since", "9999-12-31T23:59-05:00"], "--since", "years 1 to 9999"),
    (["list", "--since", "99999999999d"], "--since", "reaches back before the year 1"),
    (["list", "--since", "1e400s"], "--since", "neither a duration"),
    (["reap", "--stale-after", "99999999999d"], "--stale-after", "before the year 1"),
    (["reap", "--stale-after", "1e400s"], "--stale-after", "not a duration"),
    (["prune", "--older-than", "9999999999w"], "--older-than", "before the year 1"),
    (["watch", "--since", "-1"], "--since", "expected an integer >= 0"),
    (["watch", "--since", "99999999999999999999"], "--since", "at most 2**63 - 1"),
    (["watch", "--timeout", "nan"], "--timeout", "expected a number of seconds"),
    (["watch", "--timeout", "1e400"], "--timeout", "expected a number of seconds"),
    # integers
    (["list", "--limit", "99999999999999999999"], "--limit", "at most 2**63 - 1"),
    (["prune", "--keep-last", "99999999999999999999"], "--keep-last", "at most 2**63 - 1"),
    (["mark", "x", "failed", "--exit-code", "99999999999999999999"], "--exit-code",
     "-2**63 to 2**63 - 1"),
    (["mark", "x", "failed", "--exit-code", "one"], "--exit-code", "expected an integer"),
    # names that must not be empty, and text that must be UTF-8
    (["show", ""], "RUN_ID", "non-empty run id"),
    (["show", "x" + BAD_BYTE], "RUN_ID", "not valid UTF-8"),
    (["active", ""], "MACHINE", "non-empty machine"),
    (["active", "m" + BAD_BYTE], "MACHINE", "not valid UTF-8"),
    (["list", "--machine", ""], "--machine", "non-empty machine"),
    (["list", "--batch", ""], "--batch", "non-empty batch id"),
    (["list", "--batch", "b" + BAD_BYTE], "--batch", "not valid UTF-8"),
    (["mark", "", "failed"], "RUN_ID", "non-empty run id"),
    (["mark", "x", "failed", "--error-msg", "m" + BAD_BYTE], "--error-msg", "not valid UTF-8"),
    (["mark", "x", "failed", "--error-code", "c" + BAD_BYTE], "--error-code", "UTF-8"),
    # files and stores
    (["prune", "--keep-last", "0", "--archive", ""], "--archive", "expected a file name"),
    (["export", ""], "FILE", "expected a file name"),
    (["import", ""], "FILE", "expected a file name"),
    (["migrate", "--from", "", "--to", "/tmp/x"], "--from", "expected a store"),
    (["migrate", "--from", "/tmp/x", "--to", ""], "--to", "expected a store"),
    (["migrate", "--from", "/tmp/x", "--to", "/tmp/x" + BAD_BYTE], "--to", "UTF-8"),
]


@pytest.mark.parametrize(("argv", "option", "fragment"), BAD_VALUES,
                         ids=[" ".join(a[0]) for a in BAD_VALUES])
def test_bad_values_exit_2_naming_the_option(
        run_cli: Cli, demo: pathlib.Path, argv: list[str], option: str, fragment: str) -> None:
    """Each bad value: exit 2, one line naming the option and what is wrong, no change."""
    line = _usage_line(*run_cli("--state-dir", str(demo), *argv))
    assert f"argument {option}: " in line and fragment in line, line
    assert "invalid _" not in line  # no internal name


@pytest.mark.parametrize("since", ["2000-01-01", "2000-01-01T12:00", "0002-01-01T00:00Z",
                                   "9999-12-30T00:00Z", "2h"])
def test_since_within_the_range_is_accepted(run_cli: Cli, demo: pathlib.Path,
                                            since: str) -> None:
    code, _, err = run_cli("--state-dir", str(demo), "list", "--since", since)
    assert (code, err) == (0, "")


@pytest.mark.parametrize("argv", [
    ["--state-dir", ""], ["--store", ""], ["--store", "", "--state-dir", ""],
    ["--state-dir", "", "--store", "/tmp/x"],
])
@pytest.mark.parametrize("command", [["list"], ["reap", "--stale-after", "1h"],
                                     ["import", "-"]])
def test_empty_store_options_exit_2(run_cli: Cli, demo: pathlib.Path, argv: list[str],
                                    command: list[str]) -> None:
    """An empty --store or --state-dir is a usage error, not the default store (which a
    writing command would create)."""
    line = _usage_line(*run_cli(*argv, *command))
    assert "argument --store: " in line or "argument --state-dir: " in line


def test_store_and_state_dir_both_given_exit_2(run_cli: Cli, demo: pathlib.Path) -> None:
    line = _usage_line(*run_cli("--store", str(demo), "--state-dir", str(demo), "list"))
    assert "--store and --state-dir both name the store" in line


@pytest.mark.parametrize("name", ["RUNSTORE_DIR", "RUNSTORE_URL"])
def test_empty_environment_variables_count_as_unset(
        run_cli: Cli, demo: pathlib.Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """RUNSTORE_URL="" or RUNSTORE_DIR="" is as if unset: the next source names the store."""
    monkeypatch.setenv(name, "")
    other = "RUNSTORE_URL" if name == "RUNSTORE_DIR" else "RUNSTORE_DIR"
    monkeypatch.setenv(other, str(demo))
    code, out, err = run_cli("stats", "--json")
    assert (code, err) == (0, "")
    assert f'"source": "{other}"' in out


@pytest.mark.parametrize(("argv", "env", "source"), [
    (["--state-dir", "/tmp/st" + BAD_BYTE], {}, "--state-dir: "),
    (["--store", "/tmp/st" + BAD_BYTE], {}, "--store: "),
    (["--store", "file:///tmp/st%ff"], {}, "--store: "),
    ([], {"RUNSTORE_DIR": "/tmp/st" + BAD_BYTE}, "RUNSTORE_DIR: "),
    ([], {"RUNSTORE_URL": "file:///tmp/st%FF"}, "RUNSTORE_URL: "),
])
def test_a_store_path_that_is_not_utf8_exits_2(
        run_cli: Cli, demo: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
        argv: list[str], env: dict[str, str], source: str) -> None:
    """A store directory that is not UTF-8 (``Store`` keeps to UTF-8 paths) is refused as a
    usage error naming where it came from; no directory is created."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = run_cli(*argv, "import", "-")
    assert (code, out) == (2, "") and len(err.splitlines()) == 1
    assert source in err and "is not valid UTF-8" in err
    assert not os.path.lexists(os.fsencode("/tmp/st") + b"\xff")


@pytest.mark.parametrize(("url", "name"), [
    ("file:///d/st%ff", b"/d/st\xff"),
    ("file:///d/%C3%A9t%C3%A9", "/d/été".encode()),
    ("file:///d/été", "/d/été".encode()),
    ("file://localhost/d/a%20b%25", b"/d/a b%"),
    ("file:///d/%e9", b"/d/\xe9"),
])
def test_file_url_escapes_are_the_bytes_of_the_name(url: str, name: bytes) -> None:
    """A percent-escape in a file URL is one byte of the directory's name: every byte
    round-trips (never U+FFFD)."""
    assert os.fsencode(_location.parse(url).target) == name


#: every argument naming a file or a store, holding a NUL character: typed (only a program
#: can pass one) or percent-escaped in a file URL; ``{tmp}`` is the test's directory and
#: ``{demo}`` the demo store; (arguments, environment, what the message starts with)
NUL_NAMES = [
    (["export", "{tmp}/a\x00b"], {}, "argument FILE: "),
    (["prune", "--keep-last", "0", "--archive", "{tmp}/a\x00b"], {}, "argument --archive: "),
    (["import", "{tmp}/a\x00b"], {}, "argument FILE: "),
    (["migrate", "--from", "{demo}", "--to", "{tmp}/a\x00b"], {}, "argument --to: "),
    (["migrate", "--from", "{demo}", "--to", "file://{tmp}/a%00b"], {}, "--to: "),
    (["migrate", "--from", "file://{tmp}/a%00b", "--to", "{tmp}/x"], {}, "--from: "),
    (["--store", "file://{tmp}/a%00b", "import", "-"], {}, "--store: "),
    (["--store", "file://{tmp}/a%00b", "export", "{tmp}/x"], {}, "--store: "),
    (["--state-dir", "{tmp}/a\x00b", "import", "-"], {}, "argument --state-dir: "),
    (["import", "-"], {"RUNSTORE_URL": "file://{tmp}/a%00b"}, "RUNSTORE_URL: "),
]


def _nul_case(argv: list[str], env: dict[str, str], tmp: pathlib.Path,
              demo: pathlib.Path) -> tuple[list[str], dict[str, str]]:
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp)).replace("{demo}", str(demo))

    return [fill(a) for a in argv], {k: fill(v) for k, v in env.items()}


@pytest.mark.parametrize(("argv", "env", "start"), NUL_NAMES,
                         ids=[" ".join(a[0] or list(a[1])) for a in NUL_NAMES])
def test_a_name_holding_nul_exits_2_naming_the_argument(
        run_cli: Cli, demo: pathlib.Path, tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str],
        start: str) -> None:
    """A file or store named with a NUL character (no file name can hold one): exit 2, one
    line naming the argument, never a traceback; nothing is created."""
    argv, env = _nul_case(argv, env, tmp_path, demo)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = run_cli(*argv)
    assert (code, out) == (2, ""), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"runstore: error: {start}"), err
    assert "\\x00" in err or "%00" in err, err
    assert not os.path.lexists(tmp_path / "a") and not os.path.lexists(tmp_path / "x")


def test_migrate_to_a_file_url_holding_nul_from_the_shell(
        demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """``runstore migrate --to 'file:///dir/x%00y'``, as typed in a shell: exit 2 and one
    line on stderr naming --to."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNSTORE_DIR", "RUNSTORE_URL")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run(
        [sys.executable, "-m", "runstore", "migrate", "--from", str(demo), "--to",
         f"file://{tmp_path}/x%00y"],
        capture_output=True, text=True, env=env, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.splitlines() == [
        f"python -m runstore: error: --to: file URL 'file://{tmp_path}/x%00y' holds a NUL "
        "byte (%00), which no file name can hold; use file:///path/to/dir"]


def test_an_output_named_with_nul_is_refused_by_the_target_check(
        demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The check of an output's target refuses a NUL itself (``stat`` would raise
    ``ValueError``), naming the target."""
    with pytest.raises(OutputTargetError) as caught:
        _targets.check_output(f"{tmp_path}/a\x00b", str(demo), name="--to file:///a%00b")
    assert str(caught.value).startswith("--to file:///a%00b: it holds a NUL character")
    assert cli.exit_code_for(caught.value) == 2


def test_broken_variant_migrate_to_a_nul_url_is_a_traceback(
        run_cli: Cli, demo: pathlib.Path, tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the refusals (the location's and the target check's), ``migrate --to
    file:///x%00y`` reaches ``stat`` and raises ValueError out of the command."""
    monkeypatch.setattr(_location, "_has_nul", lambda path: False)
    monkeypatch.setattr(_targets, "check_output", lambda target, state_dir, **kw: (
        _targets._refusal(os.fspath(target), state_dir, None)))
    with pytest.raises(ValueError, match="embedded null byte"):
        run_cli("migrate", "--from", str(demo), "--to", f"file://{tmp_path}/x%00y")


def test_broken_variant_a_store_url_holding_nul_is_not_a_usage_error(
        run_cli: Cli, demo: pathlib.Path, tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the location's refusal, ``--store file:///x%00y`` reaches the store, which
    refuses it as a failure (exit 1), not as the usage error it is."""
    monkeypatch.setattr(_location, "_has_nul", lambda path: False)
    code, _, err = run_cli("--store", f"file://{tmp_path}/x%00y", "import", "-")
    assert code == 1 and "must not contain NUL" in err


@pytest.mark.parametrize("argv", [
    ["stats"], ["list"], ["list", "--json"], ["export"], ["watch", "--timeout", "0.1"],
    ["check"], ["show", "nope"], ["--help"], ["reap", "--stale-after", "1h", "--dry-run"],
])
def test_closed_stdout_is_one_line_and_exit_2(demo: pathlib.Path, argv: list[str]) -> None:
    """Started with stdout closed (``>&-``): one line on stderr saying so, exit 2."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNSTORE_DIR", "RUNSTORE_URL")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "runstore",
         "--state-dir", str(demo), *argv],
        stderr=subprocess.PIPE, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "python -m runstore: error: standard output is closed; run the command with stdout "
        "open (redirect it to /dev/null to discard it)"]


# -- stress ----------------------------------------------------------------------------------

STRESS_BAD = [
    (["--seconds", "nan"], "--seconds"), (["--seconds", "inf"], "--seconds"),
    (["--seconds", "1e400"], "--seconds"), (["--seconds", "-1"], "--seconds"),
    (["--seconds", "0"], "--seconds"), (["--seconds", "86401"], "--seconds"),
    (["--procs", "99999999999999999999"], "--procs"), (["--procs", "0"], "--procs"),
    (["--procs", "257"], "--procs"),
    (["--threads", "99999999999999999999"], "--threads"), (["--threads", "-3"], "--threads"),
    (["--machines", "99999999999999999999"], "--machines"), (["--machines", "0"], "--machines"),
    (["--attempts", "0"], "--attempts"), (["--attempts", "-1"], "--attempts"),
    (["--attempts", "99999999999999999999"], "--attempts"),
    (["--state-dir", ""], "--state-dir"), (["--state-dir", "/tmp/s" + BAD_BYTE], "--state-dir"),
]


@pytest.mark.parametrize(("argv", "option"), STRESS_BAD,
                         ids=[" ".join(a[0]) for a in STRESS_BAD])
def test_stress_refuses_bad_options_up_front(
        run_cli: Cli, default_home: pathlib.Path, argv: list[str], option: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stress option is checked before anything runs: exit 2, one line naming it."""
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the stress run started")

    monkeypatch.setattr(stress, "run", never)
    code, out, err = run_cli("stress", *argv)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"python -m runstore stress: error: argument {option}: ")
    assert lines[0].endswith("(see `python -m runstore stress --help`)")


def test_stress_help_states_the_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    assert stress.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for bound in ("1 to 256 (default 4)", "1 to 10,000", "at most 86,400", "at least 1"):
        assert bound in text


# -- tables ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["list"], ["list", "--status", "pending"], ["active"],
                                  ["stats"]])
@pytest.mark.parametrize("color", ["never", "always"])
def test_columns_are_sized_on_the_escaped_text(
        run_cli: Cli, store_dir: pathlib.Path, default_home: pathlib.Path,
        argv: list[str], color: str) -> None:
    """A field shown escaped (``\\x1b``, ``\\n``) is as wide as its escape: the columns
    after it line up in every row."""
    with Store(store_dir, durable=False) as store:
        store.import_runs([
            {"id": "a\nb", "machine": "m1\x1b[31mRED", "test_dir": "/t",
             "test_dir_hash": "h\tx", "status": "pending"},
            {"id": "plain-id-0123456789", "machine": "m2", "test_dir": "/t",
             "test_dir_hash": "h", "status": "pending"},
            {"id": "c\u202ed", "machine": "m2", "test_dir": "/t", "test_dir_hash": "h",
             "status": "completed"},
        ])
    code, out, err = run_cli("--color", color, "--state-dir", str(store_dir), *argv)
    assert (code, err) == (0, "")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)  # the colours the painter added
    assert "\x1b" not in plain and "\\x1b[31mRED" in plain
    lines = plain.splitlines()
    if argv == ["stats"]:  # MACHINE  RUNS, the counts right-aligned under RUNS
        head = lines.index(next(line for line in lines if line.startswith("MACHINE ")))
        rows = lines[head + 1:]
        assert len(rows) == 2 and {len(row) for row in rows} == {len(lines[head])}, rows
        return
    head, rows = lines[0], lines[1:]
    assert rows
    at = head.index("STATUS")
    for row in rows:
        assert row[at - 2:at] == "  " and row[at:].split()[0] in ("pending", "completed"), (
            head, row)
