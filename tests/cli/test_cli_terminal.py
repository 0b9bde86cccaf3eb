"""What the command line writes to a terminal: run fields, paths and error messages holding
control characters and escape sequences are shown escaped by every text command (JSON escapes
them its own way), `watch --since 0` after a compaction, help texts, the hint for a global
option placed after the command, and `stress` memory that does not grow with its duration."""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from hypothesis import given, settings, strategies as st

from runstore import Run, Status, Store, _cli_watch, _clifmt, cli

Cli = Callable[..., tuple[int, str, str]]
pytestmark = pytest.mark.usefixtures("clean_cli_env")

#: what a field may hold: erase the screen, set the window title (OSC ... BEL), a C1 CSI,
#: a bidi override and isolate, a line break, a tab, a carriage return, DEL
HOSTILE = "\x1b[2J\x1b]0;owned\x07\x9b31m\u202eevil\u2066\n\t\r\x7f"
#: any of these reaching the terminal raw (newlines between lines are the output's own)
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
#: the colour styles the command line paints with, the only escape sequences allowed
STYLE = re.compile(r"\x1b\[(?:(?:0|1|2|3[1-6]);)*(?:0|1|2|3[1-6])m")


def _no_raw(text: str, where: str) -> None:
    found = RAW.search(text)
    assert found is None, f"{where}: raw {found.group()!r} at {found.start()}: {text!r}"


@attrs.frozen
class Hostile:
    """A store whose every text field (and whose directory name) holds ``HOSTILE``."""

    dir: str
    done: str  # failed, with error code and message
    live: str  # running, owned by a process of another host (so reapable)
    imported: str  # an imported, completed run whose id holds HOSTILE


@pytest.fixture
def hostile(tmp_path: pathlib.Path) -> Hostile:
    state_dir = tmp_path / "state\x1b[7m\u202e"
    with Store(state_dir, durable=False) as store:
        done = store.create(Run(
            machine="m1" + HOSTILE, test_dir="/t" + HOSTILE, test_dir_hash="h" + HOSTILE,
            artifacts_path="/a" + HOSTILE, logs_path="/l" + HOSTILE, batch_id="b" + HOSTILE,
            plan_entry="p" + HOSTILE))
        store.start(done.id)
        store.finish(done.id, Status.FAILED, exit_code=3, error_code="E" + HOSTILE,
                     error_msg="boom" + HOSTILE)
        live = store.create(Run(machine="m2" + HOSTILE, test_dir="/t2", test_dir_hash="h2"))
        live = store.start(live.id)
        store.update(attrs.evolve(live, owner_host="elsewhere" + HOSTILE))
        imported = "imp" + HOSTILE
        store.import_runs([{"id": imported, "machine": "m3" + HOSTILE, "test_dir": "/t3",
                            "test_dir_hash": "h3", "status": "completed", "exit_code": 0}])
    return Hostile(str(state_dir), done.id, live.id, imported)


#: every text command, as (name, arguments after the global options, accepted exit codes);
#: "{done}", "{live}", "{imported}" and "{tmp}" are filled in; the ones in QUIET print no
#: hostile text at all
TEXT_COMMANDS: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = [
    ("list", ("list",), (0,)),
    ("list-machine", ("list", "--machine", "m1" + HOSTILE), (0,)),
    ("list-batch-none", ("list", "--batch", "nothing" + HOSTILE), (0,)),
    ("show-done", ("show", "{done}"), (0,)),
    ("show-imported", ("show", "{imported}"), (0,)),
    ("show-missing", ("show", "missing" + HOSTILE), (3,)),
    ("active", ("active",), (0,)),
    ("active-machine", ("active", "m2" + HOSTILE), (0,)),
    ("active-idle", ("active", "idle" + HOSTILE), (0,)),
    ("stats", ("stats",), (0,)),
    ("watch", ("watch", "--since", "0", "--timeout", "0"), (0,)),
    ("reap-dry-run", ("reap", "--stale-after", "0s", "--dry-run"), (0,)),
    ("reap", ("reap", "--stale-after", "0s"), (0,)),
    ("prune-dry-run", ("prune", "--keep-last", "0", "--dry-run"), (0,)),
    ("prune-archive", ("prune", "--keep-last", "0", "--archive", "{tmp}/arch" + HOSTILE), (0,)),
    ("check", ("check",), (0,)),
    ("compact", ("compact",), (0,)),
    ("export-file", ("export", "{tmp}/out" + HOSTILE), (0,)),
    ("import-missing", ("import", "{tmp}/nothing" + HOSTILE), (1,)),
    ("mark", ("mark", "{live}", "failed", "--error-msg", "why" + HOSTILE), (0,)),
    ("mark-forbidden", ("mark", "{imported}", "running"), (1,)),
    ("mark-bad-status", ("mark", "{done}", HOSTILE), (2,)),
    ("unknown-option", ("list", "--bogus" + HOSTILE), (2,)),
]
QUIET = frozenset({"list-batch-none", "prune-dry-run", "mark"})
#: the ones whose only hostile text is a value quoted by repr(), which escapes it already
QUOTED = frozenset({"active-idle", "mark-forbidden", "mark-bad-status"})
JSON_COMMANDS: list[tuple[str, tuple[str, ...]]] = [
    ("list", ("list", "--json")),
    ("show", ("show", "{done}", "--json")),
    ("active", ("active", "--json")),
    ("stats", ("stats", "--json")),
    ("watch", ("watch", "--since", "0", "--timeout", "0", "--json")),
    ("reap", ("reap", "--stale-after", "0s", "--dry-run", "--json")),
    ("export", ("export",)),
]


