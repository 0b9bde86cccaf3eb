"""Outputs never overwrite the store: ``export FILE``, ``prune --archive FILE``, ``migrate
--to`` and ``Store.export(path)`` / ``Store.prune(archive=...)`` refuse a target that is one of
the store's own files, its state directory or a name inside it, judged by device and inode
(symlinks and hard links included), before anything is opened; the store stays byte for byte
what it was. The broken variants switch the check off and show the damage it prevents."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import subprocess
import sys
from collections.abc import Callable

import pytest
from faults import snapshot_dir

import runstore._targets
from runstore import (
    CorruptStoreError,
    OutputTargetError,
    Run,
    RunstoreError,
    Status,
    Store,
    _interchange as interchange,
    cli,
)

pytestmark = [pytest.mark.usefixtures("clean_cli_env"), pytest.mark.timeout(120)]
Cli = Callable[..., tuple[int, str, str]]
#: runs in the demo store: TERMINAL completed ones (pruned by --keep-last 0) and one pending
TERMINAL = 5


@pytest.fixture
def state(tmp_path: pathlib.Path) -> pathlib.Path:
    """A closed store with TERMINAL completed runs and one pending run."""
    path = tmp_path / "state"
    with Store(path, durable=False) as store:
        for n in range(TERMINAL):
            run = store.create(_run(f"m{n}"))
            store.start(run.id)
            store.finish(run.id, Status.COMPLETED, exit_code=0)
        store.create(_run("m-pending"))
    return path



def _run(machine: str) -> Run:
    return Run(machine, "/tests/a", "h-a")


# -- the store's files, by every way of naming them -------------------------------------------

def _symlink(link: pathlib.Path, to: pathlib.Path) -> str:
    link.symlink_to(to)
    return str(link)


def _hard_link(link: pathlib.Path, to: pathlib.Path) -> str:
    os.link(to, link)
    return str(link)


#: how a target names the store: (state directory, outside directory) -> the target path
TARGETS: dict[str, Callable[[pathlib.Path, pathlib.Path], str]] = {
    "journal": lambda s, o: str(s / "runs.jsonl"),
    "lock file": lambda s, o: str(s / "runs.lock"),
    "new name inside": lambda s, o: str(s / "runs.json"),
    "new name in a new subdirectory": lambda s, o: str(s / "sub" / "runs.json"),
    "symlink to the journal": lambda s, o: _symlink(o / "runs.json", s / "runs.jsonl"),
    "hard link to the journal": lambda s, o: _hard_link(o / "runs.json", s / "runs.jsonl"),
    "hard link to the lock file": lambda s, o: _hard_link(o / "lock", s / "runs.lock"),
    "state directory": lambda s, o: str(s),
    "symlink to the state directory": lambda s, o: _symlink(o / "dir", s),
    "new name through a symlinked directory": lambda s, o: _symlink(o / "dir", s) + "/x.json",
    "dangling symlink into the state directory": lambda s, o: _symlink(o / "x.json",
                                                                       s / "x.json"),
}

#: each command that writes a file: (state directory, target) -> its arguments
COMMANDS: dict[str, Callable[[str, str], list[str]]] = {
    "export": lambda s, t: ["--state-dir", s, "export", t],
    "prune --archive": lambda s, t: ["--state-dir", s, "prune", "--keep-last", "0",
                                     "--archive", t],
    "migrate --to": lambda s, t: ["migrate", "--from", s, "--to", t],
}


def _files(path: pathlib.Path) -> tuple[dict[str, bytes], dict[str, tuple[int, int]]]:
    """A directory's regular files with their bytes, and every entry with its identity."""
    ids = {}
    for entry in os.scandir(path):
        st = entry.stat(follow_symlinks=False)
        ids[entry.name] = (st.st_dev, st.st_ino)
    return snapshot_dir(str(path)), ids


def _runs(state: pathlib.Path) -> int:
    with Store(state, durable=False) as store:
        return len(store.list())


# -- the command line -----------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("how", TARGETS)
def test_cli_refuses_a_target_that_is_the_store(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, command: str, how: str,
) -> None:
    """Every writing command refuses every way of naming the store: exit 2, nothing written."""
    target = TARGETS[how](state, outside)
    before, before_outside = _files(state), _files(outside)
    code, out, err = run_cli(*COMMANDS[command](str(state), target))
    assert code == cli.EXIT_USAGE, err
    assert err.startswith("runstore: error: ") and err.count("\n") == 1
    assert "nothing was written" in err or "the same store" in err
    assert out == ""
    assert _files(state) == before  # the journal and the lock file: same bytes, same inodes
    assert _files(outside) == before_outside  # no temp file left beside the target
    assert _runs(state) == TERMINAL + 1


