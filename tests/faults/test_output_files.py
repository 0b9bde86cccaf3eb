"""Outputs never replace what is at their path: ``export FILE``, ``prune --archive FILE``,
``Store.export(path)`` and ``Store.prune(archive=...)`` follow a symlink (the link stays, the
file it points to is written), and refuse a directory, a socket or a block device
(``OutputTargetError``, exit 2) before anything is written. An export is written into a
FIFO or a character device as it is (streamed, no temp file, no rename, no sync error); an
archive there is refused, nothing pruned: it would keep nothing of the pruned runs. The
broken variants switch the handling off and show the damage it prevents."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shlex
import socket
import stat
import subprocess
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest
from faults import snapshot_dir

import runstore._outputs
from runstore import Run, RunstoreError, Status, Store, cli
from runstore._outputs import Output

pytestmark = [pytest.mark.usefixtures("clean_cli_env"), pytest.mark.timeout(120)]
Cli = Callable[..., tuple[int, str, str]]
#: runs in the demo store: TERMINAL completed ones (pruned by --keep-last 0) and one pending
TERMINAL = 5
#: the one device these tests write to
DEV_NULL = "/dev/null"


@pytest.fixture
def state(tmp_path: pathlib.Path) -> pathlib.Path:
    """A closed store with TERMINAL completed runs and one pending run."""
    path = tmp_path / "state"
    with Store(path, durable=False) as store:
        for n in range(TERMINAL):
            run = store.create(Run(f"m{n}", "/tests/a", "h-a"))
            store.start(run.id)
            store.finish(run.id, Status.COMPLETED, exit_code=0)
        store.create(Run("m-pending", "/tests/a", "h-a"))
    return path



def _runs(state: pathlib.Path) -> int:
    with Store(state, durable=False) as store:
        return len(store.list())


# -- the writers: each returns (exit code, message), the library's errors as the CLI's codes ----

def _cli_export(run_cli: Cli, state: pathlib.Path, target: str) -> tuple[int, str]:
    code, _, err = run_cli("--state-dir", str(state), "export", target)
    return code, err


def _cli_prune(run_cli: Cli, state: pathlib.Path, target: str) -> tuple[int, str]:
    code, _, err = run_cli("--state-dir", str(state), "prune", "--keep-last", "0",
                           "--archive", target)
    return code, err


def _library(call: Callable[[Store, str], object]) -> Callable[[Cli, pathlib.Path, str],
                                                                tuple[int, str]]:
    def write(_run_cli: Cli, state: pathlib.Path, target: str) -> tuple[int, str]:
        with Store(state, durable=False) as store:
            try:
                call(store, target)
            except RunstoreError as exc:
                return cli.exit_code_for(exc), str(exc)
        return 0, ""

    return write


def _an_export(data: bytes) -> None:
    """``data`` is the whole export document of the demo store."""
    runs = json.loads(data)
    assert len(runs) == TERMINAL + 1 and {r["machine"] for r in runs} >= {"m0", "m-pending"}


def _an_archive(data: bytes) -> None:
    """``data`` is the archive of the demo store's TERMINAL completed runs."""
    runs = [json.loads(line) for line in data.splitlines()]
    assert len(runs) == TERMINAL and {r["status"] for r in runs} == {"completed"}


#: name -> (write the target, check what it received, runs the store keeps once written)
WRITERS: dict[str, tuple[Callable[[Cli, pathlib.Path, str], tuple[int, str]],
                         Callable[[bytes], None], int]] = {
    "export": (_cli_export, _an_export, TERMINAL + 1),
    "Store.export": (_library(lambda s, t: s.export(t)), _an_export, TERMINAL + 1),
    "prune --archive": (_cli_prune, _an_archive, 1),
    "Store.prune(archive=)": (_library(lambda s, t: s.prune(keep_last=0, archive=t)),
                              _an_archive, 1),
}


#: the writers of an export, which a FIFO or a character device receives
EXPORTS = ["export", "Store.export"]
#: the writers of an archive, which must be a regular file
ARCHIVES = ["prune --archive", "Store.prune(archive=)"]