def _argv(h: Hostile, tmp: pathlib.Path, args: tuple[str, ...]) -> list[str]:
    fill = {"{done}": h.done, "{live}": h.live, "{imported}": h.imported}
    out = []
    for arg in args:
        arg = fill.get(arg, arg)
        out.append(arg.replace("{tmp}", str(tmp)))
    return ["--state-dir", h.dir, *out]


@pytest.mark.parametrize(("name", "args", "codes"), [pytest.param(*c, id=c[0])
                                                     for c in TEXT_COMMANDS])
def test_text_commands_show_control_characters_escaped(
        run_cli: Cli, hostile: Hostile, tmp_path: pathlib.Path, name: str,
        args: tuple[str, ...], codes: tuple[int, ...]) -> None:
    """No text command writes a control character, escape sequence or bidi control from a
    run field, a path or an error message raw: each is shown as an escape."""
    code, out, err = run_cli(*_argv(hostile, tmp_path, args))
    assert code in codes, (code, out, err)
    _no_raw(out, "stdout")
    _no_raw(err, "stderr")
    if name not in QUIET:
        assert "\\x1b" in out + err  # shown, escaped, not dropped
        assert "\\u202e" in out + err


@pytest.mark.parametrize("args", [pytest.param(a, id=n) for n, a in JSON_COMMANDS])
def test_json_output_escapes_them_the_json_way(
        run_cli: Cli, hostile: Hostile, tmp_path: pathlib.Path, args: tuple[str, ...]) -> None:
    """JSON output holds no raw control character either (C1 controls and bidi controls,
    which JSON may leave raw, are written as \\u escapes), and parses back to the values."""
    code, out, err = run_cli(*_argv(hostile, tmp_path, args))
    assert code == 0, err
    _no_raw(out, "stdout")
    assert err == ""
    docs = ([json.loads(line) for line in out.splitlines()] if "watch" in args
            else [json.loads(out)])
    assert any(HOSTILE in text for text in _strings(docs))


def _strings(data: Any) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield key
            yield from _strings(value)
    elif isinstance(data, list):
        for value in data:
            yield from _strings(value)


def test_colour_keeps_only_its_own_styles(run_cli: Cli, hostile: Hostile) -> None:
    """With colour on, the only escape sequences written are the command line's own
    styles; the ones in the fields are shown escaped."""
    for args in (("list",), ("show", hostile.done), ("watch", "--since", "0", "--timeout", "0"),
                 ("stats",), ("reap", "--stale-after", "0s", "--dry-run")):
        code, out, err = run_cli("--color", "always", "--state-dir", hostile.dir, *args)
        assert code == 0, err
        assert STYLE.search(out), args  # painted
        _no_raw(STYLE.sub("", out), f"{args} stdout")
        assert "\\x1b[2J" in out


def test_progress_label_is_shown_escaped() -> None:
    """The progress bar's label (a path) is escaped like everything else."""
    stream = io.StringIO()
    ctx = cli.Context(cli.build_parser().parse_args(["stats"]), io.StringIO(), stream)
    ctx.progress_enabled = True
    assert ctx.progress("compacting /x" + HOSTILE).label == "compacting /x" + _clifmt.visible(
        HOSTILE)
    _no_raw(ctx.progress("a" + HOSTILE).label, "label")


