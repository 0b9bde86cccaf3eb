"""Record lines proven sound from their bytes, read without decoding them.

A line ``SOUND_RECORD`` matches in full, that is ASCII, whose CRC-32 holds and whose
timestamps are dates, is exactly what this library writes for a record: decoding it would
give nothing ``check`` refuses. ``check``, ``export``, ``list`` and ``prune --archive`` read
such lines from their bytes (``sound_export`` moves them into an exported run's JSON,
``sound_row`` takes the fields ``list``'s table shows); any other line is decoded and
judged as before, so no damage goes unreported.
"""

from __future__ import annotations

import datetime as _dt
import re
import zlib

from ._codec import CHANGE_VALUES
from ._fields import CANONICAL_TIME, FIELD_TYPES, OMIT_WHEN, RUN_FIELDS, STATUS_VALUES

#: the run fields besides id and status that ``list`` shows, named groups of the pattern
_LISTED = ("machine", "test_dir_hash", "exit_code")
#: the string fields a run must not leave empty (``_validate.run``: a write refuses it)
_NON_EMPTY = ("machine", "test_dir_hash")


def _sound_record_pattern() -> re.Pattern[bytes]:
    """A record line (without its newline) in the form this library writes, every value
    of a type ``check_record`` and ``fields_sound`` take and in no form ``orjson`` refuses
    or writes otherwise: strings without escapes or control characters (the line must also
    be ASCII), integers within 64 bits in their shortest form, timestamps canonical
    (``CANONICAL_TIME``; the ``t<n>`` groups, still to be checked as dates, and the change's
    ``time``, which only ``check`` needs to be one), run fields in ``Run``'s order, those
    left out when empty optional and then not empty, machine and test_dir_hash not empty
    (as a write requires), nothing else.
    Its ``seq``, ``durable``, ``crc`` groups and the bytes before ``,"crc":`` (group
    ``body``) are what a reader checks of it (``check`` also ``change``); ``id``, ``status``
    and ``st`` (where the status comes among the run fields) are what ``sound_export``
    moves; ``id``, ``status``, the ``_LISTED`` groups and the first two times what
    ``sound_row`` gives."""
    text = rb'"[^"\\\x00-\x1f]*"'
    filled = rb'"[^"\\\x00-\x1f]+"'
    integer = rb"(?:0|-?[1-9][0-9]{0,17})"
    time = b'"(' + CANONICAL_TIME.pattern.encode() + b')"'
    parts = [rb'\{"seq":(?P<seq>[1-9][0-9]{0,17}),"id":"(?P<id>[^"\\\x00-\x1f]+)",'
             rb'"status":"(?P<status>'
             + b"|".join(re.escape(v.encode()) for v in sorted(STATUS_VALUES))
             + rb')","change":"(?P<change>'
             + b"|".join(re.escape(v.encode()) for v in sorted(CHANGE_VALUES))
             + rb')","time":' + time.replace(b"(", b"(?P<time>", 1)
             + rb',"durable":(?P<durable>0|[1-9][0-9]{0,17})']
    times = 0
    after_status = False
    for name in RUN_FIELDS:
        if name == "status":
            after_status = True
            parts.append(b"(?P<st>)")
        if name in ("id", "status"):
            continue
        assert after_status or name not in OMIT_WHEN, name  # the status goes before it
        kind = FIELD_TYPES[name]
        optional = name in OMIT_WHEN
        if kind == (str,):
            value = filled if optional or name in _NON_EMPTY else text
        elif kind == (int,):
            value = integer
        elif kind == (str, type(None)):
            value = time.replace(b"(", b"(?P<t%d>" % times, 1)
            value = value if optional else b"(?:" + value + b"|null)"
            times += 1
        else:
            assert kind == (int, type(None)), kind
            value = integer if optional else b"(?:" + integer + b"|null)"
        if name in _LISTED:  # what ``sound_row`` reads (a string's characters, not quotes)
            quote = b'"' if kind == (str,) else b""
            inner = value[len(quote):len(value) - len(quote)]
            value = quote + b"(?P<" + name.encode() + b">" + inner + b")" + quote
        field = b',"' + name.encode() + b'":' + value
        parts.append(b"(?:" + field + b")?" if optional else field)
    return re.compile(b"(?P<body>" + b"".join(parts) + rb'),"crc":(?P<crc>0|[1-9][0-9]{0,9})\}')


