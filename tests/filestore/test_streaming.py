"""Reads that stream: ``iter_runs`` (both backends), ``export``, the CLI's ``list`` (text,
``--json``, ``--jsonl``, ``--limit``) and ``check``, in bounded memory."""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
from backends import ROOT
from faults import history

from runstore import CorruptStoreError, Run, RunStore, Status, Store, _runscan as runscan
from runstore._statedir import DATA_NAME

pytestmark = pytest.mark.contract

_BASE = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)


def _same(store: RunStore) -> None:
    assert list(store.iter_runs()) == store.list()
    for kwargs in ({"machine": "m3"}, {"status": ["completed", "running"]},
                   {"machine": "m1", "status": "failed"}, {"batch_id": "b"}):
        assert list(store.iter_runs(**kwargs)) == store.list(**kwargs)


def test_iter_runs_equals_list_with_history(open_store: Callable[..., RunStore]) -> None:
    """iter_runs yields what list() returns, in its order, as runs change and compact."""
    store = open_store(durable=False)
    history(store, 300)
    _same(store)
    store.compact()
    _same(store)
    history(store, 200)
    _same(store)
    assert list(open_store(durable=False).iter_runs()) == store.list()


def test_iter_runs_is_lazy_and_filters_eagerly(open_store: Callable[..., RunStore]) -> None:
    """A bad status filter is refused at the call; an unfinished iteration can be dropped."""
    store = open_store(durable=False)
    history(store, 20)
    with pytest.raises(ValueError):
        store.iter_runs(status="skipped")
    it = store.iter_runs()
    assert next(it) == store.list()[0]
    del it
    history(store, 5)  # the store goes on working
    _same(store)


@pytest.mark.file_only
@pytest.mark.parametrize("fresh", [True, False], ids=["opened-fresh", "indexed"])
def test_iter_runs_across_compactions_and_checkpoints(store_dir: pathlib.Path,
                                                      fresh: bool) -> None:
    """A store opened at a checkpoint after a compacted base (versions of base runs after
    it, runs created after it) or with its whole index built reads the same as list()."""
    with Store(store_dir, durable=False) as store:
        history(store, 1500)
        store.compact()
        history(store, 1500)  # past a checkpoint (one every 1,024 records)
        store.prune(keep_last=700)
        history(store, 2600)
    with Store(store_dir, durable=False) as store:
        if not fresh:
            store.list()  # builds the whole index
        runs = list(store.iter_runs())
        assert runs == store.list()
    assert len({r.id for r in runs}) == len(runs)


@pytest.mark.file_only
def test_iter_runs_skips_a_torn_tail(store_dir: pathlib.Path) -> None:
    """A torn last line is not yielded, and reading leaves it in place."""
    with Store(store_dir, durable=False) as store:
        history(store, 50)
        expected = store.list()
    path = store_dir / DATA_NAME
    with open(path, "ab") as f:
        f.write(b'{"seq":999,"id":"torn')
    before = path.read_bytes()
    with Store(store_dir, durable=False) as store:
        assert list(store.iter_runs()) == expected
    assert path.read_bytes() == before


@pytest.mark.file_only
def test_iter_runs_sees_the_file_as_it_was(store_dir: pathlib.Path) -> None:
    """Changes made during an iteration are not seen by it, a compaction included."""
    with Store(store_dir, durable=False) as store:
        history(store, 100)
        expected = store.list()
        it = store.iter_runs()
        first = next(it)
        history(store, 50)
        store.compact()
        assert [first, *it] == expected


def _supersede_in_tail(store_dir: pathlib.Path) -> list[Run]:
    with Store(store_dir, durable=False) as store:
        history(store, 40)
        store.compact()
        for run in store.active():
            store.finish(run.id, Status.TIMEOUT, exit_code=-9)
        return store.list()


