"""The journal's lines and its version: records, marks, checkpoints and the header.

A journal is a JSON-lines file. Every line is one JSON object ending in a checksum field, so a
line can be read by ``jq`` and still be self-validating::

    {"format":"runstore-journal","version":1,"store_id":"…","created":"…",
     "compacted_through":0,"base_bytes":0,"crc":123}                          header, line 1
    {"seq":1,"id":"…","status":"pending","change":"run_created","time":"…","durable":230,
     "machine":"m1","test_dir":"…",…,"revision":1,"crc":456}                    one run version
    {"mark":"clean_close","durable":1234,"crc":789}                             written by close()

``crc`` is the CRC-32 of the line's bytes before ``,"crc":``. ``seq`` is store-wide, strictly
increasing and gap-free after the header's ``compacted_through``. ``durable`` is the length of
the file that was known to be synced when the line was written (it lags one sync behind); the
store uses it to tell a torn tail (truncated) from damage in durable data (an error).
A run's fields, and the checks they pass, are ``_fields``'. Fields this library does not
know are kept when a record is rewritten.

A line's kind is its first key, as the encoder writes it: ``seq`` for a record, ``mark`` for
a mark (``is_mark``); a run's fields never decide it. A kept field may not be named like a
meta field or ``mark`` (``RESERVED_KEYS``), nor hold what a line cannot hold exactly
(``extra_problem``), and a run's record is at most ``MAX_RECORD_BYTES`` (``checked_fields``).
Format version 2 says so; a version 1 journal is read as version 1 read it (``is_mark``).
"""

from __future__ import annotations

import datetime as _dt
import re
import zlib
from typing import Any

import attrs
import orjson

from ._fields import (
    DUMPS_OPTS,
    FIELD_TYPES,
    STATUS_VALUES,
    BadLine,
    record_fields,
    run_to_json,
)
from .model import ChangeType, Run

FORMAT_NAME = "runstore-journal"

#: 2: a line's kind is its first key (``is_mark``) and a record never carries a field named
#: like a meta field; version 1 journals are still read, as version 1 read them
FORMAT_VERSION = 2

#: the first format version whose lines are told apart by their first key alone
KINDS_BY_FIRST_KEY = 2

#: how a record line begins (``encode_record`` writes ``seq`` first) and how a mark line
#: does (``encode_mark``, ``encode_checkpoint``)
RECORD_START = b'{"seq":'

MARK_START = b'{"mark":'

#: a line's last byte, ``}`` (indexing a byte is cheaper than ``bytes.endswith``)
_CLOSE = ord("}")

CHANGE_VALUES = frozenset(c.value for c in ChangeType)

_CRC_SEP = b',"crc":'

_DURABLE_FIELD = re.compile(rb'"durable":\d+')

assert all(FIELD_TYPES.values()), FIELD_TYPES  # a new kind of field: teach it here

def dumps(data: dict[str, Any]) -> bytes:
    """One JSON object in runstore's style (RFC 3339 UTC timestamps with Z)."""
    return orjson.dumps(data, option=DUMPS_OPTS)

def _seal(body: dict[str, Any]) -> bytes:
    return _sealed(orjson.dumps(body, option=DUMPS_OPTS)[:-1])

def _sealed(head: bytes) -> bytes:
    """A journal line from ``head``, a JSON object without its closing brace: the CRC-32 of
    ``head`` as its last field, the brace and the newline."""
    return b"%s%s%d}\n" % (head, _CRC_SEP, zlib.crc32(head))

def restamp(line: bytes, durable: int) -> bytes:
    """A record line (without its newline) with its durable mark set to ``durable`` and
    sealed again, for its place in a rewritten file (``compaction.reseal_tail``). Raises
    ``BadLine`` when it has no durable mark. A key is found by its quotes: inside a string
    value a quote is escaped, so ``"durable":`` cannot occur there."""
    cut = line.rfind(_CRC_SEP)
    head, found = _DURABLE_FIELD.subn(b'"durable":%d' % durable, line[:max(cut, 0)], count=1)
    if not found:
        raise BadLine("no durable mark to restamp")
    return _sealed(head)

