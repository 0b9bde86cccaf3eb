"""``fsio.sync_data`` / ``fsio.sync_file``: durable syncs where ``os.fdatasync`` does not exist
(macOS), emulated here by hiding ``os.fdatasync`` and giving ``fcntl`` a fake ``F_FULLFSYNC``."""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
from collections.abc import Callable

import pytest

from runstore import Store, StoreIOError, _fsio as fsio

#: the fake F_FULLFSYNC command number (the real one only exists on macOS)
FAKE_FULLFSYNC = 0x7F51


def _target(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


class FakeFullFsync:
    """Stands in for ``fcntl.fcntl``: records the files F_FULLFSYNC was asked for on, and
    fails with ``err`` when given one; every other command goes to the real ``fcntl``."""

    def __init__(self, err: int | None = None) -> None:
        self.synced: list[str] = []
        self.err = err
        self._real = fcntl.fcntl

    def __call__(self, fd: int, command: int, *args: object) -> object:
        if command != FAKE_FULLFSYNC:
            return self._real(fd, command, *args)  # type: ignore[arg-type]
        self.synced.append(_target(fd))
        if self.err is not None:
            raise OSError(self.err, os.strerror(self.err))
        return 0


@pytest.fixture
def no_fdatasync(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeFullFsync]:
    """A platform without ``os.fdatasync`` whose ``fcntl`` has ``F_FULLFSYNC`` (macOS);
    returns a factory installing the fake ``fcntl`` (optionally failing with an errno)."""
    if hasattr(os, "fdatasync"):
        monkeypatch.delattr(os, "fdatasync")
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", FAKE_FULLFSYNC, raising=False)

    def install(err: int | None = None) -> FakeFullFsync:
        fake = FakeFullFsync(err)
        monkeypatch.setattr(fcntl, "fcntl", fake)
        return fake

    return install


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(_target(fd))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def _durable_writes(state: pathlib.Path) -> None:
    with Store(state, durable=True) as s:
        run, _ = s.prepare_atomic("m1", "h1", lambda: _run("m1", "h1"))
        s.start(run.id)


def _run(machine: str, digest: str) -> object:
    from runstore import Run

    return Run(machine, f"/tests/{digest}", digest)


def test_a_durable_write_syncs_through_fullfsync_without_fdatasync(
        tmp_path: pathlib.Path, no_fdatasync: Callable[..., FakeFullFsync]) -> None:
    """Without os.fdatasync every durable append asks for F_FULLFSYNC on the journal."""
    fake = no_fdatasync()
    _durable_writes(tmp_path / "s")
    assert fake.synced.count("runs.jsonl") >= 2, fake.synced
    with Store(tmp_path / "s") as s:
        assert len(s.list()) == 1


def test_without_fdatasync_a_durable_write_fails_if_sync_data_calls_it(
        tmp_path: pathlib.Path, no_fdatasync: Callable[..., FakeFullFsync],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: the sync as it was before (``os.fdatasync`` called directly) fails
    every durable write on such a platform, which the test above would then catch."""
    no_fdatasync()
    monkeypatch.setattr(fsio, "sync_data", lambda fd: os.fdatasync(fd))  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="fdatasync"):
        _durable_writes(tmp_path / "s")


def test_a_sync_data_that_skips_the_sync_is_seen(
        tmp_path: pathlib.Path, no_fdatasync: Callable[..., FakeFullFsync],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: a ``sync_data`` that syncs nothing leaves no F_FULLFSYNC of the
    journal behind, so the first test's assertion does fail."""
    fake = no_fdatasync()
    monkeypatch.setattr(fsio, "sync_data", lambda fd: None)
    _durable_writes(tmp_path / "s")
    assert "runs.jsonl" not in fake.synced


def test_not_durable_asks_for_no_fullfsync_per_write(
        tmp_path: pathlib.Path, no_fdatasync: Callable[..., FakeFullFsync]) -> None:
    """durable=False: appends are not synced, with or without fdatasync."""
    fake = no_fdatasync()
    with Store(tmp_path / "s", durable=False) as s:
        before = len(fake.synced)
        for i in range(5):
            s.prepare_atomic(f"m{i}", "h", lambda i=i: _run(f"m{i}", "h"))
        assert fake.synced[before:] == []


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOTSUP, errno.ENOTTY])
def test_fullfsync_refused_falls_back_to_fsync(
        tmp_path: pathlib.Path, no_fdatasync: Callable[..., FakeFullFsync],
        monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """A file system refusing F_FULLFSYNC (EINVAL/ENOTSUP/ENOTTY) gets a plain fsync."""
    fake = no_fdatasync(err)
    fsyncs = _record_fsyncs(monkeypatch)
    _durable_writes(tmp_path / "s")
    assert "runs.jsonl" in fake.synced
    assert fsyncs.count("runs.jsonl") >= fake.synced.count("runs.jsonl")


def test_fullfsync_failing_with_eio_fails_the_write(
        tmp_path: pathlib.Path, no_fdatasync: Callable[..., FakeFullFsync]) -> None:
    """Any other error of F_FULLFSYNC (EIO) is a failed sync, reported as such."""
    fake = no_fdatasync()
    with Store(tmp_path / "s", durable=True) as s:
        fake.err = errno.EIO
        with pytest.raises(StoreIOError, match=r"runs\.jsonl"):
            s.prepare_atomic("m1", "h1", lambda: _run("m1", "h1"))
        fake.err = None  # let close() sync
        assert s.list() == []


def test_sync_data_uses_fdatasync_where_it_exists(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: pathlib.Path) -> None:
    """Linux: fdatasync, never F_FULLFSYNC, even when fcntl has one."""
    called: list[int] = []
    monkeypatch.setattr(os, "fdatasync", called.append)
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", FAKE_FULLFSYNC, raising=False)
    fake = FakeFullFsync()
    monkeypatch.setattr(fcntl, "fcntl", fake)
    with open(tmp_path / "f", "wb") as f:
        fsio.sync_data(f.fileno())
        assert called == [f.fileno()] and fake.synced == []


def test_without_fdatasync_or_fullfsync_sync_data_fsyncs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """Neither exists (another Unix): ``os.fsync``."""
    if hasattr(os, "fdatasync"):
        monkeypatch.delattr(os, "fdatasync")
    monkeypatch.delattr(fcntl, "F_FULLFSYNC", raising=False)
    fsyncs = _record_fsyncs(monkeypatch)
    with open(tmp_path / "f", "wb") as f:
        fsio.sync_data(f.fileno())
        fsio.sync_file(f.fileno())
    assert fsyncs == ["f", "f"]


def test_sync_file_uses_fullfsync_where_it_exists(
        tmp_path: pathlib.Path, no_fdatasync: Callable[..., FakeFullFsync],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-file syncs (compaction's temp file, the directory) use F_FULLFSYNC too."""
    fake = no_fdatasync()
    fsyncs = _record_fsyncs(monkeypatch)
    with Store(tmp_path / "s", durable=True) as s:
        s.prepare_atomic("m1", "h1", lambda: _run("m1", "h1"))
        s.compact()
    assert "s" in fake.synced  # the directory, after the rename
    assert fsyncs == []