class _Drain:
    """A thread that reads a FIFO to its end, as a reader process would, so that its writer
    does not block."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.data = b""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.path, "rb") as fp:
            self.data = fp.read()

    def result(self) -> bytes:
        """What was read, once the writer closed its end. A reader still waiting for a
        writer (the FIFO was never opened) is let go with an empty stream."""
        with contextlib.suppress(OSError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        self._thread.join(timeout=60)
        assert not self._thread.is_alive()
        return self.data


@pytest.fixture
def fifo(outside: pathlib.Path) -> pathlib.Path:
    path = outside / "runs.fifo"
    os.mkfifo(path, 0o600)
    return path


def _device_id(st: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino, st.st_rdev)


# -- a FIFO and a character device: written into as they are -----------------------------------

@pytest.mark.parametrize("writer", EXPORTS)
def test_a_fifo_receives_the_whole_document_and_stays_a_fifo(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, fifo: pathlib.Path, writer: str,
) -> None:
    """The reader gets the whole document, valid; the FIFO is still a FIFO, and no temp file
    was made beside it."""
    write, received, kept = WRITERS[writer]
    reader = _Drain(fifo)
    code, message = write(run_cli, state, str(fifo))
    data = reader.result()
    assert code == 0, message
    received(data)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(outside) == [fifo.name]
    assert _runs(state) == kept


@pytest.mark.parametrize("writer", EXPORTS)
def test_dev_null_stays_the_character_device_it_was(
    run_cli: Cli, state: pathlib.Path, writer: str,
) -> None:
    """/dev/null is written into (it cannot be synced: no error) and is still the same
    character device afterwards; no temp file is left in /dev."""
    write, _, kept = WRITERS[writer]
    before = os.stat(DEV_NULL)
    code, message = write(run_cli, state, DEV_NULL)
    assert code == 0, message
    after = os.stat(DEV_NULL)
    assert stat.S_ISCHR(after.st_mode) and _device_id(after) == _device_id(before)
    assert not [name for name in os.listdir("/dev") if name.startswith(".null.")]
    assert _runs(state) == kept


@pytest.mark.parametrize("writer", ARCHIVES)
@pytest.mark.parametrize("kind", ["FIFO", "character device"])
def test_an_archive_that_keeps_nothing_is_refused(
    run_cli: Cli, state: pathlib.Path, fifo: pathlib.Path, writer: str, kind: str,
) -> None:
    """A FIFO or /dev/null as the archive: exit 2 naming what it is, nothing pruned,
    nothing written (a FIFO is not even opened: no reader is waited for), the file as it
    was."""
    write, _, _ = WRITERS[writer]
    target = str(fifo) if kind == "FIFO" else DEV_NULL
    before = os.stat(target)
    code, message = write(run_cli, state, target)
    assert code == 2 and f"it is a {kind}" in message and "regular file" in message
    assert _runs(state) == TERMINAL + 1
    assert _device_id(os.stat(target)) == _device_id(before)


def test_export_to_a_fifo_through_a_symlink_keeps_both(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, fifo: pathlib.Path,
) -> None:
    """``export LINK`` where LINK points at a FIFO (as /dev/stdout points at a pipe): the
    FIFO gets the document, the link and the FIFO stay as they were."""
    link = outside / "link"
    link.symlink_to(fifo)
    reader = _Drain(fifo)
    code, message = _cli_export(run_cli, state, str(link))
    _an_export(reader.result())
    assert code == 0, message
    assert link.is_symlink() and os.readlink(link) == str(fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# -- a symlink: followed, never replaced -------------------------------------------------------

@pytest.mark.parametrize("writer", WRITERS)
def test_a_symlink_to_a_file_is_kept_and_the_file_written(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, writer: str,
) -> None:
    """The link stays a link to the same file; the file it points to (in another directory)
    holds the export, or the archive appended to what it held; no temp file is left in
    either directory."""
    write, received, kept = WRITERS[writer]
    (outside / "sub").mkdir()
    real = outside / "sub" / "runs.json"
    old = b'{"id":"older"}\n'
    real.write_bytes(old)
    link = outside / "link.json"
    link.symlink_to(real)
    code, message = write(run_cli, state, str(link))
    assert code == 0, message
    assert link.is_symlink() and os.readlink(link) == str(real)
    data = real.read_bytes()
    if "export" in writer:
        received(data)
    else:
        assert data.startswith(old)
        received(data[len(old):])
    assert sorted(os.listdir(outside)) == ["link.json", "sub"]
    assert os.listdir(outside / "sub") == ["runs.json"]
    assert _runs(state) == kept


@pytest.mark.parametrize("writer", WRITERS)
def test_a_symlink_to_the_journal_is_refused(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, writer: str,
) -> None:
    """Followed, it would write over the store's journal: exit 2, the journal and the link
    untouched."""
    write, _, _ = WRITERS[writer]
    link = outside / "link.json"
    link.symlink_to(state / "runs.jsonl")
    before = snapshot_dir(str(state)), os.stat(state / "runs.jsonl").st_ino
    code, message = write(run_cli, state, str(link))
    assert code == cli.EXIT_USAGE, message
    assert "it is the store's own file runs.jsonl" in message
    assert (snapshot_dir(str(state)), os.stat(state / "runs.jsonl").st_ino) == before
    assert link.is_symlink() and os.readlink(link) == str(state / "runs.jsonl")
    assert _runs(state) == TERMINAL + 1


# -- a directory, a socket, a block device: refused ----------------------------------------------

@pytest.mark.parametrize("writer", WRITERS)
def test_a_directory_is_refused(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, writer: str,
) -> None:
    """Exit 2 (``OutputTargetError``), one line naming the path and why; nothing written,
    nothing pruned, no temp file beside it."""
    write, _, _ = WRITERS[writer]
    target = outside / "dir"
    target.mkdir()
    code, message = write(run_cli, state, str(target))
    assert code == cli.EXIT_USAGE, message
    assert f"{target}: it is a directory" in message and "nothing was written" in message
    assert "Traceback" not in message and message.count("\n") <= 1
    assert os.listdir(outside) == ["dir"] and os.listdir(target) == []
    assert _runs(state) == TERMINAL + 1


@pytest.mark.parametrize("writer", WRITERS)
def test_a_socket_is_refused(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, writer: str,
) -> None:
    write, _, _ = WRITERS[writer]
    target = outside / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(target))
        code, message = write(run_cli, state, str(target))
    assert code == cli.EXIT_USAGE, message
    assert f"{target}: it is a socket" in message
    assert stat.S_ISSOCK(os.lstat(target).st_mode)
    assert _runs(state) == TERMINAL + 1


@pytest.fixture
def block_device(outside: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A name that ``_outputs`` sees as a block device (none is made or touched)."""
    target = str(outside / "disk")
    real_stat = os.stat

    def fake_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if path == target:
            return os.stat_result((stat.S_IFBLK | 0o600, 1, 1, 1, 0, 0, 0, 0, 0, 0))
        return real_stat(path, *args, **kwargs)

    proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    proxy.stat = fake_stat
    monkeypatch.setattr(runstore._outputs, "os", proxy)
    return target


