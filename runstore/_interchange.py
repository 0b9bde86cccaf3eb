"""The export/import/archive formats shared by both backends.

``parse_import`` reads what ``import_runs()`` accepts (a JSON array document, JSON lines, or an
iterable of ``Run``/dicts) into validated runs plus the unknown fields each record carried;
``append_archive`` appends pruned runs, durably, to the JSON-lines archive of ``prune()``;
``write_export`` writes the document of ``export()``; ``check_import`` refuses a duplicate id
or a second non-terminal run on a machine. ``iter_import`` reads the same input as
``parse_import`` one record at a time, in memory that does not grow with the number of
records (a file is read a megabyte at a time), for the backends' streaming imports.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Container, Iterable, Iterator
from typing import IO, Any

import attrs
import orjson

from . import _codec, _fields, _outputs, _transitions
from ._fsio import sync_file
from .errors import InvalidRunError, IOKind, OutputTargetError, RunstoreError, StoreIOError
from .model import Run

#: a number an integer beyond 64 bits may be (or a long digit string)
_LONG_NUMBER = re.compile(rb"\d{19}")
#: about how many bytes ``write_export`` hands to each write
_EXPORT_CHUNK = 1 << 20


def _exported(run: Run, extra: dict[str, Any]) -> bytes:
    """One run as exported and archived: the snake_case field names, then ``extra`` (the fields
    this library does not know), as one JSON object."""
    data = _fields.run_to_dict(run)
    for key, value in extra.items():
        data.setdefault(key, value)
    return _codec.dumps(data)


def archive_lines(runs: list[Run], extras: dict[str, dict[str, Any]]) -> bytes:
    """``runs`` as JSON lines, each with the extra fields ``extras`` holds for its id."""
    return b"".join(_exported(run, extras.get(run.id, {})) + b"\n" for run in runs)


def write_export(fp: IO[str] | IO[bytes], runs: Iterable[tuple[Run, dict[str, Any]]]) -> int:
    """Write ``runs`` (each with its extra fields) to ``fp``, text or binary, as the one JSON
    array document of ``export()``, about ``_EXPORT_CHUNK`` bytes per write as ``runs`` is
    iterated (never the whole document in memory); return how many were written."""
    return write_export_items(fp, (_exported(run, extra) for run, extra in runs))


def export_item(data: dict[str, Any], run_of: Callable[[], Run]) -> bytes:
    """A stored record (decoded and checked) as ``export`` writes it: straight from its
    fields when they are as this library writes them (``_fields.exported_dict``), else
    through its ``Run`` (``run_of()``, which refuses a malformed record)."""
    fields = _fields.exported_dict(data)
    if fields is not None:
        return _codec.dumps(fields)
    return _exported(run_of(), _fields.extra_fields(data))


def write_export_items(fp: IO[str] | IO[bytes], items: Iterable[bytes]) -> int:
    """``write_export`` of runs already encoded, one JSON object each."""
    def write(blob: bytes) -> None:
        if isinstance(fp, io.TextIOBase):
            fp.write(blob.decode())
        else:
            fp.write(blob)  # type: ignore[arg-type]  # not a text file: a binary one

    # copied into one buffer as they come: an encoded item may hold several times its
    # length (orjson's output buffer), so a list of a megabyte's worth would hold far more
    count, buf = 0, bytearray(b"[")
    for item in items:
        buf += b"\n" if count == 0 else b",\n"
        buf += item
        count += 1
        if len(buf) >= _EXPORT_CHUNK:
            write(bytes(buf))
            buf.clear()
    buf += b"\n]\n" if count else b"]\n"
    write(bytes(buf))
    return count


def export_to_path(path: str, write: Callable[[IO[bytes]], int]) -> int:
    """Call ``write`` on the file ``path`` names (``_outputs``: a symlink is followed) and
    return what it returned. A regular file, or none yet, is written through a temp file
    beside it, fsynced and renamed over it: a failed export leaves no half file, and an
    existing one is replaced whole or not at all, keeping its mode (a new one is 0600; a
    hard link to the old file keeps the old content). A FIFO or a character device is written
    into directly. A directory, a socket or a block device raises ``OutputTargetError``
    before anything is opened. A failure to create, write or rename the file (a missing
    directory, a full disk) raises ``StoreIOError`` (``IOKind.EXPORT``) naming ``path``."""
    try:
        output = _outputs.resolve(path)
    except OSError as exc:
        raise StoreIOError(path, "exporting to", exc, IOKind.EXPORT) from None
    if output.stream:
        return _export_to_stream(path, output.path, write)
    directory, name = os.path.split(output.path)
    try:
        tmp = tempfile.NamedTemporaryFile(  # noqa: SIM115  # closed below, renamed or removed
            "wb", dir=directory, prefix=f".{name}.", suffix=".tmp", delete=False)
    except OSError as exc:  # name the file asked for, not the temp file
        raise StoreIOError(path, "exporting to", exc, IOKind.EXPORT) from None
    try:
        if output.mode is not None:  # the file replaced keeps its mode
            os.fchmod(tmp.fileno(), output.mode)
        with tmp:
            count = write(tmp)
            tmp.flush()
            sync_file(tmp.fileno())
        os.replace(tmp.name, output.path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        if isinstance(exc, OSError) and not isinstance(exc, RunstoreError):
            raise StoreIOError(path, "exporting to", exc, IOKind.EXPORT) from None
        raise
    return count


def _export_to_stream(path: str, resolved: str, write: Callable[[IO[bytes]], int]) -> int:
    """``export_to_path`` into the FIFO or character device ``resolved`` (``path`` as
    named): written as ``write`` goes, then synced where the file can be."""
    try:
        fd = _outputs.open_stream(resolved)
    except OSError as exc:
        raise StoreIOError(path, "exporting to", exc, IOKind.EXPORT) from None
    try:
        with open(fd, "wb") as fp:
            count = write(fp)
            fp.flush()
            _outputs.sync_stream(fd, sync_file)
    except OSError as exc:
        if isinstance(exc, RunstoreError):
            raise
        raise StoreIOError(path, "exporting to", exc, IOKind.EXPORT) from None
    return count


def check_import(runs: list[Run], exists: Container[str], busy: dict[str, str],
                 where: str) -> None:
    """Refuse (``InvalidRunError`` naming the record) an import of ``runs`` where an id
    ``exists`` already or a non-terminal run would join one on a machine that is ``busy``
    (machine -> its non-terminal run id; updated with the imported ones)."""
    for n, run in enumerate(runs, 1):
        if run.id in exists:
            raise InvalidRunError(
                f"record {n}: run {run.id!r} already exists in {where}; nothing was imported")
        if not run.status.is_terminal:
            if run.machine in busy:
                raise InvalidRunError(
                    f"record {n}: run {run.id!r} is {run.status.value} on machine "
                    f"{run.machine!r}, which already has the non-terminal run "
                    f"{busy[run.machine]!r}; nothing was imported")
            busy[run.machine] = run.id


def append_archive(path: str, runs: list[Run], extras: dict[str, dict[str, Any]]) -> int:
    """Append ``runs`` (JSON lines, see ``archive_lines``) to the file ``path`` names and
    fsync it; a symlink is followed and a file is created mode 0600 (``_outputs``: a FIFO
    or a device is refused). Returns the file's size before (for
    ``cut_archive``). ``StoreIOError`` on failure, after cutting off what was written."""
    return append_archive_items(path, (_exported(run, extras.get(run.id, {}))
                                       for run in runs))


def append_archive_items(path: str, items: Iterable[bytes]) -> int:
    """``append_archive`` of runs already encoded as it encodes them (``export_item``),
    one JSON object each, written about ``_EXPORT_CHUNK`` bytes at a time as ``items`` is
    iterated, then fsynced: memory does not grow with the number of runs. Whatever fails
    (a write, or ``items`` itself raising), a regular file is cut back to its size before
    and the exception propagates; a failed call on the archive raises ``StoreIOError`` of
    kind ``ARCHIVE``. Anything but a regular file (or none yet) raises
    ``OutputTargetError`` before anything is opened."""

    def failed(exc: OSError) -> StoreIOError:
        return StoreIOError(path, "appending pruned runs to the archive", exc, IOKind.ARCHIVE)

    def put(fd: int, blob: bytes) -> None:
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            raise failed(exc) from None

    try:
        output = _outputs.resolve(path, archive=True)
        fd = os.open(output.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise failed(exc) from None
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        os.close(fd)
        raise failed(exc) from None
    try:
        buf = bytearray()  # copied in as they come (see ``write_export_items``)
        for item in items:
            buf += item
            buf += b"\n"
            if len(buf) >= _EXPORT_CHUNK:
                put(fd, bytes(buf))
                buf.clear()
        put(fd, bytes(buf))
        try:
            sync_file(fd)
        except OSError as exc:
            raise failed(exc) from None
    except BaseException:
        with contextlib.suppress(OSError):  # no partial lines left at its end
            os.ftruncate(fd, size)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return size


def cut_archive(path: str, size: int) -> bool:
    """Cut the archive ``path`` (a symlink followed) back to ``size`` bytes and fsync it (a
    prune that failed after ``append_archive``); False when that failed too."""
    try:
        output = _outputs.resolve(path, archive=True)
        fd = os.open(output.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            sync_file(fd)
        finally:
            os.close(fd)
    except (OSError, OutputTargetError):
        return False
    return True


def parse_import(
    source: IO[str] | IO[bytes] | Iterable[Run | dict[str, Any]],
) -> tuple[list[Run], dict[str, dict[str, Any]]]:
    """The runs of an import (revision at least 1) and the extra fields of each by id, all
    in memory (``iter_import`` reads them as they go). All or nothing: an unreadable,
    invalid or repeated record raises ``InvalidRunError`` naming it (``record N``)."""
    runs: list[Run] = []
    extras: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for n, run, extra in iter_import(source):
        if run.id in seen:
            raise InvalidRunError(f"record {n}: run {run.id!r} appears twice; "
                                  "nothing was imported")
        seen.add(run.id)
        runs.append(run)
        if extra:
            extras[run.id] = extra
    return runs, extras


#: how much of an import file is read at a time (``iter_import``)
IMPORT_CHUNK = 1 << 20
#: where an element of a JSON array may end: a closing brace, then a comma (the last one
#: in a chunk is almost always the end of a top-level element; when it is not, the next
#: chunk is joined and tried again)
_ELEMENT_END = re.compile(rb"\}\s*,")


def _not_json(detail: object) -> InvalidRunError:
    return InvalidRunError(f"the import is not JSON or JSON lines ({detail}); "
                           "nothing was imported")


def _chunks(fp: IO[str] | IO[bytes]) -> Iterator[bytes]:
    while True:
        raw = fp.read(IMPORT_CHUNK)
        if not raw:
            return
        yield raw.encode() if isinstance(raw, str) else raw


def _json_lines(first: bytes, rest: Iterator[bytes]) -> Iterator[Any]:
    """The values of a JSON-lines stream, one per non-blank line."""
    pending = first
    for chunk in rest:
        pending += chunk
        cut = pending.rfind(b"\n") + 1
        if not cut:
            continue
        for line in pending[:cut].splitlines():
            if line.strip():
                yield _loads(line)
        pending = pending[cut:]
    for line in pending.splitlines():
        if line.strip():
            yield _loads(line)


def _parse(blob: bytes) -> Any:
    """``blob`` parsed as JSON. orjson reads an integer beyond 64 bits as a float: where
    one may be (19 digits in a row), it is read with json, which keeps it exact (and the
    record is then refused, not rounded)."""
    return (json.loads if _LONG_NUMBER.search(blob) else orjson.loads)(blob)


def _loads(blob: bytes) -> Any:
    try:
        return _parse(blob)
    except (ValueError, RecursionError) as exc:  # orjson's and json's JSONDecodeError
        raise _not_json(exc) from None


def _json_array(first: bytes, rest: Iterator[bytes]) -> Iterator[Any]:
    """The elements of one JSON array document, in pieces of whole elements: the text
    read so far is cut after its last ``},`` and parsed as an array of its own (``[`` +
    part + ``]``); a cut inside a string or a nested object fails to parse and is tried
    again with more text. Memory: a chunk plus the longest element."""
    body = first.lstrip()[1:]  # after the opening bracket
    for chunk in rest:
        body += chunk
        last = collections.deque(
            _ELEMENT_END.finditer(body, max(0, len(body) - len(chunk) - 1)), maxlen=1)
        if not last:
            continue
        match = last[0]
        try:
            items = _parse(b"[" + body[:match.start() + 1] + b"]")
        except (ValueError, RecursionError):
            continue  # not an element boundary after all: read on
        yield from items
        body = body[match.end():]
    items = _loads(b"[" + body)  # the rest, with the closing bracket
    if not isinstance(items, list):
        raise _not_json("not an array")
    yield from items


def iter_import(
    source: IO[str] | IO[bytes] | Iterable[Run | dict[str, Any]],
) -> Iterator[tuple[int, Run, dict[str, Any]]]:
    """The records of an import as (record number from 1, validated run with revision at
    least 1, its extra fields), read as they are iterated. An unreadable or invalid record
    raises ``InvalidRunError`` naming it (``record N``) when it is reached: a caller that
    wants all or nothing writes nothing it cannot take back before the iteration ends.
    Unlike ``parse_import`` it does not refuse an id that appears twice (that needs every
    id: the backends check it against what they store)."""
    items: Iterable[Any]
    if hasattr(source, "read"):
        chunks = _chunks(source)  # type: ignore[arg-type]  # a file: it has read()
        first = b""
        for chunk in chunks:
            first += chunk
            if first.strip():
                break
        items = (_json_array(first, chunks) if first.lstrip().startswith(b"[")
                 else _json_lines(first, chunks))
    else:
        items = source  # an iterable of runs or dicts
    for n, item in enumerate(items, 1):
        yield (n, *_validated(n, item))


def _validated(n: int, item: object) -> tuple[Run, dict[str, Any]]:
    extra: dict[str, Any] = {}
    if isinstance(item, Run):
        run = item
    elif isinstance(item, dict):
        try:
            run = _fields.run_from_dict(item)
        except _fields.BadLine as exc:
            raise InvalidRunError(f"record {n} ({item.get('id', '?')!r}): {exc.reason}; "
                                  "nothing was imported") from None
        extra = _fields.kept_fields(item)
        problem = _fields.extra_problem(extra)
        if problem is not None:
            raise InvalidRunError(f"record {n} ({run.id!r}): {problem}; nothing was "
                                  "imported")
    else:
        raise InvalidRunError(f"record {n} is not a run object: {item!r}; "
                              "nothing was imported")
    try:
        _transitions.require_text("id", run.id)
        run = _transitions.validate(run)
        _fields.checked_fields(run, extra)
    except InvalidRunError as exc:
        raise InvalidRunError(f"record {n}: {exc}; nothing was imported") from None
    if run.revision < 1:
        run = attrs.evolve(run, revision=1)
    return run, extra