def test_cli_message_names_the_target_the_store_and_the_remedy(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path,
) -> None:
    """The refusal says which file, which store, why and what to do instead."""
    link = _hard_link(outside / "copy.jsonl", state / "runs.jsonl")
    code, _, err = run_cli("--state-dir", str(state), "export", link)
    assert code == 2
    assert f"{link}: it is the store's own file runs.jsonl" in err
    assert f"would damage the store at {state}" in err
    assert f"write the export to a file outside {state}" in err


def test_migrate_into_the_same_store_by_a_symlink_is_refused(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path,
) -> None:
    """``migrate --to`` a symlink to the source's directory is the same store: exit 2."""
    link = _symlink(outside / "same", state)
    code, _, err = run_cli("migrate", "--from", str(state), "--to", link)
    assert code == 2
    assert f"--to {link}: it is the store's state directory itself" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_writes_a_target_outside_the_store(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, command: str,
) -> None:
    """A target outside the state directory still works, even named like a store file."""
    target = outside / ("state" if command == "migrate --to" else "runs.jsonl")
    code, _, err = run_cli(*COMMANDS[command](str(state), str(target)))
    assert code == 0, err
    if command == "export":
        assert len(json.loads(target.read_bytes())) == TERMINAL + 1
    elif command == "prune --archive":
        assert len(target.read_bytes().splitlines()) == TERMINAL
        assert _runs(state) == 1
    else:
        assert _runs(target) == TERMINAL + 1