#: ``_sound_record_pattern``: a line it matches in full, whose ``body`` has the CRC-32 in
#: ``crc``, whose ``t<n>`` groups are dates and that is ASCII, is a record ``decode_line``,
#: ``check_record`` and ``fields_sound`` all take (``check`` reads such lines without
#: decoding them; any other line is decoded and judged as before)
SOUND_RECORD = _sound_record_pattern()
SOUND_RECORD_TIMES = tuple(f"t{i}" for i in range(SOUND_RECORD.groups) if
                           f"t{i}" in SOUND_RECORD.groupindex)


def sound_dates(values: tuple[bytes | None, ...]) -> bool:
    """Whether each canonical timestamp of ``values`` (None: null or left out) is a date."""
    try:
        for value in values:
            if value is not None:
                _dt.datetime.fromisoformat(value.decode())
    except ValueError:
        return False
    return True


def sound_export(line: bytes) -> tuple[str, bytes] | None:
    """(run id, ``dumps(exported_dict(decode_line(line)))``) of a record line
    ``SOUND_RECORD`` proves sound (its CRC-32 and dates hold, it is ASCII), made by moving
    its bytes: the id first, the status among the run fields, the meta fields left out
    (what the decoding would make of it, at a fraction of the cost); None for any other
    line (decode it)."""
    m = SOUND_RECORD.fullmatch(line)
    if (m is None or not line.isascii() or zlib.crc32(line[:m.end("body")]) != int(m["crc"])
            or not sound_dates(m.group(*SOUND_RECORD_TIMES))):
        return None
    run_id, status, cut = m["id"], m["status"], m.start("st")
    return run_id.decode(), b'{"id":"%s"%s,"status":"%s"%s}' % (
        run_id, line[m.end("durable"):cut], status, line[cut:m.end("body")])


#: a row of ``list`` read from a sound line: id, machine, status, test_dir_hash, started_at
#: and ended_at (None when null or left out), exit_code (its digits, or None)
SoundRow = tuple[str, str, str, str, _dt.datetime | None, _dt.datetime | None, str | None]

#: ``SOUND_RECORD`` for the text of an ASCII line: its groups are ``str``, none to decode
_SOUND_TEXT = re.compile(SOUND_RECORD.pattern.decode("ascii"))

#: the groups ``sound_row`` reads
_ROW_GROUPS = ("id", "machine", "status", "test_dir_hash", "exit_code")
#: the times ``t0`` and ``t1`` are a run's first two, started_at and ended_at
assert [f for f in RUN_FIELDS if FIELD_TYPES[f] == (str, type(None))][:2] == [
    "started_at", "ended_at"]


def sound_row(line: bytes) -> tuple[str, SoundRow] | None:
    """(run id, the fields ``list`` shows) of a record line ``SOUND_RECORD`` proves sound
    and that holds no DEL character (so no field needs escaping for a terminal: the line
    is ASCII and its strings hold no other control character), read from its text as the
    decoding would give them; None for any other line (decode it)."""
    if not line.isascii() or b"\x7f" in line:
        return None
    m = _SOUND_TEXT.fullmatch(line.decode("ascii"))
    if m is None or zlib.crc32(line[:m.end("body")]) != int(m["crc"]):
        return None
    parse = _dt.datetime.fromisoformat
    started, ended, *others = m.group(*SOUND_RECORD_TIMES)
    try:
        start = None if started is None else parse(started)
        end = None if ended is None else parse(ended)
        for value in others:
            if value is not None:
                parse(value)
    except ValueError:  # not a date
        return None
    run_id, machine, status, digest, code = m.group(*_ROW_GROUPS)
    return run_id, (run_id, machine, status, digest, start, end,
                    None if code is None or code == "null" else code)
