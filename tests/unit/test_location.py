"""``runstore._location``: the one parser of store locations (``runstore.open`` and the CLI)
and the one hider of their passwords (``redact``, also ``postgres.safe_dsn``).

Every accepted form and what it names; every refused form with its message, from
``runstore.open`` and from the CLI alike; a password in none of those messages; the checks a
caller asks of a location (``missing_store``, ``journal_file``)."""

from __future__ import annotations

import os
import pathlib
import re
import urllib.parse
from collections.abc import Callable

import pytest

import runstore
from runstore import RunstoreError, Store, _location
from runstore._location import Location, LocationError, parse, passwords_in, redact, scrub

Cli = Callable[..., tuple[int, str, str]]
SECRET = "hunter2"


# -- accepted forms --------------------------------------------------------------------------

def test_a_directory_path_is_made_absolute_with_tilde_expanded(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path names a file store: relative to the working directory, ``~`` the home."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse("runs") == Location(str(tmp_path / "runs"), "", False)
    assert parse("~/runs").target == str(tmp_path / "home" / "runs")
    assert parse(tmp_path / "p").target == str(tmp_path / "p")  # any os.PathLike
    assert parse("/var/lib/../lib/runs").target == "/var/lib/runs"
    where = parse("runs", "--state-dir")
    assert (where.source, where.backend, where.display) == ("--state-dir", "file", where.target)


@pytest.mark.parametrize("url", ["file:///srv/run%20state", "file://localhost/srv/run%20state",
                                 "FILE:///srv/run%20state"])
def test_a_file_url_names_a_directory_on_this_host(url: str) -> None:
    """``file:///dir`` and ``file://localhost/dir`` (scheme in any case) are the file store in
    the directory, percent-escapes decoded."""
    assert parse(url) == Location("/srv/run state", "", False)


@pytest.mark.parametrize("url", [
    "postgresql://app:hunter2@db.example:5433/runs?sslmode=require",
    "postgres://app@db/runs",
    "POSTGRESQL://app@/runs?host=/tmp/sock&password=hunter2",
])
def test_a_postgres_url_is_passed_on_as_written(url: str) -> None:
    """A PostgreSQL URL names a PostgreSQL store; the backend gets it unchanged, and only its
    display hides the password."""
    where = parse(url, "RUNSTORE_URL")
    assert (where.target, where.source, where.postgres, where.backend) == (
        url, "RUNSTORE_URL", True, "postgresql")
    assert _location.is_postgres_url(url)
    assert SECRET not in where.display
    assert where.display == redact(url)


def test_runstore_open_reads_locations_the_same_way(tmp_path: pathlib.Path) -> None:
    """``runstore.open`` on a file URL opens the directory it names (percent-escapes
    decoded), as the CLI does."""
    directory = tmp_path / "a dir"
    url = "file://" + urllib.parse.quote(str(directory))
    with runstore.open(url) as store:
        assert isinstance(store, Store)
        assert store.stats().path == _location.journal_file(str(directory))
    assert parse(url).target == str(directory)


# -- refused forms ---------------------------------------------------------------------------

#: location -> words its refusal must say (each refusal also names the accepted forms or the
#: remedy, and never the password)
REFUSED: dict[str, tuple[str, ...]] = {
    "": ("the store location is empty", "file:///path/to/dir", "postgresql://"),
    f"ftp://u:{SECRET}@host/x": ("unsupported store URL 'ftp://u:***@host/x'",
                                 "(scheme 'ftp')", "file:///path/to/dir", "postgresql://"),
    "sqlite:///tmp/x.db": ("unsupported store URL", "(scheme 'sqlite')"),
    f"mysql://db/runs?password={SECRET}": ("(scheme 'mysql')", "password=***"),
    "file://build7/var/runs": ("names host 'build7'", "must be on this host",
                               "postgresql://"),
    f"file://u:{SECRET}@build7/var/runs": ("names host 'build7'", "file://u:***@build7"),
    f"file:///var/runs?password={SECRET}": ("has a query or a fragment",
                                            "percent-encode '?' and '#'"),
    "file:///var/runs#part": ("has a query or a fragment",),
    "file:///var/runs?": ("has a query or a fragment",),
    "file://": ("file URL names no directory", "file:///path/to/dir"),
    "file://localhost": ("file URL names no directory",),
    f"file://u:{SECRET}@[::1/x": ("is not a valid URL", "file://u:***@[::1/x",
                                  "file:///path/to/dir"),
}


@pytest.mark.parametrize(("location", "words"), list(REFUSED.items()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_refused_form_says_why_without_its_password(
        location: str, words: tuple[str, ...]) -> None:
    """Each refused form raises ``LocationError`` (a ``RunstoreError`` and a ``ValueError``)
    saying what is wrong and what is accepted, prefixed by its source, with no password in
    the message or the exception's arguments."""
    with pytest.raises(LocationError) as info:
        parse(location, "--store")
    text = str(info.value)
    assert text.startswith("--store: ") and info.value.source == "--store"
    for word in words:
        assert word in text
    assert SECRET not in text and SECRET not in repr(info.value.args)
    assert isinstance(info.value, RunstoreError) and isinstance(info.value, ValueError)
    with pytest.raises(LocationError) as bare:
        parse(location)
    assert str(bare.value) == text.removeprefix("--store: ")


@pytest.mark.parametrize("location", list(REFUSED))
def test_runstore_open_refuses_the_same_forms(location: str, tmp_path: pathlib.Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``runstore.open`` refuses exactly those forms, with the same message, and creates
    nothing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LocationError) as info:
        runstore.open(location)
    with pytest.raises(LocationError) as parsed:
        parse(location)
    assert str(info.value) == str(parsed.value)
    assert SECRET not in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.usefixtures("clean_cli_env")
@pytest.mark.parametrize("location", [loc for loc in REFUSED if loc])
def test_the_cli_refuses_the_same_forms(location: str, run_cli: Cli) -> None:
    """The CLI prints that message in one line naming the option, exit 2, no password
    (an empty --store is no store option at all, so it is left out here)."""
    code, out, err = run_cli("--store", location, "list")
    assert (code, out) == (2, "")
    with pytest.raises(LocationError) as parsed:
        parse(location, "--store")
    assert err == f"runstore: error: {parsed.value}\n"
    assert SECRET not in err


def test_without_the_file_url_checks_another_host_is_opened_here(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: a ``file://`` URL taken as its path alone (no host, query or empty
    checks) silently names a directory on this host: ``file://build7/var/runs`` becomes
    ``/var/runs`` here, the query is dropped, ``file://`` is the working directory."""
    monkeypatch.setattr(_location, "_file_url_path",
                        lambda text, source: urllib.parse.urlsplit(text).path)
    assert parse("file://build7/var/runs").target == "/var/runs"
    assert parse(f"file:///var/runs?password={SECRET}").target == "/var/runs"
    assert parse("file://").target == os.getcwd()


def test_without_redact_the_refusal_shows_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: with ``redact`` gone, the refusal of an unsupported URL echoes its
    password: the tests above would see it."""
    monkeypatch.setattr(_location, "redact", lambda location: location)
    with pytest.raises(LocationError, match=SECRET):
        parse(f"ftp://u:{SECRET}@host/x")


# -- passwords -------------------------------------------------------------------------------

#: (location, as redact shows it, the passwords passwords_in finds)
PASSWORDS: list[tuple[str, str, set[str]]] = [
    ("postgresql://app:hunter2@db/runs", "postgresql://app:***@db/runs", {"hunter2"}),
    ("postgres://app:p%40ss@db:5433/runs?sslmode=require",
     "postgres://app:***@db:5433/runs?sslmode=require", {"p%40ss", "p@ss"}),
    ("postgresql://app:pa?ss#w@db/runs", "postgresql://app:***@db/runs", {"pa?ss#w"}),
    ("postgresql://app@/runs?host=/tmp/s&password=hunter2&port=5432",
     "postgresql://app@/runs?host=/tmp/s&password=***&port=5432", {"hunter2"}),
    ("postgresql://app@db/runs?PASSWORD=a+b%21", "postgresql://app@db/runs?PASSWORD=***",
     {"a+b%21", "a+b!", "a b!"}),
    ("postgresql://:only@db/runs", "postgresql://:***@db/runs", {"only"}),
    ("host=db user=app password=hunter2 dbname=runs",
     "host=db user=app password=*** dbname=runs", {"hunter2"}),
    ("host=db password = 'hun ter2' dbname=runs", "host=db password = *** dbname=runs",
     {"'hun ter2'", "hun ter2"}),
    (r"password='it\'s' dbname=runs", "password=*** dbname=runs",
     {r"'it\'s'", r"it\'s", "it's"}),
    (r"host=db password=hun\ ter2 dbname=runs", "host=db password=*** dbname=runs",
     {r"hun\ ter2", "hun ter2"}),
    ("host=db password='never closed", "host=db password=***",
     {"'never closed", "never closed"}),
    ("postgresql://app@db.example/runs", "postgresql://app@db.example/runs", set()),
    ("host=db dbname=runs", "host=db dbname=runs", set()),
    ("/var/lib/runs", "/var/lib/runs", set()),
]


@pytest.mark.parametrize(("location", "shown", "secrets"), PASSWORDS)
def test_redact_hides_every_password_form(location: str, shown: str,
                                          secrets: set[str]) -> None:
    """A URL's user-info password (as libpq reads it: up to the first '@'), a ``password=``
    query parameter, a DSN's ``password`` key (plain, quoted, escaped, unterminated) become
    ``***``; nothing else changes; ``passwords_in`` finds each as written and as decoded."""
    assert redact(location) == shown
    assert set(passwords_in(location)) == secrets
    for secret in secrets:
        assert secret not in shown


def test_scrub_replaces_every_known_password() -> None:
    """``scrub`` removes each password from a message, longest first (a driver's error may
    quote it decoded)."""
    secrets = passwords_in("postgresql://app:p%40ss@db/runs")
    assert scrub("login p@ss failed (p%40ss)", secrets) == "login *** failed (***)"
    assert passwords_in(None) == [] and passwords_in("") == []


def test_safe_dsn_is_redact() -> None:
    """``postgres.safe_dsn`` (PostgresStore's ``server``, ``stats().path`` and messages) is
    the same function: one way of hiding a password everywhere."""
    pytest.importorskip("psycopg")
    from runstore.postgres import safe_dsn

    assert safe_dsn is redact
    assert safe_dsn("host=db password=hunter2 dbname=postgres") == (
        "host=db password=*** dbname=postgres")


def test_with_the_old_user_info_pattern_a_password_with_a_question_mark_leaks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: a user-info pattern stopping at '?' or '#' (as a generic URL parser
    does; libpq does not) leaves such a password in the display."""
    monkeypatch.setattr(_location, "_USERINFO_PASSWORD", re.compile(
        r"^([a-z][a-z0-9+.-]*://[^:/?#@]*):([^@/?#]*)@", re.IGNORECASE))
    assert "pa?ss" in redact("postgresql://app:pa?ss@db/runs")
    assert passwords_in("postgresql://app:pa?ss@db/runs") == []


# -- what a caller asks of a location ----------------------------------------------------------

def test_missing_store_says_why_and_creates_nothing(tmp_path: pathlib.Path) -> None:
    """``missing_store``: why a directory holds no file store, or None when it holds one;
    it never creates the directory or the file."""
    assert _location.missing_store(parse(tmp_path / "none")) == "the directory does not exist"
    (tmp_path / "file").write_text("")
    assert _location.missing_store(parse(tmp_path / "file")) == "it is not a directory"
    assert _location.missing_store(parse(tmp_path)) == "the directory holds no runs.jsonl"
    assert os.listdir(tmp_path) == ["file"]
    Store(tmp_path / "s").close()
    assert _location.missing_store(parse(tmp_path / "s")) is None


def test_the_journal_file_is_what_check_verifies(tmp_path: pathlib.Path) -> None:
    """``runstore.check`` of the directory: ok for a healthy store, a problem with its line
    once the file ``journal_file`` names is damaged."""
    with Store(tmp_path / "s") as store:
        store.create(runstore.Run("m1", "/t", "h"))
    report = runstore.check(str(tmp_path / "s"), lock_timeout=1)
    assert report.ok and report.records >= 1
    path = _location.journal_file(str(tmp_path / "s"))
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data.replace(b'"m1"', b'"m2"', 1))  # fails its checksum
    damaged = runstore.check(str(tmp_path / "s"), lock_timeout=1)
    assert not damaged.ok and damaged.problems[0].line >= 1