def encode_record(
    seq: int,
    change: ChangeType,
    time: _dt.datetime,
    durable: int,
    run: Run,
    extra: dict[str, Any] | None = None,
    fields: bytes | None = None,
) -> bytes:
    """One journal line for one version of a run: the meta fields (``seq``, ``id``,
    ``status``, ``change``, ``time``, ``durable``), the run's other fields (``fields`` when
    made beforehand by ``record_fields``), and the CRC-32 of all that."""
    if fields is None:
        fields = record_fields(run, extra)
    meta = orjson.dumps({"seq": seq, "id": run.id, "status": run.status, "change": change,
                         "time": time, "durable": durable}, option=DUMPS_OPTS)
    return _sealed(b"%s,%s" % (meta[:-1], fields))

def encode_header(
    store_id: str,
    created: str,
    compacted_through: int,
    base_bytes: int,
    history_bytes: int,
    summary: BaseSummary | None = None,
) -> bytes:
    """The first line of a journal: ``base_bytes`` of latest run versions follow it, then
    ``history_bytes`` of retained changes from ``compacted_through + 1`` on. A compaction
    adds ``summary`` so that opening need not parse the base (see ``BaseSummary``)."""
    body: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "store_id": store_id,
        "created": created,
        "compacted_through": compacted_through,
        "base_bytes": base_bytes,
        "history_bytes": history_bytes,
    }
    if summary is not None:
        body.update(base_lines=summary.lines, base_crc=summary.crc, max_id=summary.max_id,
                    active=list(summary.active))
    return _seal(body)

@attrs.frozen
class BaseSummary:
    """What a compaction knows about the base it wrote, kept in the header so that opening
    reads the base once at checksum speed instead of parsing it: how many latest-version
    lines it holds, the CRC-32 of all its bytes (latest versions and retained history), the
    greatest run id, and where the non-terminal runs are (offsets from the header's end)."""

    lines: int
    crc: int
    max_id: str
    active: tuple[int, ...]

    @classmethod
    def from_header(cls, data: dict[str, Any]) -> BaseSummary | None:
        """The summary in a decoded header, or None when absent or not well formed (then
        the reader parses the base line by line, as for a header written before it)."""
        lines, crc, max_id, active = (data.get(k) for k in ("base_lines", "base_crc",
                                                             "max_id", "active"))
        if (type(lines) is not int or lines < 0 or type(crc) is not int
                or not isinstance(max_id, str) or not isinstance(active, list)
                or not all(type(a) is int and a >= 0 for a in active)):
            return None
        return cls(lines=lines, crc=crc, max_id=max_id, active=tuple(active))

#: a newline and the start of a record line up to its id (``seq`` then ``id`` always come
#: first); search ``b"\n" + chunk``: a literal prefix lets the regex engine skip ahead, where
#: ``^`` with MULTILINE would try every byte. ``m.start()`` is then the line's offset in chunk.
RECORD_ID = re.compile(rb'\n\{"seq":\d+,"id":"([^"\\\n]*)",')

def change_to_json(seq: int, time: _dt.datetime, change: ChangeType, run: Run) -> dict[str, Any]:
    """The JSON shape of a change (snake_case, string enums), for the CLI and other languages."""
    return {"seq": seq, "time": time.isoformat().replace("+00:00", "Z"), "type": change.value,
            "run": run_to_json(run)}

def seal_line(body: dict[str, Any]) -> bytes:
    """``body`` as one line ending in its checksum field, as every journal line does (the
    lock file's record of what was synced uses it too: ``_vouch.Vouch``)."""
    return _seal(body)

def encode_mark(durable: int) -> bytes:
    """The line ``close()`` appends: everything before ``durable`` is synced."""
    return _seal({"mark": "clean_close", "durable": durable})

#: how a checkpoint line begins (``encode_checkpoint``)
CHECKPOINT_START = b'{"mark":"checkpoint",'

