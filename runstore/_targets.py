"""Refuse an output that would overwrite the store it comes from.

Every command that writes a file given by the caller (``Store.export(path)``,
``Store.prune(archive=...)``, ``runstore export FILE``, ``runstore prune --archive FILE``,
``runstore migrate --to DIR``) asks ``check_output`` first, before the target is opened or
created. The target is refused (``OutputTargetError``) when it is, by identity (device and
inode, so through a symlink or a hard link as well as by name):

- one of the files in the store's state directory (the journal, the lock file, a temp file),
- the state directory itself (for ``migrate``: the same store as the source), or
- a new name inside the state directory or below it: its parent directory, as named and with
  symlinks resolved, or one of their ancestors, is the state directory.

``check_output_fd`` does the same for a file the caller already opened (``Store.export(fp)``,
``runstore export`` to a redirected stdout): only its identity can be compared then. A name
holding a NUL character is refused too (no file can have it). What kind of file is at the
path (a symlink, a FIFO, a directory) is ``_outputs``' concern.

The cost is paid by these commands alone, never by the write path: one ``stat`` of the state
directory and of each of its entries (a handful), one of the target, and one per ancestor of
its parent directory.
"""

from __future__ import annotations

import os

from .errors import OutputTargetError

_Id = tuple[int, int]  # (st_dev, st_ino)


def _ident(st: os.stat_result) -> _Id:
    return (st.st_dev, st.st_ino)


def _store_files(state_dir: str, dir_fd: int | None) -> tuple[_Id, dict[_Id, str]] | None:
    """The identity of the state directory and of each of its entries (-> its name); None
    when there is no such directory (then there is no store there to overwrite)."""
    try:
        if dir_fd is not None and dir_fd >= 0:
            # a fresh descriptor: listing through ``dir_fd`` itself would share its
            # directory offset with a listing in another thread (stale temp cleanup)
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        else:
            fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        directory = _ident(os.fstat(fd))
        files: dict[_Id, str] = {}
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    files[_ident(entry.stat(follow_symlinks=False))] = entry.name
                except FileNotFoundError:  # removed meanwhile (a temp file)
                    continue
    finally:
        os.close(fd)
    return directory, files


def _refusal(target: str | int, state_dir: str, dir_fd: int | None) -> str:
    """Why writing ``target`` (a path, or an open descriptor) would overwrite the store in
    ``state_dir``; "" when it would not."""
    store = _store_files(state_dir, dir_fd)
    if store is None:
        return ""
    directory, files = store
    try:
        st: os.stat_result | None = os.fstat(target) if isinstance(target, int) else (
            os.stat(target))
    except OSError:  # missing (it is to be created), a dangling symlink, not searchable
        st = None
    if st is not None:
        if _ident(st) == directory:
            return "it is the store's state directory itself (the same device and inode)"
        name = files.get(_ident(st))
        if name is not None:
            return f"it is the store's own file {name} (the same device and inode)"
    if isinstance(target, int):
        return ""
    # where it would be created: its parent as named and with symlinks resolved (a dangling
    # symlink into the state directory included), and every directory above them
    seen: set[str] = set()
    for path in (os.path.abspath(target), os.path.realpath(target)):
        parent = os.path.dirname(path)
        while parent not in seen:
            seen.add(parent)
            try:
                if _ident(os.stat(parent)) == directory:
                    return "it lies inside the store's state directory"
            except OSError:
                pass  # a directory still to be created
            parent = os.path.dirname(parent)
    return ""


def check_output(target: str | os.PathLike[str], state_dir: str, *, dir_fd: int | None = None,
                 name: str = "", remedy: str = "") -> None:
    """Raise ``OutputTargetError`` when writing the file or directory ``target`` could
    overwrite the store in ``state_dir`` (judged against ``dir_fd``, the descriptor the
    store has open, when given), or when its name holds a NUL character; ``name`` is how
    messages call the target (default: its path) and ``remedy`` what to do instead."""
    path = os.fspath(target)
    if "\x00" in path:  # ``stat`` would raise ValueError: no file has such a name
        raise OutputTargetError(name or path, "", "it holds a NUL character, which no file "
                                "name can hold", "name it without one")
    problem = _refusal(path, state_dir, dir_fd)
    if problem:
        raise OutputTargetError(name or path, state_dir, problem, remedy)


def check_output_fd(fd: int, state_dir: str, *, name: str, dir_fd: int | None = None,
                    remedy: str = "") -> None:
    """``check_output`` for a file already open as ``fd`` (only its identity is known)."""
    problem = _refusal(fd, state_dir, dir_fd)
    if problem:
        raise OutputTargetError(name, state_dir, problem, remedy)
