"""Security: private modes whatever the umask, no symlink is ever followed, and a state
directory or file that is not ours or is writable by others is refused."""

from __future__ import annotations

import contextlib
import os
import pathlib
import stat
from collections.abc import Iterator

import pytest

from runstore import PrepareOutcome, Run, Status, Store, UnsafeStoreError

NOBODY = 65534
VICTIM_TEXT = b"precious data that runstore must never touch\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _use(s: Store, machine: str = "m1") -> Run:
    run, outcome = s.prepare_atomic(machine, "h", lambda: Run(machine, "/t", "h"))
    assert outcome is PrepareOutcome.CREATED
    return s.finish(s.start(run.id).id, Status.COMPLETED, exit_code=0)


@pytest.fixture
def victim(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A file outside the state directory that an attacker wants runstore to overwrite."""
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM_TEXT)
    path.chmod(0o644)
    yield path
    assert path.read_bytes() == VICTIM_TEXT, "the victim file was changed"
    assert _mode(path) == 0o644, "the victim file's mode was changed"


# -- modes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077], ids=["000", "022", "077"])
def test_modes_are_private_whatever_the_umask(store_dir: pathlib.Path, umask: int) -> None:
    """The state directory is 0700 and every file 0600 under umask 000, 022 and 077, also
    after a compaction replaced the journal."""
    old = os.umask(umask)
    try:
        with Store(store_dir) as s:
            _use(s)
            modes = {p.name: _mode(p) for p in store_dir.iterdir()}
            s.compact()
            _use(s, "m2")
            modes_after_compact = {p.name: _mode(p) for p in store_dir.iterdir()}
    finally:
        os.umask(old)
    assert _mode(store_dir) == 0o700
    assert modes == {"runs.jsonl": 0o600, "runs.lock": 0o600}
    assert modes_after_compact == modes
    assert {p.name: _mode(p) for p in store_dir.iterdir()} == modes


def test_loose_file_modes_are_tightened(store_dir: pathlib.Path) -> None:
    """A journal or lock file left world-readable is set back to 0600 on open."""
    with Store(store_dir) as s:
        _use(s)
    (store_dir / "runs.jsonl").chmod(0o644)
    (store_dir / "runs.lock").chmod(0o666)
    with Store(store_dir) as s:
        assert len(s.list()) == 1
    assert _mode(store_dir / "runs.jsonl") == 0o600
    assert _mode(store_dir / "runs.lock") == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o707, 0o720, 0o702])
def test_state_dir_writable_by_others_is_refused(store_dir: pathlib.Path, mode: int) -> None:
    """A state directory writable by group or others raises UnsafeStoreError, unchanged."""
    store_dir.mkdir()
    store_dir.chmod(mode)
    with pytest.raises(UnsafeStoreError) as info:
        Store(store_dir)
    assert isinstance(info.value, PermissionError)
    assert info.value.path == str(store_dir)
    assert "writable" in str(info.value)
    assert _mode(store_dir) == mode
    assert list(store_dir.iterdir()) == []


def test_readable_state_dir_of_ours_is_accepted(store_dir: pathlib.Path) -> None:
    """A directory of ours with mode 0755 (not writable by others) is accepted."""
    store_dir.mkdir()
    store_dir.chmod(0o755)
    with Store(store_dir) as s:
        _use(s)


@needs_root
def test_state_dir_owned_by_another_user_is_refused(store_dir: pathlib.Path) -> None:
    """A state directory owned by another user raises UnsafeStoreError; nothing is created."""
    store_dir.mkdir(mode=0o700)
    os.chown(store_dir, NOBODY, NOBODY)
    with pytest.raises(UnsafeStoreError) as info:
        Store(store_dir)
    assert "owned by uid" in str(info.value)
    assert list(store_dir.iterdir()) == []


@needs_root
@pytest.mark.parametrize("name", ["runs.jsonl", "runs.lock"])
def test_file_owned_by_another_user_is_refused(store_dir: pathlib.Path, name: str) -> None:
    """A journal or lock file owned by another user raises UnsafeStoreError."""
    with Store(store_dir) as s:
        _use(s)
    target = store_dir / name
    before = target.read_bytes()
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(UnsafeStoreError) as info:
        Store(store_dir)
    assert info.value.path == str(target)
    assert target.read_bytes() == before and target.stat().st_uid == NOBODY


def test_state_path_that_is_a_file_is_refused(tmp_path: pathlib.Path) -> None:
    """A state_dir that names a regular file raises UnsafeStoreError; the file is untouched."""
    path = tmp_path / "not-a-dir"
    path.write_bytes(b"x")
    with pytest.raises(UnsafeStoreError):
        Store(path)
    assert path.read_bytes() == b"x"


@pytest.mark.parametrize("name", ["runs.jsonl", "runs.lock"])
def test_directory_in_place_of_a_file_is_refused(store_dir: pathlib.Path, name: str) -> None:
    """A directory where the journal or lock file belongs raises UnsafeStoreError."""
    store_dir.mkdir(mode=0o700)
    (store_dir / name).mkdir()
    with pytest.raises(UnsafeStoreError):
        Store(store_dir)


@pytest.mark.timeout(20)
def test_fifo_in_place_of_the_journal_is_refused(store_dir: pathlib.Path) -> None:
    """A FIFO planted as runs.jsonl is refused (not a regular file), without hanging."""
    store_dir.mkdir(mode=0o700)
    os.mkfifo(store_dir / "runs.jsonl", 0o600)
    with pytest.raises(UnsafeStoreError, match="regular file"):
        Store(store_dir)


# -- symlinks -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["runs.jsonl", "runs.lock"])
def test_symlink_planted_in_a_new_store_is_refused(
    store_dir: pathlib.Path, victim: pathlib.Path, name: str
) -> None:
    """A symlink at runs.jsonl or runs.lock raises UnsafeStoreError; the victim is untouched."""
    store_dir.mkdir(mode=0o700)
    (store_dir / name).symlink_to(victim)
    with pytest.raises(UnsafeStoreError) as info:
        Store(store_dir)
    assert "symbolic link" in str(info.value)
    assert (store_dir / name).is_symlink()


@pytest.mark.parametrize("name", ["runs.jsonl", "runs.lock"])
def test_symlink_replacing_a_file_of_an_existing_store_is_refused(
    store_dir: pathlib.Path, victim: pathlib.Path, name: str
) -> None:
    """Swapping a file of a closed store for a symlink is refused on the next open."""
    with Store(store_dir) as s:
        _use(s)
    (store_dir / name).unlink()
    (store_dir / name).symlink_to(victim)
    with pytest.raises(UnsafeStoreError):
        Store(store_dir)


@pytest.mark.parametrize("name", ["runs.jsonl", "runs.lock"])
def test_dangling_symlink_is_refused_and_its_target_not_created(
    store_dir: pathlib.Path, tmp_path: pathlib.Path, name: str
) -> None:
    """A symlink to a missing file is refused; runstore does not create the target."""
    target = tmp_path / "would-be-created"
    store_dir.mkdir(mode=0o700)
    (store_dir / name).symlink_to(target)
    with pytest.raises(UnsafeStoreError):
        Store(store_dir)
    assert not target.exists()


def test_symlink_swapped_in_while_the_store_is_open_is_refused(
    store_dir: pathlib.Path, victim: pathlib.Path
) -> None:
    """The journal replaced by a symlink under an open store: the next call refuses it."""
    s = Store(store_dir)
    try:
        _use(s)
        (store_dir / "runs.jsonl").unlink()
        (store_dir / "runs.jsonl").symlink_to(victim)
        with pytest.raises(UnsafeStoreError):
            s.create(Run("m2", "/t", "h"))
    finally:
        with contextlib.suppress(UnsafeStoreError):  # close() cannot mark the journal either
            s.close()


def test_symlink_named_like_a_temp_file_is_left_alone(
    store_dir: pathlib.Path, victim: pathlib.Path
) -> None:
    """Stale-temp cleanup and compaction neither follow nor remove a planted temp symlink."""
    store_dir.mkdir(mode=0o700)
    planted = store_dir / ".runs.jsonl.0123456789abcdef.tmp"
    planted.symlink_to(victim)
    with Store(store_dir) as s:
        _use(s)
        s.compact()
        _use(s, "m2")
        assert len(s.list()) == 2
    assert planted.is_symlink()
