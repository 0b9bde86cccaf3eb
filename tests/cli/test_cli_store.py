"""The CLI on any store: ``--store URL`` / ``RUNSTORE_URL`` with paths, file:// and
postgresql:// URLs, passwords never printed, file-only commands refused on PostgreSQL, and
``migrate`` (file -> file, file -> PostgreSQL): verified by count and checksum, idempotent,
and all or nothing on a conflict."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from demo_runs import four_runs

from runstore import Run, RunStore, Store, _fields, _opener as opener, cli, migrate
from runstore.migrate import MigrationConflictError, MigrationVerifyError

Cli = Callable[..., tuple[int, str, str]]
#: every test runs without RUNSTORE_DIR, RUNSTORE_URL or NO_COLOR from the environment
pytestmark = pytest.mark.usefixtures("clean_cli_env")


# -- fixtures and helpers --------------------------------------------------------------------

def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _fill(store: RunStore) -> dict[str, str]:
    """Four runs: completed (m1, batch b1), failed (m1), running (m2), pending (m3)."""
    return four_runs(store, ("hash-done", "hash-failed", "hash-running", "hash-pending"))


@pytest.fixture
def source(tmp_path: pathlib.Path) -> dict[str, str]:
    """A closed file store with the four runs of ``_fill``; its ids and ``dir``."""
    where = tmp_path / "source"
    with Store(where, durable=False) as store:
        ids = _fill(store)
    return {"dir": str(where), **ids}


def _records(location: str) -> dict[str, dict[str, Any]]:
    """Every run of the store at ``location`` as its JSON record, by id."""
    with contextlib.closing(opener.open_store(location)) as store:
        buf = io.BytesIO()
        store.export(buf)
    return {r["id"]: r for r in json.loads(buf.getvalue())}


def _file_url(path: str) -> str:
    return "file://" + urllib.parse.quote(path)


# -- choosing the store ----------------------------------------------------------------------

def test_store_option_takes_a_path(run_cli: Cli, source: dict[str, str]) -> None:
    """--store DIR is the file store in DIR; stats says it came from --store."""
    code, out, _ = run_cli("--store", source["dir"], "stats", "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["store"], data["state_dir"], data["source"], data["backend"]) == (
        source["dir"], source["dir"], "--store", "file")
    assert data["runs"] == 4


def test_store_option_takes_a_file_url(run_cli: Cli, source: dict[str, str]) -> None:
    """--store file:///dir (and file://localhost/dir) is the file store in dir."""
    for url in (_file_url(source["dir"]), "file://localhost" + source["dir"]):
        code, out, _ = run_cli("--store", url, "list", "--json")
        assert code == 0, url
        assert {r["id"] for r in json.loads(out)} == {source[k] for k in
                                                      ("done", "failed", "running", "pending")}


def test_file_url_with_spaces_is_unquoted(run_cli: Cli, tmp_path: pathlib.Path) -> None:
    """A percent-encoded file URL names the decoded directory."""
    where = tmp_path / "with space"
    code, _, _ = run_cli("--store", _file_url(str(where)), "reap", "--stale-after", "1h")
    assert code == 0
    assert (where / "runs.jsonl").exists()


def test_file_url_of_another_host_is_refused(run_cli: Cli, tmp_path: pathlib.Path) -> None:
    """file://otherhost/dir is a usage error: a file store lives on this host."""
    code, out, err = run_cli("--store", "file://build7/var/runs", "list")
    assert (code, out) == (2, "")
    assert "names host 'build7'" in _one_line(err)