@pytest.mark.parametrize("writer", WRITERS)
def test_a_block_device_is_refused(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, block_device: str, writer: str,
) -> None:
    write, _, _ = WRITERS[writer]
    code, message = write(run_cli, state, block_device)
    assert code == cli.EXIT_USAGE, message
    assert f"{block_device}: it is a block device" in message
    assert os.listdir(outside) == []
    assert _runs(state) == TERMINAL + 1


# -- broken variants: without the handling, the node at the path is replaced --------------------

@pytest.fixture
def everything_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the handling off: every target is written as a regular file at its name."""
    monkeypatch.setattr(runstore._outputs, "resolve",
                        lambda target, archive=False: Output(target, False))


@pytest.mark.usefixtures("everything_a_file")
def test_broken_variant_export_replaces_the_fifo_with_a_regular_file(
    run_cli: Cli, state: pathlib.Path, fifo: pathlib.Path,
) -> None:
    """Unhandled, ``export FIFO`` reports success and the FIFO is gone: a regular file holds
    the document instead, and no reader ever gets it."""
    code, out, _ = run_cli("--state-dir", str(state), "export", str(fifo))
    assert code == 0 and "exported" in out
    assert stat.S_ISREG(os.lstat(fifo).st_mode)
    _an_export(fifo.read_bytes())


@pytest.mark.usefixtures("everything_a_file")
def test_broken_variant_export_replaces_the_symlink(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path,
) -> None:
    """Unhandled, ``export LINK`` puts a regular file where the link was; the file it
    pointed to keeps its old content."""
    real = outside / "runs.json"
    real.write_bytes(b"old")
    link = outside / "link.json"
    link.symlink_to(real)
    code, _, _ = run_cli("--state-dir", str(state), "export", str(link))
    assert code == 0
    assert not link.is_symlink() and real.read_bytes() == b"old"


@pytest.mark.usefixtures("everything_a_file")
def test_broken_variant_a_directory_is_an_io_error(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path,
) -> None:
    """Unhandled, a directory is only found out by the rename: exit 1, not a usage error."""
    (outside / "dir").mkdir()
    code, _, err = run_cli("--state-dir", str(state), "export", str(outside / "dir"))
    assert code == 1 and "it is a directory" not in err


def test_broken_variant_an_archive_into_dev_null_is_tried(
    run_cli: Cli, state: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With an archive resolved as an export is, ``prune --archive /dev/null`` is no usage
    error: the prune goes ahead and fails only at the sync /dev/null cannot do."""
    resolve = runstore._outputs.resolve
    monkeypatch.setattr(runstore._outputs, "resolve",
                        lambda target, archive=False: resolve(target))
    code, message = _cli_prune(run_cli, state, DEV_NULL)
    assert code == 1 and "character device" not in message