def test_visible_escapes_each_kind_and_is_idempotent() -> None:
    """``visible`` names each character; applying it twice changes nothing more."""
    assert _clifmt.visible("a\x1b[31mb\n\t\r\x9b\x7f\u202e\u2069c") == (
        "a\\x1b[31mb\\n\\t\\r\\x9b\\x7f\\u202e\\u2069c")
    assert _clifmt.visible(_clifmt.visible(HOSTILE)) == _clifmt.visible(HOSTILE)
    assert _clifmt.visible("plain \\ text, é, 名前") == "plain \\ text, é, 名前"
    painted = _clifmt.Painter(True).status("failed") + " m\x1b[8m"
    assert _clifmt.visible(painted, styles=True) == "\x1b[31mfailed\x1b[0m m\\x1b[8m"
    assert json.loads(_clifmt.json_visible(json.dumps("x\u202e\x9b", ensure_ascii=False))) == (
        "x\u202e\x9b")


_TEXT = st.lists(st.characters(max_codepoint=0x2100) | st.sampled_from(
    "\x00\x1b\x7f\x9b\u061c\u202e\u2028\u2069 \\\"") | st.just("\x1b[31m"),
    max_size=40).map("".join)


@settings(max_examples=1000, deadline=None)
@given(_TEXT)
def test_visible_is_its_escaping_on_any_text(text: str) -> None:
    """The shortcuts for printable ASCII (``visible``) and ASCII without DEL
    (``json_visible``) give what the escaping itself gives."""
    assert _clifmt.visible(text) == _clifmt._UNSAFE_CHAR.sub(
        lambda m: _clifmt._escape(m.group()), text)
    assert _clifmt.visible(text, styles=True) == _clifmt._UNSAFE_OR_STYLE.sub(
        _clifmt._escape_unstyled, text)
    assert _clifmt.json_visible(text) == _clifmt._UNSAFE_IN_JSON.sub(
        lambda m: f"\\u{ord(m.group()):04x}", text)


# -- broken variant: the escaping replaced by the identity ------------------------------------

@pytest.mark.parametrize(("name", "args", "codes"), [pytest.param(*c, id=c[0])
                                                     for c in TEXT_COMMANDS
                                                     if c[0] not in QUIET | QUOTED])
def test_without_the_escaping_raw_sequences_reach_the_terminal(
        run_cli: Cli, hostile: Hostile, tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch, name: str, args: tuple[str, ...],
        codes: tuple[int, ...]) -> None:
    """Proof that the test above can fail, command by command: with ``visible`` made the
    identity, the fields' escape sequences reach stdout or stderr raw."""
    monkeypatch.setattr(_clifmt, "visible", lambda text, styles=False: text)
    code, out, err = run_cli(*_argv(hostile, tmp_path, args))
    assert code in codes, (code, out, err)
    assert RAW.search(out + err), (out, err)


@pytest.mark.parametrize("args", [pytest.param(a, id=n) for n, a in JSON_COMMANDS])
def test_without_the_json_escaping_bidi_controls_reach_the_terminal(
        run_cli: Cli, hostile: Hostile, tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]) -> None:
    """Proof for the JSON test: with ``json_visible`` (and ``visible``) made the identity,
    the C1 and bidi controls that JSON allows raw reach stdout raw."""
    monkeypatch.setattr(_clifmt, "json_visible", lambda text: text)
    monkeypatch.setattr(_clifmt, "visible", lambda text, styles=False: text)
    code, out, _ = run_cli(*_argv(hostile, tmp_path, args))
    assert code == 0
    assert "\u202e" in out and "\x9b" in out


# -- watch --since 0 after a compaction -------------------------------------------------------

@pytest.fixture
def compacted(tmp_path: pathlib.Path) -> tuple[str, int, int]:
    """A store of 20 changes compacted down to its last 4: (directory, oldest retained seq,
    last seq)."""
    state_dir = tmp_path / "state"
    with Store(state_dir, durable=False) as store:
        for i in range(5):
            run = store.create(Run(f"m{i}", "/t", "h"))
            store.start(run.id)
            store.heartbeat(run.id)
            store.finish(run.id, Status.COMPLETED, exit_code=0)
        store._transact(lambda: (store._compact(retain=4), []))
        stats = store.stats()
    assert stats.oldest_seq > 1  # the first changes are gone
    return str(state_dir), stats.oldest_seq, stats.last_seq