@pytest.mark.file_only
def test_newer_version_after_the_base_replaces_the_base_one(store_dir: pathlib.Path) -> None:
    """A run finished after the compaction is yielded finished, at its place."""
    expected = _supersede_in_tail(store_dir)
    assert any(r.status is Status.TIMEOUT for r in expected)
    with Store(store_dir, durable=False) as store:
        assert list(store.iter_runs()) == expected


@pytest.mark.file_only
def test_newer_version_broken_variant(store_dir: pathlib.Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof the test above can fail: ignoring the versions after the base yields the
    stale base versions."""
    expected = _supersede_in_tail(store_dir)
    real = runscan.records

    def blind(journal: Any, fd: int, snap: runscan.Snapshot) -> Any:
        snap.tail = {}
        return real(journal, fd, snap)

    monkeypatch.setattr(runscan, "records", blind)
    with Store(store_dir, durable=False) as store:
        assert list(store.iter_runs()) != expected


def _swap_two_base_lines(store_dir: pathlib.Path) -> None:
    """Swap two base lines: each still passes its own checksum, the base's does not."""
    with Store(store_dir, durable=False) as store:
        history(store, 30)
        store.compact()
    path = store_dir / DATA_NAME
    lines = path.read_bytes().split(b"\n")
    lines[3], lines[4] = lines[4], lines[3]
    path.write_bytes(b"\n".join(lines))


@pytest.mark.file_only
def test_reordered_base_is_reported(store_dir: pathlib.Path) -> None:
    """A compacted base that fails its header's CRC-32 raises once it has been read."""
    _swap_two_base_lines(store_dir)
    with Store(store_dir, durable=False) as store, pytest.raises(CorruptStoreError,
                                                                 match="checksum"):
        list(store.iter_runs())


@pytest.mark.file_only
def test_reordered_base_broken_variant(store_dir: pathlib.Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof the test above can fail: without the base check the reordered runs pass."""
    _swap_two_base_lines(store_dir)
    monkeypatch.setattr(runscan, "_check_base", lambda *args: None)
    with Store(store_dir, durable=False) as store:
        assert len(list(store.iter_runs())) > 2


def test_export_streams_one_document(open_store: Callable[..., RunStore]) -> None:
    """export writes one JSON array, the runs of list() in order, text or binary."""
    store = open_store(durable=False)
    history(store, 120)
    text, raw = io.StringIO(), io.BytesIO()
    ids = [r.id for r in store.list()]
    assert store.export(text) == store.export(raw) == len(ids) > 50
    assert [d["id"] for d in json.loads(text.getvalue())] == ids
    assert json.loads(raw.getvalue()) == json.loads(text.getvalue())


# -- the command line ------------------------------------------------------------------------

def _import(store_dir: pathlib.Path, n: int) -> None:
    """``n`` finished runs, imported in batches and compacted (fast, for size tests)."""
    with Store(store_dir, durable=False) as store:
        for k in range(0, n, 20000):
            store.import_runs([
                Run(f"m{i % 97}", f"/tests/t{i % 13}", f"h{i % 31:08x}",
                    status=Status.COMPLETED, exit_code=0,
                    started_at=_BASE + _dt.timedelta(seconds=i),
                    ended_at=_BASE + _dt.timedelta(seconds=i + 5),
                    id=f"20260101T000000.000000Z-{i:016x}")
                for i in range(k, min(n, k + 20000))])
        store.compact()


@pytest.mark.file_only
def test_cli_json_jsonl_and_limit(store_dir: pathlib.Path, run_cli: Any,
                                  clean_cli_env: None) -> None:
    """--json parses as one array, --jsonl as one object per line, --limit keeps the
    most recent N (oldest first), and the text table has every run under one header."""
    _import(store_dir, 2500)  # more than one block of rows
    with Store(store_dir) as store:
        ids = [r.id for r in store.list()]
    code, out, _ = run_cli("--state-dir", str(store_dir), "list", "--json")
    assert code == 0 and [d["id"] for d in json.loads(out)] == ids
    code, out, _ = run_cli("--state-dir", str(store_dir), "list", "--jsonl")
    assert code == 0 and [json.loads(line)["id"] for line in out.splitlines()] == ids
    code, out, _ = run_cli("--state-dir", str(store_dir), "list", "--jsonl", "--limit", "3")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ids[-3:]
    code, out, _ = run_cli("--state-dir", str(store_dir), "list", "--json", "--limit", "2")
    assert [d["id"] for d in json.loads(out)] == ids[-2:]
    code, out, _ = run_cli("--state-dir", str(store_dir), "list")
    lines = out.splitlines()
    assert lines[0].startswith("ID") and [line.split()[0] for line in lines[1:]] == ids
    code, out, _ = run_cli("--state-dir", str(store_dir), "list", "--json", "--machine", "no")
    assert (code, json.loads(out)) == (0, [])
    code, out, _ = run_cli("--state-dir", str(store_dir), "list", "--jsonl", "--machine", "no")
    assert (code, out) == (0, "")
    code, _, err = run_cli("--state-dir", str(store_dir), "list", "--json", "--jsonl")
    assert code == 2 and "not both" in err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runstore", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.file_only
def test_list_into_head_finishes_at_once(store_dir: pathlib.Path) -> None:
    """`list | head -1` on 50,000 runs ends in well under the time the whole list takes."""
    _import(store_dir, 50000)
    started = time.monotonic()
    out = subprocess.run(f"{' '.join(_cli('--state-dir', str(store_dir), 'list'))} | head -1",
                         shell=True, env=_env(), capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - started
    assert out.stdout.startswith("ID") and "Traceback" not in out.stderr
    assert elapsed < 5.0, elapsed


#: the most peak RSS may grow from the small store to the five times larger one
_GROWTH_KIB = 10 * 1024
_PEAK = textwrap.dedent("""
    import resource, subprocess, sys
    subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")


def _peak_kib(*args: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK, *_cli(*args)], env=_env(),
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def _growth(tmp_path: pathlib.Path, small: int, large: int) -> None:
    for n in (small, large):
        _import(tmp_path / str(n), n)
    for command in (["list"], ["list", "--json"], ["export"], ["check"]):
        a = _peak_kib("--state-dir", str(tmp_path / str(small)), *command)
        b = _peak_kib("--state-dir", str(tmp_path / str(large)), *command)
        # linear growth would add (large - small) / small times the small run's data;
        # streaming adds only the larger index of a few arrays, far less
        print(f"[streaming figures] {command}: {small:,} runs {a:,} KiB, "
              f"{large:,} runs {b:,} KiB")
        assert b - a < _GROWTH_KIB, (command, a, b)


@pytest.mark.file_only
def test_memory_is_bounded(tmp_path: pathlib.Path) -> None:
    """Peak RSS of list, list --json, export and check hardly grows from 4,000 to 20,000
    runs (measured in a child process)."""
    _growth(tmp_path, 4000, 20000)


@pytest.mark.file_only
@pytest.mark.stress
def test_memory_is_bounded_large(tmp_path: pathlib.Path) -> None:
    """The same from 20,000 to 100,000 runs."""
    _growth(tmp_path, 20000, 100000)


@pytest.mark.file_only
def test_memory_broken_variant(tmp_path: pathlib.Path) -> None:
    """Proof the measurement can fail: check reading the whole file into memory, as it
    did, grows the peak with the store past the bound."""
    for n in (4000, 20000):
        _import(tmp_path / str(n), n)
    code = ("import sys; from runstore import verify, cli; "
            "verify._check_file = lambda fd, path, vouch=None: "
            "verify._check_bytes(open(path, 'rb').read(), path, vouch); "
            "sys.exit(cli.main(['--state-dir', sys.argv[1], 'check']))")
    peaks = []
    for n in (4000, 20000):
        out = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-c", code,
                              str(tmp_path / str(n))], env=_env(), capture_output=True,
                             text=True, check=True)
        peaks.append(int(out.stdout))
    assert peaks[1] - peaks[0] >= _GROWTH_KIB, peaks