def test_environment_url_names_the_store(
        run_cli: Cli, source: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """RUNSTORE_URL alone names the store, and stats says so."""
    monkeypatch.setenv("RUNSTORE_URL", _file_url(source["dir"]))
    code, out, _ = run_cli("stats")
    assert code == 0
    assert f"store       {source['dir']} (from RUNSTORE_URL)" in out


def test_url_variable_wins_over_dir_variable(
        run_cli: Cli, source: dict[str, str], tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With both variables set, RUNSTORE_URL is the store."""
    monkeypatch.setenv("RUNSTORE_URL", source["dir"])
    monkeypatch.setenv("RUNSTORE_DIR", str(tmp_path / "elsewhere"))
    code, out, _ = run_cli("stats", "--json")
    assert code == 0
    assert json.loads(out)["source"] == "RUNSTORE_URL"


@pytest.mark.parametrize("flag", ["--store", "--state-dir"])
def test_explicit_flag_wins_over_both_variables(
        run_cli: Cli, source: dict[str, str], tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    """--store or --state-dir on the command line beats RUNSTORE_URL and RUNSTORE_DIR."""
    monkeypatch.setenv("RUNSTORE_URL", str(tmp_path / "url-elsewhere"))
    monkeypatch.setenv("RUNSTORE_DIR", str(tmp_path / "dir-elsewhere"))
    code, out, _ = run_cli(flag, source["dir"], "stats", "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["state_dir"], data["source"]) == (source["dir"], flag)


def test_store_and_state_dir_together_is_a_usage_error(
        run_cli: Cli, source: dict[str, str]) -> None:
    """--store and --state-dir together exit 2 with one line, whatever the command."""
    for argv in (["list"], ["migrate", "--from", source["dir"], "--to", source["dir"] + "2"]):
        code, out, err = run_cli("--store", source["dir"], "--state-dir", source["dir"], *argv)
        assert (code, out) == (2, "")
        assert "--store and --state-dir both name the store" in _one_line(err)
    assert not os.path.exists(source["dir"] + "2")


@pytest.mark.parametrize("url", ["ftp://u:hunter2@host/x", "sqlite:///tmp/x.db", "s3://b/k"])
def test_unknown_scheme_is_a_usage_error(run_cli: Cli, url: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An unsupported URL scheme exits 2 naming it and the accepted forms, from the option
    or from RUNSTORE_URL, and never echoes a password."""
    scheme = url.split(":", 1)[0]
    code, out, err = run_cli("--store", url, "list")
    assert (code, out) == (2, "")
    line = _one_line(err)
    assert "--store: unsupported store URL" in line and f"scheme '{scheme}'" in line
    assert "postgresql://" in line and "file:///" in line and "hunter2" not in line
    monkeypatch.setenv("RUNSTORE_URL", url)
    code, _, err = run_cli("list")
    assert code == 2 and "RUNSTORE_URL: unsupported store URL" in _one_line(err)


def test_reading_command_on_a_missing_store_url(run_cli: Cli, tmp_path: pathlib.Path) -> None:
    """list --store file:///missing exits 3, mentions --store, and creates nothing."""
    missing = tmp_path / "missing"
    code, out, err = run_cli("--store", _file_url(str(missing)), "list")
    assert (code, out) == (3, "")
    line = _one_line(err)
    assert f"no store at {missing}" in line and "--store URL" in line
    assert not missing.exists()


def test_a_bad_variable_does_not_break_migrate(
        run_cli: Cli, source: dict[str, str], tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate names both of its stores, so a bad RUNSTORE_URL is not even read."""
    monkeypatch.setenv("RUNSTORE_URL", "ftp://nowhere/x")
    code, _, err = run_cli("migrate", "--from", source["dir"], "--to", str(tmp_path / "t"))
    assert code == 0, err


@pytest.mark.parametrize(("location", "shown"), [
    ("postgresql://app:s3cret@db.example/runs", "postgresql://app:***@db.example/runs"),
    ("postgres://app:s3cret@db.example:5433/runs?sslmode=require",
     "postgres://app:***@db.example:5433/runs?sslmode=require"),
    ("postgresql://app@/runs?host=/tmp/s&password=s3cret&port=5432",
     "postgresql://app@/runs?host=/tmp/s&password=***&port=5432"),
    ("host=db user=app password=s3cret dbname=runs", "host=db user=app password=*** dbname=runs"),
    ("host=db password='s3 cret' dbname=runs", "host=db password=*** dbname=runs"),
    ("postgresql://app@db.example/runs", "postgresql://app@db.example/runs"),
    ("/var/lib/runs", "/var/lib/runs"),
])
def test_redact_hides_passwords(location: str, shown: str) -> None:
    """A URL's or DSN's password is replaced by *** and nothing else changes."""
    assert cli.redact(location) == shown
    for secret in cli.passwords_in(location):
        assert secret not in cli.redact(location)


def test_scrub_removes_known_passwords_from_messages() -> None:
    """Any message the CLI prints has the command line's passwords replaced."""
    secrets = cli.passwords_in("postgresql://app:p%40ss@db/runs")
    assert "p@ss" in secrets
    assert cli.scrub("login p@ss failed (p%40ss)", secrets) == "login *** failed (***)"


def test_driver_errors_are_one_line_exit_1(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """An error raised by the PostgreSQL driver is reported in one line, password scrubbed,
    exit 1, not a traceback (the driver is stood in for by a class from a psycopg module)."""
    fake_error = type("OperationalError", (Exception,), {"__module__": "psycopg.errors"})

    def fail(location: str, **options: Any) -> RunStore:
        raise fake_error("connection to server failed: password 'hunter2' refused")

    monkeypatch.setattr(opener, "open_store", fail)
    code = cli.main(["--store", "postgresql://app:hunter2@db/runs", "reap", "--stale-after",
                     "1h"], prog="runstore")
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    line = _one_line(err)
    assert line.startswith("runstore: error: PostgreSQL: connection to server failed")
    assert "hunter2" not in line and "check the store URL" in line


# -- migrate: file -> file -------------------------------------------------------------------

def test_migrate_copies_every_run_and_verifies(
        run_cli: Cli, source: dict[str, str], tmp_path: pathlib.Path) -> None:
    """migrate into a new directory copies all four runs field by field and prints the
    verified count and checksum."""
    target = str(tmp_path / "target")
    code, out, err = run_cli("migrate", "--from", source["dir"], "--to", target)
    assert (code, err) == (0, "")
    assert _records(target) == _records(source["dir"])
    with Store(source["dir"]) as store:
        expected = migrate.checksum(store.list())
    assert f"migrated {source['dir']} -> {target}" in out
    assert "copied         4" in out and f"sha256:{expected}" in out
    assert "verified: 4 of 4 runs in the target" in out


def test_migrate_json_report(run_cli: Cli, source: dict[str, str],
                             tmp_path: pathlib.Path) -> None:
    """migrate --json prints one object: counts, both checksums (equal), ok."""
    target = _file_url(str(tmp_path / "target"))
    code, out, _ = run_cli("migrate", "--from", source["dir"], "--to", target, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["source_changed"] is False
    assert (report["source_runs"], report["copied"], report["skipped"],
            report["target_runs"], report["verified"]) == (4, 4, 0, 4, 4)
    assert report["checksum"] == report["target_checksum"]
    assert report["checksum"].startswith("sha256:") and len(report["checksum"]) == 7 + 64
    assert report["target"] == str(tmp_path / "target")


def test_migrate_twice_copies_nothing_the_second_time(
        run_cli: Cli, source: dict[str, str], tmp_path: pathlib.Path) -> None:
    """A second migrate skips every run, writes nothing, and still verifies."""
    target = tmp_path / "target"
    code, out, _ = run_cli("migrate", "--from", source["dir"], "--to", str(target), "--json")
    assert code == 0
    first = json.loads(out)
    size = (target / "runs.jsonl").stat().st_size
    code, out, _ = run_cli("migrate", "--from", source["dir"], "--to", str(target), "--json")
    assert code == 0
    second = json.loads(out)
    assert (second["copied"], second["skipped"], second["verified"]) == (0, 4, 4)
    assert second["checksum"] == first["checksum"] == second["target_checksum"]
    assert (target / "runs.jsonl").stat().st_size == size  # not a byte written
    with Store(target) as store:
        assert store.last_seq() == 4


def test_migrate_copies_only_the_missing_runs(
        run_cli: Cli, source: dict[str, str], tmp_path: pathlib.Path) -> None:
    """Runs already in the target are skipped, the others copied; the target's own runs
    stay and only the source's runs are verified."""
    target = tmp_path / "target"
    records = _records(source["dir"])
    with Store(target) as store:
        store.import_runs([records[source["done"]]])
        own = store.create(Run("m9", "/tests/m9", "hash-own"))
    code, out, _ = run_cli("migrate", "--from", source["dir"], "--to", str(target), "--json")
    assert code == 0
    report = json.loads(out)
    assert (report["copied"], report["skipped"], report["verified"],
            report["target_runs"]) == (3, 1, 4, 5)
    after = _records(str(target))
    assert own.id in after
    assert {k: after[k] for k in records} == records


def test_migrate_keeps_fields_runstore_does_not_know(
        run_cli: Cli, tmp_path: pathlib.Path) -> None:
    """An unknown extra field of a source record reaches the target."""
    src = tmp_path / "source"
    with Store(src) as store:
        store.import_runs([{"id": "r-1", "machine": "m1", "test_dir": "/t",
                            "test_dir_hash": "h", "status": "completed", "exit_code": 0,
                            "x_ticket": "OPS-7"}])
    code, _, _ = run_cli("migrate", "--from", str(src), "--to", str(tmp_path / "t"))
    assert code == 0
    assert _records(str(tmp_path / "t"))["r-1"]["x_ticket"] == "OPS-7"


def test_migrate_refuses_a_conflicting_run_and_imports_nothing(
        run_cli: Cli, source: dict[str, str], tmp_path: pathlib.Path) -> None:
    """A target run with a source id but other content stops the migration (exit 1) with
    the run and the differing fields named; no other run is copied."""
    target = tmp_path / "target"
    changed = dict(_records(source["dir"])[source["failed"]], exit_code=3)
    with Store(target) as store:
        store.import_runs([changed])
    before = (target / "runs.jsonl").read_bytes()
    code, out, err = run_cli("migrate", "--from", source["dir"], "--to", str(target))
    assert (code, out) == (1, "")
    line = _one_line(err)
    assert f"run '{source['failed']}' is already in {target} with different content" in line
    assert "fields differ: exit_code" in line and "nothing was imported" in line
    assert (target / "runs.jsonl").read_bytes() == before
    assert list(_records(str(target))) == [source["failed"]]


def test_migrate_refuses_a_busy_machine_and_imports_nothing(
        run_cli: Cli, source: dict[str, str], tmp_path: pathlib.Path) -> None:
    """A target whose machine already has another active run refuses the source's active
    run of that machine (exit 1, named), and nothing is imported."""
    target = tmp_path / "target"
    with Store(target) as store:
        occupant = store.create(Run("m2", "/tests/m2", "other-hash"))
    code, _, err = run_cli("migrate", "--from", source["dir"], "--to", str(target))
    assert code == 1
    line = _one_line(err)
    assert source["running"] in line and "m2" in line and occupant.id in line
    assert list(_records(str(target))) == [occupant.id]


def test_migrate_needs_an_existing_source(run_cli: Cli, tmp_path: pathlib.Path) -> None:
    """A missing --from exits 3 and creates neither store."""
    code, _, err = run_cli("migrate", "--from", str(tmp_path / "nope"),
                           "--to", str(tmp_path / "t"))
    assert code == 3 and "no store at" in _one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_migrate_into_itself_is_a_usage_error(run_cli: Cli, source: dict[str, str]) -> None:
    """--from and --to naming the same store (even spelled differently) exit 2."""
    code, _, err = run_cli("migrate", "--from", source["dir"], "--to", _file_url(source["dir"]))
    assert code == 2 and "are the same store" in _one_line(err)


def test_migrate_needs_both_stores(run_cli: Cli, source: dict[str, str]) -> None:
    """--from and --to are required (exit 2)."""
    code, _, err = run_cli("migrate", "--from", source["dir"])
    assert code == 2 and "--to" in _one_line(err)


class _Tampering:
    """A target store that hands back one run with a changed field (a lossy backend)."""

    def __init__(self, inner: RunStore) -> None:
        self._inner = inner

    def list(self, **kwargs: Any) -> list[Run]:
        runs = self._inner.list(**kwargs)
        return [attrs.evolve(runs[0], test_dir="/elsewhere"), *runs[1:]] if runs else runs

    def _iter_export(self) -> Iterator[tuple[Run, dict[str, Any]]]:
        """The streaming read migrate verifies with, tampered like ``list``."""
        for n, (run, extra) in enumerate(self._inner._iter_export()):  # type: ignore[attr-defined]
            yield (attrs.evolve(run, test_dir="/elsewhere") if n == 0 else run), extra

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> _Tampering:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


def test_migrate_detects_an_unfaithful_copy(
        source: dict[str, str], tmp_path: pathlib.Path) -> None:
    """When the target does not give back what was imported, migrate raises
    MigrationVerifyError with both checksums."""
    with (Store(source["dir"]) as src, Store(tmp_path / "t") as dst,
          pytest.raises(MigrationVerifyError) as caught):
        lossy: Any = _Tampering(dst)  # a RunStore by duck typing
        migrate.migrate(src, lossy, target_name="the copy")
    err = caught.value
    assert (err.expected_count, err.found_count) == (4, 3)
    assert err.expected_checksum != err.found_checksum
    assert "verification failed: the copy holds 3 of the source's 4 runs" in str(err)


def test_cli_migrate_exits_5_on_a_failed_verification(
        run_cli: Cli, source: dict[str, str], tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reports a failed verification in one line and exits 5."""
    target = str(tmp_path / "t")
    real_open = opener.open_store

    def open_store(location: str, **options: Any) -> Any:
        store = real_open(location, **options)
        return _Tampering(store) if location == target else store

    monkeypatch.setattr(opener, "open_store", open_store)
    code, out, err = run_cli("migrate", "--from", source["dir"], "--to", target)
    assert (code, out) == (5, "")
    assert "verification failed" in _one_line(err) and "do not switch dispatchers" in err


def test_checksum_is_order_free_and_sees_every_field(source: dict[str, str]) -> None:
    """The checksum ignores the order of runs and changes with any field, revision too."""
    with Store(source["dir"]) as store:
        runs = store.list()
    base = migrate.checksum(runs)
    assert migrate.checksum(reversed(runs)) == base
    for change in ({"revision": runs[0].revision + 1}, {"owner_pid": 1}, {"error_msg": "x"}):
        assert migrate.checksum([attrs.evolve(runs[0], **change), *runs[1:]]) != base


def test_conflict_error_pickles() -> None:
    """MigrationConflictError survives pickling with its data (multiprocessing)."""
    import pickle

    err = pickle.loads(pickle.dumps(MigrationConflictError("r1", "db", ["exit_code"])))
    assert (err.run_id, err.target, err.fields) == ("r1", "db", ("exit_code",))


# -- PostgreSQL ------------------------------------------------------------------------------

@pytest.fixture
def pg_url(pg_dsn: str) -> Iterator[str]:
    """A postgresql:// URL of a fresh, empty database on the session's server (conftest's
    ``pg_dsn``: skipped without PostgreSQL, failed when RUNSTORE_REQUIRE_POSTGRES=1), so that
    the CLI works with the default table; dropped after the test."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(pg_dsn)
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"'.encode())
    query = urllib.parse.urlencode({"host": params["host"], "port": params["port"]})
    try:
        yield f"postgresql://{params['user']}@/{name}?{query}"
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def _with_password(url: str, password: str) -> str:
    """``url`` with a password in its user info (trust auth over the socket ignores it)."""
    scheme, rest = url.split("://", 1)
    user, after = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{after}"


@pytest.mark.postgres
def test_migrate_file_to_postgres_verifies_and_lists(
        run_cli: Cli, source: dict[str, str], pg_url: str) -> None:
    """migrate --to postgresql:// copies every run (count and checksum verified), and
    `list --store postgresql://` then shows the same runs as the file store."""
    code, out, err = run_cli("migrate", "--from", source["dir"], "--to", pg_url, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and (report["copied"], report["verified"]) == (4, 4)
    assert report["checksum"] == report["target_checksum"]
    code, out, _ = run_cli("--store", pg_url, "list", "--json")
    assert code == 0
    assert {r["id"]: r for r in json.loads(out)} == _records(source["dir"])
    code, out, _ = run_cli("--store", pg_url, "list")
    assert code == 0 and source["running"] in out and "running" in out


@pytest.mark.postgres
def test_migrate_to_postgres_twice_is_idempotent(
        run_cli: Cli, source: dict[str, str], pg_url: str) -> None:
    """The second migrate into PostgreSQL copies nothing, verifies, same checksum."""
    code, out, _ = run_cli("migrate", "--from", source["dir"], "--to", pg_url, "--json")
    assert code == 0
    first = json.loads(out)
    code, out, _ = run_cli("migrate", "--from", source["dir"], "--to", pg_url, "--json")
    assert code == 0
    second = json.loads(out)
    assert (second["copied"], second["skipped"], second["verified"]) == (0, 4, 4)
    assert second["checksum"] == first["checksum"] == second["target_checksum"]
    with contextlib.closing(opener.open_store(pg_url)) as store:
        assert store.stats().runs == 4


@pytest.mark.postgres
def test_migrate_to_postgres_refuses_a_conflict_and_imports_nothing(
        run_cli: Cli, source: dict[str, str], pg_url: str) -> None:
    """A PostgreSQL run with a source id but other content: exit 1, run named, nothing
    imported."""
    changed = dict(_records(source["dir"])[source["done"]], test_dir="/tests/moved")
    with contextlib.closing(opener.open_store(pg_url)) as store:
        store.import_runs([changed])
    code, _, err = run_cli("migrate", "--from", source["dir"], "--to", pg_url)
    assert code == 1
    line = _one_line(err)
    assert f"run '{source['done']}' is already in" in line and "test_dir" in line
    assert list(_records(pg_url)) == [source["done"]]


@pytest.mark.postgres
def test_commands_work_on_postgres(run_cli: Cli, pg_url: str, tmp_path: pathlib.Path) -> None:
    """import, show, active, mark, reap, export and watch through --store postgresql://."""
    seed = tmp_path / "seed"
    with Store(seed) as store, open(tmp_path / "seed.json", "wb") as f:
        ids = _fill(store)
        store.export(f)
    code, out, _ = run_cli("--store", pg_url, "import", str(tmp_path / "seed.json"))
    assert code == 0 and "imported 4 runs" in out
    code, out, _ = run_cli("--store", pg_url, "show", ids["failed"], "--json")
    assert code == 0 and json.loads(out)["exit_code"] == 2
    code, out, _ = run_cli("--store", pg_url, "active", "--json")
    assert code == 0 and {r["id"] for r in json.loads(out)} == {ids["running"], ids["pending"]}
    code, out, _ = run_cli("--store", pg_url, "mark", ids["pending"], "failed", "--json")
    assert code == 0 and json.loads(out)["status"] == "failed"
    code, out, _ = run_cli("--store", pg_url, "show", "no-such-run")
    assert code == 3
    code, out, _ = run_cli("--store", pg_url, "export")
    assert code == 0 and len(json.loads(out)) == 4
    code, out, _ = run_cli("--store", pg_url, "watch", "--since", "0", "--timeout", "0.5",
                           "--json")
    assert code == 0 and any(json.loads(line)["run"]["id"] == ids["pending"]
                             for line in out.splitlines())


@pytest.mark.postgres
def test_stats_on_postgres_never_prints_the_password(
        run_cli: Cli, source: dict[str, str], pg_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """stats (human and JSON) names the database with the password replaced by ***."""
    secret_url = _with_password(pg_url, "s3cr3t-pw")
    code, _, _ = run_cli("migrate", "--from", source["dir"], "--to", secret_url)
    assert code == 0
    for argv in (["--store", secret_url, "stats"], ["--store", secret_url, "stats", "--json"]):
        code, out, err = run_cli(*argv)
        assert code == 0, err
        assert "s3cr3t-pw" not in out + err and "***" in out
    data = json.loads(out)
    assert (data["backend"], data["state_dir"], data["runs"]) == ("postgresql", None, 4)
    monkeypatch.setenv("RUNSTORE_URL", secret_url)
    code, out, err = run_cli("stats")
    assert code == 0 and "(from RUNSTORE_URL)" in out and "s3cr3t-pw" not in out + err


@pytest.mark.parametrize("command", ["check", "compact"])
def test_file_only_commands_refuse_postgres(run_cli: Cli, command: str) -> None:
    """check and compact exit 2 on a PostgreSQL store, saying why, before connecting."""
    code, out, err = run_cli("--store", "postgresql://app:pw-xyz@db.invalid/runs", command)
    assert (code, out) == (2, "")
    line = _one_line(err)
    assert f"`{command}` works on a file store only" in line
    assert "postgresql://app:***@db.invalid/runs (from --store) is a PostgreSQL store" in line
    assert "pw-xyz" not in line


def test_stats_of_a_postgres_location_hides_the_password(
        run_cli: Cli, source: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever path the backend reports, stats prints a PostgreSQL location without its
    password (the backend is stood in for by the file store, reporting a DSN)."""
    real_open = opener.open_store

    class Reporting:
        def __init__(self, store: RunStore) -> None:
            self._store = store

        def stats(self) -> Any:
            return attrs.evolve(self._store.stats(), location="host=db password=pw-xyz dbname=r")

        def __enter__(self) -> Reporting:
            return self

        def __exit__(self, *exc: object) -> None:
            self._store.close()

    monkeypatch.setattr(opener, "open_store",
                        lambda location, **options: Reporting(real_open(source["dir"])))
    monkeypatch.setattr(cli.Context, "_postgres_store_exists", lambda self, location: True)
    for argv in (["stats"], ["stats", "--json"]):
        code, out, err = run_cli("--store", "postgresql://app:pw-xyz@db/runs", *argv)
        assert code == 0, err
        assert "pw-xyz" not in out + err
        assert "postgresql://app:***@db/runs" in out and "password=***" in out


@pytest.mark.postgres
def test_migrate_postgres_back_to_a_directory(
        run_cli: Cli, source: dict[str, str], pg_url: str, tmp_path: pathlib.Path) -> None:
    """migrate works the other way too (written against RunStore): PostgreSQL -> file."""
    assert run_cli("migrate", "--from", source["dir"], "--to", pg_url)[0] == 0
    back = str(tmp_path / "back")
    code, out, _ = run_cli("migrate", "--from", pg_url, "--to", back, "--json")
    assert code == 0 and json.loads(out)["verified"] == 4
    assert _records(back) == _records(source["dir"])


def _tables(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url) as db:
        rows = db.execute(b"SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return sorted(str(r[0]) for r in rows)


@pytest.mark.postgres
def test_reading_commands_never_create_a_postgres_store(run_cli: Cli, pg_url: str) -> None:
    """On a database without runstore's table, reading commands (and migrate --from) exit 3
    and create nothing; a writing command creates the store."""
    for argv in (["list"], ["stats"], ["active"], ["show", "x"], ["export"],
                 ["watch", "--timeout", "0"]):
        code, out, err = run_cli("--store", pg_url, *argv)
        assert (code, out) == (3, ""), argv
        assert "the database holds no runstore table 'runs'" in _one_line(err)
    code, _, err = run_cli("migrate", "--from", pg_url, "--to", pg_url + "&x=1")
    assert code in (2, 3), err
    assert _tables(pg_url) == []
    code, _, _ = run_cli("--store", pg_url, "reap", "--stale-after", "1h")
    assert code == 0 and "runs" in _tables(pg_url)
    code, out, _ = run_cli("--store", pg_url, "list")
    assert (code, out) == (0, "no runs\n")


@pytest.mark.postgres
def test_migrate_refuses_a_missing_postgres_source(
        run_cli: Cli, pg_url: str, tmp_path: pathlib.Path) -> None:
    """migrate --from a database without runstore's table exits 3; nothing is created."""
    code, _, err = run_cli("migrate", "--from", pg_url, "--to", str(tmp_path / "t"))
    assert code == 3 and "holds no runstore table" in _one_line(err)
    assert _tables(pg_url) == [] and not (tmp_path / "t").exists()


@pytest.mark.postgres
def test_unreachable_database_is_one_line_exit_1(run_cli: Cli, pg_url: str) -> None:
    """A database that does not exist: one line naming PostgreSQL's reason, exit 1, no
    password."""
    missing = _with_password(pg_url.replace("@/t_", "@/nodb_"), "pw-xyz")
    code, out, err = run_cli("--store", missing, "list")
    assert (code, out) == (1, "")
    line = _one_line(err)
    assert "PostgreSQL" in line and "does not exist" in line and "pw-xyz" not in line


@pytest.mark.postgres
def test_stats_on_postgres_counts_rows(run_cli: Cli, source: dict[str, str],
                                       pg_url: str) -> None:
    """Human stats of a PostgreSQL store: the database, table size, runs and changes."""
    assert run_cli("migrate", "--from", source["dir"], "--to", pg_url)[0] == 0
    code, out, _ = run_cli("--store", pg_url, "stats")
    assert code == 0
    assert "database    " in out and "table size  " in out
    assert "rows        4 runs, 4 retained changes" in out


@pytest.mark.postgres
def test_migrate_to_postgres_keeps_unknown_fields(
        run_cli: Cli, tmp_path: pathlib.Path, pg_url: str) -> None:
    """A field runstore does not know travels file -> PostgreSQL -> file."""
    src = tmp_path / "source"
    with Store(src) as store:
        store.import_runs([{"id": "r-1", "machine": "m1", "test_dir": "/t",
                            "test_dir_hash": "h", "status": "completed", "exit_code": 0,
                            "x_ticket": "OPS-7"}])
    assert run_cli("migrate", "--from", str(src), "--to", pg_url)[0] == 0
    assert _records(pg_url)["r-1"]["x_ticket"] == "OPS-7"
    assert run_cli("migrate", "--from", pg_url, "--to", str(tmp_path / "back"))[0] == 0
    assert _records(str(tmp_path / "back")) == _records(str(src))


def test_canonical_json_is_the_json_record_with_sorted_keys(source: dict[str, str]) -> None:
    """canonical() is run_to_json's record, keys sorted, no whitespace: what the file and
    `export` hold, so a checksum can be recomputed with jq -cS."""

    with Store(source["dir"]) as store:
        for run in store.list():
            record = _fields.run_to_json(run)
            assert migrate.canonical(run) == json.dumps(
                record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_migrate_progress_only_on_a_terminal(source: dict[str, str],
                                             tmp_path: pathlib.Path) -> None:
    """With stderr a terminal, migrate draws (and erases) a bar per step; piped, nothing."""
    import pty
    import select
    import subprocess
    import sys

    code = ("import sys, runstore._clifmt as f, runstore.cli; f.PROGRESS_DELAY = 0; "
            "sys.exit(runstore.cli.main(sys.argv[1:]))")
    for tty in (True, False):
        argv = [sys.executable, "-c", code, "migrate", "--from", source["dir"],
                "--to", str(tmp_path / f"t-{tty}")]
        if not tty:
            done = subprocess.run(argv, capture_output=True, check=False, timeout=60)
            assert (done.returncode, done.stderr) == (0, b"")
            continue
        parent, child = pty.openpty()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=child)
        os.close(child)
        out, _ = proc.communicate(timeout=60)
        err = b""
        while select.select([parent], [], [], 1)[0]:
            try:
                chunk = os.read(parent, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            err += chunk
        os.close(parent)
        assert proc.returncode == 0 and b"verified: 4 of 4 runs" in out
        for label in (b"copying the source's runs", b"verifying"):
            assert b"migrating: " + label in err