def _watched_seqs(out: str) -> list[int]:
    return [json.loads(line)["seq"] for line in out.splitlines()]


def test_watch_since_0_starts_at_the_oldest_retained_change(
        run_cli: Cli, compacted: tuple[str, int, int]) -> None:
    """`watch --since 0` after a compaction replays every retained change, from the oldest
    one, instead of reporting that older ones are gone."""
    state_dir, oldest, last = compacted
    code, out, err = run_cli("--state-dir", state_dir, "watch", "--since", "0", "--timeout",
                             "0", "--json")
    assert (code, err) == (0, "")
    assert _watched_seqs(out) == list(range(oldest, last + 1))


def test_watch_since_an_old_seq_still_reports_truncation(
        run_cli: Cli, compacted: tuple[str, int, int]) -> None:
    """An explicit positive --since older than the retained history is reported (exit 3),
    naming the oldest retained change."""
    state_dir, oldest, _ = compacted
    code, out, err = run_cli("--state-dir", state_dir, "watch", "--since", "1", "--timeout",
                             "0")
    assert (code, out) == (3, "")
    assert "no longer retained" in err and f"watch --since {oldest - 1}" in err
    code, out, err = run_cli("--state-dir", state_dir, "watch", "--since", str(oldest - 1),
                             "--timeout", "0", "--json")
    assert (code, err) == (0, "")
    assert _watched_seqs(out)[0] == oldest