@attrs.frozen
class Checkpoint:
    """What a checkpoint line says of the view of every line before it, so that opening
    need not read them: the seq of the next record, how many record lines and runs there
    are, the greatest run id and where the non-terminal runs' latest versions are (absolute
    offsets, in insertion order). Its ``durable`` mark is a mark's: everything before it was
    synced when the line was written; ``boot`` names the machine's boot it was written in
    (``owner.boot_id``): until a reboot, what was written and not synced is intact too."""

    durable: int
    next_seq: int
    lines: int
    runs: int
    max_id: str
    active: tuple[int, ...]
    boot: str = ""

    @classmethod
    def from_mark(cls, data: dict[str, Any]) -> Checkpoint | None:
        """The checkpoint in a decoded mark line, or None when it is not a well-formed one."""
        if data.get("mark") != "checkpoint":
            return None
        durable, next_seq, lines, runs, max_id, active, boot = (
            data.get(k) for k in ("durable", "next_seq", "lines", "runs", "max_id", "active",
                                  "boot"))
        if (type(durable) is not int or durable < 0 or type(next_seq) is not int
                or next_seq < 1 or type(lines) is not int or lines < 0
                or type(runs) is not int or runs < 0 or not isinstance(max_id, str)
                or not isinstance(active, list)
                or not all(type(a) is int and a >= 0 for a in active)
                or not isinstance(boot, str | None)):
            return None
        return cls(durable=durable, next_seq=next_seq, lines=lines, runs=runs,
                   max_id=max_id, active=tuple(active), boot=boot or "")

def encode_checkpoint(point: Checkpoint) -> bytes:
    """A checkpoint line (``Checkpoint``); readers that do not know it take it as a mark."""
    return _seal({"mark": "checkpoint", "durable": point.durable, "next_seq": point.next_seq,
                  "lines": point.lines, "runs": point.runs, "max_id": point.max_id,
                  "boot": point.boot, "active": list(point.active)})

def decode_line(line: bytes) -> dict[str, Any]:
    """Parse and verify one line (without its newline); raise ``BadLine`` if it is not sound."""
    cut = line.rfind(_CRC_SEP)
    if cut < 0 or line[-1] != _CLOSE:  # (not empty when it holds the separator)
        raise BadLine("no checksum field (torn, truncated or not written by runstore)", torn=True)
    try:
        expected = int(line[cut + len(_CRC_SEP):-1])
    except ValueError:
        raise BadLine("malformed checksum field", torn=True) from None
    if zlib.crc32(line[:cut]) != expected:
        raise BadLine("checksum mismatch (the line was altered or torn)", torn=True)
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadLine(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadLine("not a JSON object")
    return data

def is_mark(line: bytes, data: dict[str, Any], legacy: bool = False) -> bool:
    """Whether ``line``, decoded as ``data`` (``decode_line``), is a mark line rather than
    a record: told by its first key, which the encoder writes (``"mark"`` or ``"seq"``) and
    no field value can change, where a key found anywhere in the line could be a run's.
    ``legacy``: the line is in a version 1 journal, whose readers took every line with a
    top-level ``mark`` key for a mark; a record that carried a kept field of that name was
    read (and lost) as a mark then, and later seqs were handed out again past it, so it is
    read the same way still (``check`` reports it). Raises ``BadLine`` for a line that
    begins with neither key."""
    if line.startswith(RECORD_START):  # the common line first: one test for a record
        return legacy and "mark" in data
    if not line.startswith(MARK_START):
        raise BadLine('neither a record nor a mark line (it does not begin with "seq" or '
                      '"mark", as runstore writes them)')
    return True

def check_record(data: dict[str, Any]) -> None:
    """Raise ``BadLine`` unless a decoded record has sound meta fields and a known status."""
    seq, durable = data.get("seq"), data.get("durable")
    if type(seq) is not int or seq < 1:
        raise BadLine(f"bad seq {seq!r}")
    if type(durable) is not int or durable < 0:
        raise BadLine(f"bad durable mark {durable!r}")
    run_id = data.get("id")
    if not isinstance(run_id, str) or not run_id:
        raise BadLine(f"bad run id {run_id!r}")
    status = data.get("status")
    if status not in STATUS_VALUES:
        raise BadLine(f"unknown status {status!r} for run {run_id!r}") from None
    change = data.get("change")
    if change not in CHANGE_VALUES:
        raise BadLine(f"unknown change type {change!r} for run {run_id!r}") from None

def reseal(data: dict[str, Any]) -> bytes:
    """Re-encode a decoded line (used when rewriting records with fields we do not know)."""
    body = {k: v for k, v in data.items() if k != "crc"}
    return _seal(body)