def test_broken_variant_dev_null_fails_its_sync(
    run_cli: Cli, state: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the tolerance of a sync such a file cannot do, ``export /dev/null`` fails
    with EINVAL (exit 1); /dev/null is still what it was."""
    monkeypatch.setattr(runstore._outputs, "_CANNOT_SYNC", frozenset())
    before = os.stat(DEV_NULL)
    code, err = _cli_export(run_cli, state, DEV_NULL)
    assert code == 1 and "Invalid argument" in err
    assert _device_id(os.stat(DEV_NULL)) == _device_id(before)


# -- /dev/stdout, redirected to a file: written as stdout is ------------------------------------

def _shell(state: pathlib.Path, command: str, redirect: str, target: pathlib.Path
           ) -> subprocess.CompletedProcess[str]:
    """``python -m runstore --state-dir STATE COMMAND`` run by a shell with stdout
    redirected (``>`` or ``>>``) to ``target``."""
    line = (f"{shlex.quote(sys.executable)} -m runstore --state-dir "
            f"{shlex.quote(str(state))} {command} {redirect} {shlex.quote(str(target))}")
    return subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(runstore.__file__)))


def test_export_to_dev_stdout_appended_to_a_log_keeps_the_log(
        state: pathlib.Path, outside: pathlib.Path) -> None:
    """``export /dev/stdout >> log``: the log keeps what it held, the document follows
    (written through stdout, never by a file renamed over it)."""
    log = outside / "app.log"
    log.write_bytes(b"earlier line\n")
    done = _shell(state, "export /dev/stdout", ">>", log)
    assert done.returncode == 0, done.stderr
    head, _, document = log.read_bytes().partition(b"\n")
    assert head == b"earlier line"
    _an_export(document)


def test_prune_archive_to_dev_stdout_keeps_every_archived_run(
        state: pathlib.Path, outside: pathlib.Path) -> None:
    """``prune --archive /dev/stdout > file``: the file holds every pruned run, one JSON
    line each; the report goes to stderr, not over the first archived run."""
    archive = outside / "archive.jsonl"
    done = _shell(state, "prune --keep-last 0 --archive /dev/stdout", ">", archive)
    assert done.returncode == 0, done.stderr
    _an_archive(archive.read_bytes())
    assert "pruned 5 runs" in done.stderr
    assert _runs(state) == 1


# -- a name ending with a slash; the mode of a file replaced -------------------------------------

@pytest.mark.parametrize("writer", WRITERS)
def test_a_name_ending_with_a_slash_is_refused(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, writer: str,
) -> None:
    """``export newdir/`` names a directory: refused (exit 2), where a file named
    ``newdir`` would otherwise be made; nothing pruned."""
    write, _, _ = WRITERS[writer]
    code, message = write(run_cli, state, f"{outside}/newdir/")
    assert code == 2 and "ends with a slash" in message
    assert os.listdir(outside) == []
    assert _runs(state) == TERMINAL + 1


@pytest.mark.parametrize("writer", EXPORTS)
def test_an_export_over_a_file_keeps_its_mode(
    run_cli: Cli, state: pathlib.Path, outside: pathlib.Path, writer: str,
) -> None:
    """The file an export replaces keeps its mode; a new one is 0600."""
    write, received, _ = WRITERS[writer]
    kept, new = outside / "kept.json", outside / "new.json"
    kept.write_bytes(b"old")
    kept.chmod(0o644)
    for target in (kept, new):
        code, message = write(run_cli, state, str(target))
        assert code == 0, message
        received(target.read_bytes())
    assert stat.S_IMODE(kept.stat().st_mode) == 0o644
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