def test_without_the_restart_watch_since_0_fails_after_a_compaction(
        run_cli: Cli, compacted: tuple[str, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the test above can fail: following with a plain ``watch(0)``, as before,
    reports the truncation (exit 3)."""
    monkeypatch.setattr(_cli_watch, "_follow", lambda store, since, timeout, stop, span:
                        store.watch(since, timeout=timeout))
    code, out, err = run_cli("--state-dir", compacted[0], "watch", "--since", "0", "--timeout",
                             "0", "--json")
    assert (code, out) == (3, "")
    assert "no longer retained" in err


# -- Ctrl-C while watch reads: the signal handled inside a finalizer --------------------------

#: Python run in the child before ``main``: the first time the store drops the descriptor it
#: read changes from, SIGINT is delivered while that finalizer runs - the moment at which a
#: real Ctrl-C once landed
_SIGINT_IN_FINALIZER = """
import os, signal, runstore.store
_fired = []
def _interrupt_here(self):
    if not _fired:
        _fired.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10000):  # the handler runs at one of these bytecodes
            pass
runstore.store._HeldChanges.__del__ = _interrupt_here
"""
_WITHOUT_THE_FLAG = """
import contextlib, runstore._cli_watch
runstore._cli_watch._interrupt_ends_watch = lambda stop: contextlib.nullcontext()
"""


def _watch_interrupted_in_a_finalizer(state_dir: str, setup: str) -> tuple[int, str, str,
                                                                              float]:
    code = ("import sys, time\n" + setup + "\nimport runstore.cli\nt = time.monotonic()\n"
            "rc = runstore.cli.main(sys.argv[1:])\n"
            "print(f'elapsed {time.monotonic() - t:.3f}', file=sys.stderr)\nsys.exit(rc)")
    proc = subprocess.run(
        [sys.executable, "-c", code, "--state-dir", state_dir, "watch", "--since", "0",
         "--timeout", "6", "--json"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k not in ("RUNSTORE_DIR", "RUNSTORE_URL")})
    err, _, elapsed = proc.stderr.rpartition("elapsed ")
    return proc.returncode, proc.stdout, err, float(elapsed)


def test_ctrl_c_during_a_finalizer_still_ends_watch(
        compacted: tuple[str, int, int]) -> None:
    """Ctrl-C that arrives while the store runs a finalizer ends `watch` at once, exit 0,
    nothing on stderr, every change read before it printed."""
    state_dir, oldest, last = compacted
    code, out, err, elapsed = _watch_interrupted_in_a_finalizer(state_dir, _SIGINT_IN_FINALIZER)
    assert (code, err) == (0, "")
    assert elapsed < 3
    assert _watched_seqs(out) == list(range(oldest, last + 1))


def test_without_the_flag_ctrl_c_in_a_finalizer_is_lost(
        compacted: tuple[str, int, int]) -> None:
    """Proof that the test above can fail: with Ctrl-C raising KeyboardInterrupt where it
    lands (as before), the interpreter reports it as "Exception ignored" on stderr and the
    watch goes on until its --timeout."""
    code, _, err, elapsed = _watch_interrupted_in_a_finalizer(
        compacted[0], _SIGINT_IN_FINALIZER + _WITHOUT_THE_FLAG)
    assert code == 0
    assert "Exception ignored" in err and "KeyboardInterrupt" in err
    assert elapsed >= 5


# -- help texts --------------------------------------------------------------------------------

COMMANDS = ("list", "show", "active", "stats", "watch", "reap", "prune", "compact", "check",
            "export", "import", "mark", "migrate")


def _help(run_cli: Cli, command: str) -> str:
    code, out, err = run_cli(command, "--help")
    assert (code, err) == (0, "")
    return out


def _description(help_text: str) -> str:
    """The paragraph between the usage and the options."""
    return help_text.split("\n\n")[1]


def test_every_command_has_a_help_text_of_its_own(run_cli: Cli) -> None:
    """Each command's --help has its own description, longer than its line in the list of
    commands, and no option help is the same text under two names meaning different
    things."""
    descriptions = {command: _description(_help(run_cli, command)) for command in COMMANDS}
    assert len(set(descriptions.values())) == len(COMMANDS)
    overview = run_cli("--help")[1]
    for command, text in descriptions.items():
        line = next(ln for ln in overview.splitlines() if ln.strip().startswith(command + " "))
        assert len(text) > len(line.split(None, 1)[1]) + 20, command
    assert "exit 3" in descriptions["show"].lower()
    assert "--since 0" in descriptions["watch"]
    assert "--stale-after" in descriptions["reap"]
    assert "File stores only" in descriptions["check"]
    assert "File stores only" in descriptions["compact"]


def test_copied_help_texts_are_caught(run_cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the distinctness check can fail: with one description copied onto
    another command, two commands show the same text."""
    monkeypatch.setitem(cli.COMMAND_HELP, "active", cli.COMMAND_HELP["list"])
    descriptions = {command: _description(_help(run_cli, command)) for command in COMMANDS}
    assert len(set(descriptions.values())) == len(COMMANDS) - 1


@pytest.mark.parametrize("command", ["stats", "check"])
def test_json_option_help_fits_the_command(run_cli: Cli, command: str) -> None:
    """`stats --json` and `check --json` print a report, not run records: their --json
    help does not say "record fields"."""
    text = _help(run_cli, command)
    assert "--json" in text and "record fields" not in text


def test_stress_help_is_the_stress_commands_own(run_cli: Cli) -> None:
    """`stress --help` describes the stress run and its options."""
    code, out, _ = run_cli("stress", "--help")
    assert code == 0
    assert "--procs" in out and "dispatcher cycle" in out


# -- a global option after the command ------------------------------------------------------

@pytest.mark.parametrize(("argv", "names", "command"), [
    (["list", "--state-dir", "/x"], "--state-dir", "list"),
    (["show", "ID", "--store", "/x"], "--store", "show"),
    (["--state-dir", "/x", "watch", "--color=always"], "--color", "watch"),
    (["stats", "--lock-timeout", "3", "--colour", "never"], "--lock-timeout, --colour",
     "stats"),
])
def test_misplaced_global_option_gets_a_hint(run_cli: Cli, argv: list[str], names: str,
                                             command: str) -> None:
    """A global option written after the command is a usage error (exit 2) whose one line
    says to put it before the command, and how."""
    code, out, err = run_cli(*argv)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert f"; {names} " in err
    assert "before the command, as in `runstore --" in err
    assert f" {command} ...`" in err


def test_misplaced_option_hint_never_shows_a_password(run_cli: Cli) -> None:
    """The usage error repeats the arguments; a password in a --store URL is replaced."""
    code, _, err = run_cli("list", "--store", "postgresql://u:sekret@host/db")
    assert code == 2
    assert "sekret" not in err and "u:***@host" in err


def test_no_hint_when_nothing_is_misplaced(run_cli: Cli) -> None:
    """Other usage errors, and `stress --state-dir` (its own option), get no such hint."""
    code, _, err = run_cli("list", "--bogus")
    assert code == 2 and "global option" not in err
    assert cli.misplaced_global_options(["stress", "--state-dir", "/x"]) is None
    assert cli.misplaced_global_options(["--state-dir", "list", "list"]) is None
    assert cli.misplaced_global_options(["--state-dir", "/x", "list", "--store=y"]) == (
        "list", ["--store"])


def test_without_the_hint_the_error_does_not_say_where_they_go(
        run_cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the hint test can fail: without the hint, argparse alone says only
    that the arguments are not recognized."""
    monkeypatch.setattr(cli, "misplaced_global_options", lambda argv: None)
    code, _, err = run_cli("list", "--state-dir", "/x")
    assert code == 2
    assert "unrecognized arguments: --state-dir /x" in err
    assert "before the command" not in err


# -- stress memory -----------------------------------------------------------------------------

#: the stress command in a child process, which then prints its own peak RSS (KiB) on stderr
#: the peak is the process's own VmHWM: ``ru_maxrss`` also counts the process it was
#: spawned from (Linux keeps the high-water mark across exec), a pytest process that may
#: be larger than anything the stress run does
_STRESS_PEAK = """
import json, sys
{setup}
import runstore.stress
rc = runstore.stress.main(sys.argv[1:])
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({{"peak_kib": peak}}), file=sys.stderr)
sys.exit(rc)
"""
#: keeps every history line in memory, as the analysis once did
_KEEP_HISTORIES = """
import runstore._stress_check as _s
_read, _kept = _s._history_items, []
def _keep(path):
    items = list(_read(path))
    _kept.append(items)
    return iter(items)
_s._history_items = _keep
"""


def _stress_peak(seconds: float, setup: str = "") -> tuple[int, int]:
    """(operations, peak RSS in bytes) of `stress --seconds SECONDS` in a child process."""
    proc = subprocess.run(
        [sys.executable, "-c", _STRESS_PEAK.format(setup=setup), "--seconds", str(seconds),
         "--json"], capture_output=True, text=True, timeout=300 + 3 * seconds,
        stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["ok"]
    return report["operations"], json.loads(proc.stderr.splitlines()[-1])["peak_kib"] * 1024


def _bytes_per_operation(short: float, long: float, setup: str = "") -> float:
    """How much the stress process's peak grows per extra operation from a run of ``short``
    seconds to one of ``long`` seconds."""
    ops_short, peak_short = _stress_peak(short, setup)
    ops_long, peak_long = _stress_peak(long, setup)
    assert ops_long > 1.5 * ops_short, (ops_short, ops_long)  # long enough to tell
    return (peak_long - peak_short) / (ops_long - ops_short)


#: a loose bound: what is left grows with the runs the store holds (the final check keeps
#: a small tuple per run, about 1.2 KB with its index entries; a run every few operations
#: gives 130-440 bytes per operation as measured, the most on a busy machine); keeping each
#: operation's history lines takes over 2,000 bytes per operation
MAX_BYTES_PER_OPERATION = 1000


def test_stress_memory_does_not_grow_with_its_duration() -> None:
    """A stress run 4 times as long peaks at about the same memory: nothing is kept per
    operation."""
    grown = _bytes_per_operation(1, 4)
    assert grown < MAX_BYTES_PER_OPERATION, f"{grown:.0f} bytes per operation"


@pytest.mark.stress
def test_stress_memory_does_not_grow_over_longer_runs() -> None:
    """The same over 3 s and 12 s runs (-m stress)."""
    grown = _bytes_per_operation(3, 12)
    assert grown < MAX_BYTES_PER_OPERATION, f"{grown:.0f} bytes per operation"


def test_keeping_the_histories_shows_as_growth() -> None:
    """Proof that the memory test can fail: with every history line kept in memory, the
    peak grows with the operations, past the bound."""
    grown = _bytes_per_operation(1, 4, _KEEP_HISTORIES)
    assert grown > MAX_BYTES_PER_OPERATION, f"{grown:.0f} bytes per operation"


def test_latency_percentiles_from_the_bounded_histogram() -> None:
    """The histogram's p50 and p99 are within 0.4 % of the exact ones, however many
    latencies it holds."""
    import random

    from runstore.stress import Latencies

    rng = random.Random(7)
    values = [int(rng.lognormvariate(11, 1.5)) for _ in range(50_000)] + [0, 1, 255, 256]
    hist = Latencies()
    for v in values:
        hist.add(v)
    ordered = sorted(values)
    for q in (0.5, 0.99):
        exact = ordered[min(len(values) - 1, int(q * len(values)))] / 1000
        assert abs(hist.percentile(q) - exact) <= 0.004 * exact + 0.001
    assert hist.count == len(values)
    assert len(hist._buckets) < 7200
    assert Latencies().percentile(0.5) == 0.0
