"""The state directory and the files in it: their names, and how runstore opens them so
that it only ever uses its own files. The directory must be the user's own and writable by
nobody else; every file in it is opened ``O_NOFOLLOW|O_CLOEXEC`` relative to a descriptor of
the directory, so a swapped path component cannot redirect an open, and must be a regular
file of the user's (``check_regular``)."""

from __future__ import annotations

import errno
import os
import stat
import warnings

from .errors import UnsafeStoreError

DATA_NAME = "runs.jsonl"
LOCK_NAME = "runs.lock"
TMP_PREFIX = ".runs.jsonl."
TMP_SUFFIX = ".tmp"
#: the temp file of a compaction beside the lock (flocked while written; see Store)
COMPACTING_NAME = f"{TMP_PREFIX}compacting{TMP_SUFFIX}"
_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC
#: open() failures that are I/O or resource errors (StoreIOError), not an unsafe file
_IO_ERRNOS = frozenset({errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE,
                        errno.ENOMEM, errno.EROFS})
_NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
     "lustre", "gpfs", "fuse.sshfs", "fuse.s3fs", "fuse.glusterfs", "virtiofs"}
)
#: open() failures that mean "not for writing": the file may still be opened to read it
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def _unsafe(path: str, exc: OSError, what: str) -> UnsafeStoreError:
    if exc.errno == errno.ELOOP:
        return UnsafeStoreError(
            path, f"{what} is a symbolic link", "runstore never follows symlinks there; "
            "remove the link (an attacker may have planted it) and retry")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UnsafeStoreError(path, f"permission denied opening the {what}",
                                "fix its owner/mode (files 0600, directory 0700) and retry")
    if exc.errno == errno.EISDIR:
        return UnsafeStoreError(path, f"the {what} is a directory",
                                "move it away; runstore keeps a regular file there")
    if exc.errno == errno.ENOTDIR:
        return UnsafeStoreError(path, "not a directory",
                                "give a state directory path, not a file")
    return UnsafeStoreError(path, f"cannot open the {what} ({exc.strerror})",
                            "check the path and its permissions")



def open_state_dir(state_dir: str, *, create: bool = True) -> int:
    """Create the state directory (0700) when missing and return a descriptor of it after
    checking it belongs to us and is not writable by group or others."""
    if not create and not os.path.isdir(state_dir):
        raise FileNotFoundError(errno.ENOENT, "no runstore state directory", state_dir)
    try:
        if create:  # a reader makes no directory (nor tries to, on a read-only mount)
            os.mkdir(state_dir, 0o700)
            os.chmod(state_dir, 0o700)  # the umask may have cleared bits we asked for
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(state_dir, 0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)
    except OSError as exc:
        raise _unsafe(state_dir, exc, "state directory") from None
    try:
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _unsafe(state_dir, exc, "state directory") from None
    st = os.fstat(fd)
    problem = ""
    if st.st_uid != os.geteuid():
        problem = f"the state directory is owned by uid {st.st_uid}, not by you ({os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = (f"the state directory is writable by group or others "
                   f"(mode {stat.S_IMODE(st.st_mode):o})")
    if problem:
        os.close(fd)
        raise UnsafeStoreError(state_dir, problem,
                               "use a directory of your own with mode 0700 (chmod 700 DIR)")
    _warn_if_network_fs(state_dir)
    return fd


def _warn_if_network_fs(state_dir: str) -> None:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return
    real = os.path.realpath(state_dir)
    best, fstype = "", ""
    for parts in mounts:
        if "-" not in parts:
            continue
        point = parts[4].replace("\\040", " ")
        kind = parts[parts.index("-") + 1]
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, kind
    if fstype in _NETWORK_FS:
        warnings.warn(
            f"runstore: {state_dir} is on a network filesystem ({fstype}); flock is unreliable "
            "there and two hosts may both claim a machine. Use a local disk, or PostgreSQL "
            "for several hosts.", RuntimeWarning, stacklevel=4)



def check_regular(fd: int, path: str, what: str, fix_mode: bool = True) -> None:
    """Check that the file open as ``fd`` is a regular file of this user's, else close
    it and raise ``UnsafeStoreError``; with ``fix_mode``, make its mode 0600."""
    st = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(st.st_mode):
        problem = f"the {what} is not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"the {what} is owned by uid {st.st_uid}, not by you"
    if problem:
        os.close(fd)
        raise UnsafeStoreError(path, problem, "move it away and retry")
    if fix_mode and stat.S_IMODE(st.st_mode) != 0o600:
        os.fchmod(fd, 0o600)
