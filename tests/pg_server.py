"""A throwaway PostgreSQL server (tests, benchmarks): ``with throwaway_postgres() as dsn``.

``initdb`` into a fresh temporary directory, then ``postgres`` as a child process listening only
on a unix socket inside that directory (no TCP port to collide with). PostgreSQL refuses to run
as root, so when we are root both run as the unprivileged user ``nobody`` and the directory is
handed to it. ``fsync`` stays on: durable numbers must pay for real syncs. The server is
stopped (fast shutdown, then SIGKILL of that one pid if it hangs) and the directory removed on
every exit from the ``with`` block, including exceptions and KeyboardInterrupt.

No Python driver is needed here; readiness is polled with ``pg_isready``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: where Debian/Ubuntu install the server binaries; the highest version wins unless
#: RUNSTORE_PG_BIN names a directory
_PG_ROOT = Path("/usr/lib/postgresql")
_NOBODY_UID = 65534
_PORT = 5432  # only names the socket file (.s.PGSQL.5432) in our private directory
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
#: DSN -> what restarts its server: (argv, user, root, log path, [the running Popen])
_RUNNING: dict[str, tuple[list[str], int | None, Path, Path, list[subprocess.Popen[bytes]]]] = {}


def postgres_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None when not installed."""
    env = os.environ.get("RUNSTORE_PG_BIN")
    candidates = [Path(env)] if env else sorted(
        (p / "bin" for p in _PG_ROOT.glob("*") if p.name.isdigit()),
        key=lambda p: int(p.parent.name), reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    return None


def available() -> bool:
    """True when a server can be started here (binaries installed)."""
    return postgres_bin_dir() is not None


def _server_user() -> int | None:
    """The uid (and gid) to run the server as: ``nobody`` when we are root, else ourselves."""
    return _NOBODY_UID if os.geteuid() == 0 else None


def _give_away(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, _NOBODY_UID, _NOBODY_UID)


def dsn_for(socket_dir: str | os.PathLike[str], dbname: str = "postgres") -> str:
    """A libpq connection string for the server whose socket lives in ``socket_dir``."""
    return f"host={os.fspath(socket_dir)} port={_PORT} user=postgres dbname={dbname}"


@contextlib.contextmanager
def throwaway_postgres(
    settings: dict[str, str] | None = None, *, base_dir: str | None = None
) -> Iterator[str]:
    """Start a private server, yield its DSN (database ``postgres``, user ``postgres``, trust
    auth over the unix socket), and always stop it and delete its files afterwards.

    ``settings`` are extra ``-c name=value`` server settings. Raises ``RuntimeError`` when the
    binaries are missing or the server does not come up (its log is in the message).
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql "
                           "(install postgresql-15 or set RUNSTORE_PG_BIN)")
    root = Path(tempfile.mkdtemp(prefix="runstore-pg-", dir=base_dir))
    owner = os.getpid()
    server: subprocess.Popen[bytes] | None = None
    log_path = root / "server.log"
    dsn = dsn_for(root)
    holder: list[subprocess.Popen[bytes]] = []
    try:
        root.chmod(0o700)
        _give_away(root)
        data = root / "data"
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync"]  # a throwaway cluster: no sync
        uid = _server_user()
        groups: list[int] | None = None if uid is None else []  # drop root's groups too
        done = subprocess.run(initdb, cwd=root, capture_output=True, check=False, user=uid,
                              group=uid, extra_groups=groups)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n"
                               f"{done.stderr.decode(errors='replace')}")
        conf = {
            "listen_addresses": "",  # no TCP: argv is not parsed by a shell, so no quotes
            "unix_socket_directories": str(root),
            "port": str(_PORT),
            "fsync": "on",
            "max_connections": "100",
            **(settings or {}),
        }
        argv = [str(bin_dir / "postgres"), "-D", str(data)]
        for name, value in conf.items():
            argv += ["-c", f"{name}={value}"]
        server = _launch(argv, uid, root, log_path)
        holder.append(server)
        _wait_ready(bin_dir, root, server, log_path)
        _RUNNING[dsn] = (argv, uid, root, log_path, holder)
        yield dsn
    finally:
        if os.getpid() == owner:  # a forked child leaving the block must not stop it
            _RUNNING.pop(dsn, None)
            for running in holder:
                _stop(running)
            shutil.rmtree(root, ignore_errors=True)


def _launch(argv: list[str], uid: int | None, root: Path,
            log_path: Path) -> subprocess.Popen[bytes]:
    groups: list[int] | None = None if uid is None else []
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, user=uid, group=uid,
                                extra_groups=groups)


def crash_and_restart(dsn: str) -> None:
    """Stop the server of ``dsn`` (a ``throwaway_postgres`` one) the way ``pg_ctl stop -m
    immediate`` does, SIGQUIT to the postmaster (no checkpoint: recovery replays the WAL on
    the next start), wait for it to exit, and start it again on the same data."""
    argv, uid, root, log_path, holder = _RUNNING[dsn]
    server = holder[-1]
    server.send_signal(signal.SIGQUIT)
    server.wait(_STOP_TIMEOUT)
    bin_dir = Path(argv[0]).parent
    restarted = _launch(argv, uid, root, log_path)
    holder.append(restarted)
    _wait_ready(bin_dir, root, restarted, log_path)


def _wait_ready(bin_dir: Path, root: Path, server: subprocess.Popen[bytes],
                log_path: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.returncode}:\n{_tail(log_path)}")
        ready = subprocess.run(
            [str(bin_dir / "pg_isready"), "-q", "-h", str(root), "-p", str(_PORT), "-t", "1"],
            check=False, capture_output=True)
        if ready.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"postgres did not accept connections within {_START_TIMEOUT:.0f} s:\n"
                       f"{_tail(log_path)}")


def _stop(server: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT) of the postmaster we started; SIGKILL if it hangs."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGINT)
    try:
        server.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


if __name__ == "__main__":  # a quick manual check: start, print the DSN, stop
    with throwaway_postgres() as dsn:
        print(dsn)