def test_cli_export_to_stdout_redirected_onto_the_journal_is_refused(
    state: pathlib.Path,
) -> None:
    """``runstore export >> runs.jsonl``: stdout is the journal itself, so exit 2."""
    before = _files(state)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RUNSTORE_URL", None)
    with open(state / "runs.jsonl", "ab") as journal:
        proc = subprocess.run([sys.executable, "-m", "runstore", "--state-dir", str(state),
                               "export"], stdout=journal, stderr=subprocess.PIPE, env=env,
                              timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert b"stdout: it is the store's own file runs.jsonl" in proc.stderr
    assert _files(state) == before


# -- the library ----------------------------------------------------------------------------

@pytest.mark.parametrize("how", TARGETS)
def test_store_export_refuses_a_path_that_is_the_store(
    state: pathlib.Path, outside: pathlib.Path, how: str,
) -> None:
    """``Store.export(path)`` raises OutputTargetError before opening the path."""
    target = TARGETS[how](state, outside)
    with Store(state, durable=False) as store:
        before, before_outside = _files(state), _files(outside)
        with pytest.raises(OutputTargetError) as caught:
            store.export(target)
        assert _files(state) == before
        assert _files(outside) == before_outside
    assert caught.value.target == target
    assert caught.value.store == str(state)


@pytest.mark.parametrize("how", TARGETS)
def test_store_prune_refuses_an_archive_that_is_the_store(
    state: pathlib.Path, outside: pathlib.Path, how: str,
) -> None:
    """``Store.prune(archive=...)`` raises OutputTargetError and prunes nothing."""
    target = TARGETS[how](state, outside)
    with Store(state, durable=False) as store:
        before = _files(state)
        with pytest.raises(OutputTargetError):
            store.prune(keep_last=0, archive=pathlib.Path(target))
        assert _files(state) == before
        assert len(store.list()) == TERMINAL + 1


def test_store_export_refuses_a_file_object_open_on_the_journal(state: pathlib.Path) -> None:
    """A file object open on one of the store's files is refused before it is written."""
    with Store(state, durable=False) as store:
        before = _files(state)
        with open(state / "runs.jsonl", "ab") as fp, pytest.raises(OutputTargetError) as caught:
            store.export(fp)
        assert _files(state) == before
    assert caught.value.target == str(state / "runs.jsonl")  # the file object's name


def test_store_export_and_prune_write_paths_outside_the_store(
    state: pathlib.Path, outside: pathlib.Path,
) -> None:
    """Outside the state directory, export to a path and prune's archive work as before."""
    with Store(state, durable=False) as store:
        assert store.export(outside / "runs.jsonl") == TERMINAL + 1
        assert store.prune(keep_last=0, archive=str(outside / "archive.jsonl")) == TERMINAL
    assert len(json.loads((outside / "runs.jsonl").read_bytes())) == TERMINAL + 1
    assert len((outside / "archive.jsonl").read_bytes().splitlines()) == TERMINAL
    assert sorted(os.listdir(outside)) == ["archive.jsonl", "runs.jsonl"]  # no temp file


def test_output_target_error_carries_its_data_and_pickles() -> None:
    """The error is a RunstoreError and a ValueError, with target, store and remedy."""
    exc = OutputTargetError("/s/runs.jsonl", "/s", "it is the store's own file runs.jsonl")
    assert isinstance(exc, RunstoreError) and isinstance(exc, ValueError)
    assert exc.remedy == "write it to a file outside /s"
    again = pickle.loads(pickle.dumps(exc))
    assert (again.target, again.store, again.problem, str(again)) == (
        exc.target, exc.store, exc.problem, str(exc))
    assert cli.exit_code_for(exc) == cli.EXIT_USAGE


# -- broken variants: without the check, the store is damaged -----------------------------------

@pytest.fixture
def no_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the identity check off: every target is allowed."""
    monkeypatch.setattr(runstore._targets, "_refusal", lambda *args: "")


@pytest.mark.usefixtures("no_check")
def test_broken_variant_export_onto_the_journal_leaves_an_unreadable_store(
    run_cli: Cli, state: pathlib.Path,
) -> None:
    """Unchecked, ``export runs.jsonl`` reports success and every command then refuses."""
    code, out, _ = run_cli("--state-dir", str(state), "export", str(state / "runs.jsonl"))
    assert code == 0 and "exported" in out
    with pytest.raises(CorruptStoreError):
        Store(state, durable=False)


@pytest.mark.usefixtures("no_check")
def test_broken_variant_library_export_through_a_hard_link_damages_the_journal(
    state: pathlib.Path, outside: pathlib.Path,
) -> None:
    """Unchecked, ``Store.export`` to a file object open on a hard link to the journal
    writes over it and leaves an unreadable store."""
    link = TARGETS["hard link to the journal"](state, outside)
    with Store(state, durable=False) as store, open(link, "r+b") as fp:
        store.export(fp)  # written over the journal's bytes through the other name
    with pytest.raises(CorruptStoreError):
        Store(state, durable=False)


@pytest.mark.usefixtures("no_check")
def test_broken_variant_export_onto_the_lock_file_replaces_it(
    run_cli: Cli, state: pathlib.Path,
) -> None:
    """Unchecked, ``export runs.lock`` puts another inode at the lock file's name, so a
    process that opened the old one and one that opens the new one no longer exclude each
    other."""
    before = _files(state)
    code, _, _ = run_cli("--state-dir", str(state), "export", str(state / "runs.lock"))
    assert code == 0
    assert _files(state)[1]["runs.lock"] != before[1]["runs.lock"]
    assert _files(state)[0]["runs.lock"] != before[0]["runs.lock"]


@pytest.mark.usefixtures("no_check")
def test_broken_variant_prune_onto_the_journal_loses_the_archive(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path,
) -> None:
    """Unchecked, ``prune --archive`` into a hard link to the journal reports the runs
    archived, but the rewritten journal does not hold the archive: it is gone."""
    with Store(state, durable=False) as store:
        doomed = [r for r in store.list() if r.status.is_terminal]
    archive = interchange.archive_lines(doomed, {}).splitlines()
    link = TARGETS["hard link to the journal"](state, outside)
    code, out, _ = run_cli("--state-dir", str(state), "prune", "--keep-last", "0",
                           "--archive", link)
    assert code == 0 and f"archived to {link}" in out
    journal = (state / "runs.jsonl").read_bytes().splitlines()
    assert not set(archive) & set(journal)
    assert _runs(state) == 1


@pytest.mark.usefixtures("no_check")
def test_broken_variant_migrate_writes_a_store_inside_the_state_directory(
    run_cli: Cli, state: pathlib.Path,
) -> None:
    """Unchecked, ``migrate --to`` a new name inside the state directory creates a second
    store inside the first one's directory."""
    code, _, _ = run_cli("migrate", "--from", str(state), "--to", str(state / "copy"))
    assert code == 0
    assert (state / "copy" / "runs.jsonl").exists()
