"""The on-disk format: the one cattrs/orjson converter, the journal's lines and its version.

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
Run fields use their snake_case names; unset pointers are ``null``; ``batch_id``,
``plan_entry`` and the owner fields are omitted when empty. Fields this library does not know
are kept when a record is rewritten.

A line's kind is its first key, as the encoder writes it: ``seq`` for a record, ``mark`` for
a mark (``is_mark``); a run's fields never decide it. A kept field may not be named like a
meta field or ``mark`` (``RESERVED_KEYS``), nor hold what a line cannot hold exactly
(``extra_problem``), and a run's record is at most ``MAX_RECORD_BYTES`` (``checked_fields``).
Format version 2 says so; a version 1 journal is read as version 1 read it (``is_mark``).
"""

from __future__ import annotations

import datetime as _dt
import math
import operator
import re
import zlib
from collections.abc import Callable
from typing import Any

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_unstructure_fn, override

from .errors import InvalidRunError
from .model import ChangeType, Run, Status

FORMAT_NAME = "runstore-journal"
#: 2: a line's kind is its first key (``is_mark``) and a record never carries a field named
#: like a meta field; version 1 journals are still read, as version 1 read them
FORMAT_VERSION = 2
#: the first format version whose lines are told apart by their first key alone
KINDS_BY_FIRST_KEY = 2

#: keys of a record line that are not run fields
META_KEYS = frozenset({"seq", "change", "time", "durable", "crc"})
#: names a run's kept fields may not have: the meta fields of a record line and the key
#: that begins a mark line (a record holding one would be written twice over, or, for
#: a version 1 reader, be taken for a mark)
RESERVED_KEYS = META_KEYS | {"mark"}
#: how a record line begins (``encode_record`` writes ``seq`` first) and how a mark line
#: does (``encode_mark``, ``encode_checkpoint``)
RECORD_START = b'{"seq":'
MARK_START = b'{"mark":'
#: the most bytes a run's record may take (its id and other fields as a journal line holds
#: them, kept fields included; the line adds its meta fields, under 200 bytes): a larger
#: one is refused when written, on every backend (``checked_fields``)
MAX_RECORD_BYTES = 1 << 20
#: how deeply a kept field's value may nest lists and objects
MAX_FIELD_DEPTH = 64
#: the integers a kept field may hold: what a journal line can hold (orjson: 64 bits)
_INT_RANGE = range(-(1 << 63), 1 << 64)
RUN_FIELDS = tuple(a.name for a in attrs.fields(Run))
_RUN_FIELD_SET = frozenset(RUN_FIELDS)
_KNOWN_KEYS = _RUN_FIELD_SET | META_KEYS
#: omitted from the JSON when they hold these values
_OMIT_WHEN = {
    "batch_id": "",
    "plan_entry": "",
    "owner_host": "",
    "owner_pid": None,
    "owner_start": "",
    "heartbeat_at": None,
}
_STATUS_VALUES = frozenset(s.value for s in Status)
_STATUS_OF = {s.value: s for s in Status}
_CHANGE_VALUES = frozenset(c.value for c in ChangeType)
_KEEP = object()
#: the field order of a record: id first, then the rest in ``Run``'s order
_SEED_ORDER = ("id", *(name for name in RUN_FIELDS if name != "id"))
_CRC_SEP = b',"crc":'
_DURABLE_FIELD = re.compile(rb'"durable":\d+')
_DUMPS_OPTS = orjson.OPT_UTC_Z


class BadLine(Exception):
    """A line that fails to decode; ``reason`` says why (internal to the journal reader)."""

    def __init__(self, reason: str, *, torn: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        #: True when the line fails its checksum (what a torn write looks like); a line that
        #: passes it but is otherwise wrong was written that way and is never a torn write
        self.torn = torn


def _structure_datetime(value: Any, _type: Any) -> _dt.datetime:
    if not isinstance(value, str):
        raise TypeError(f"expected an RFC 3339 string, got {type(value).__name__}")
    moment = _dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no UTC offset")
    return moment.astimezone(_dt.UTC)


def _structure_strict(kind: type[Any]) -> Any:
    def hook(value: Any, _type: Any) -> Any:
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return hook


def configure_converter(converter: cattrs.Converter) -> None:
    """Teach a converter runstore's rules: strict scalar types, aware UTC datetimes."""
    converter.register_structure_hook(_dt.datetime, _structure_datetime)
    converter.register_unstructure_hook(_dt.datetime, lambda d: d)  # orjson writes RFC 3339
    converter.register_structure_hook(str, _structure_strict(str))
    converter.register_structure_hook(int, _structure_strict(int))
    converter.register_structure_hook(Status, lambda value, _type: Status(value))


def make_converter() -> cattrs.Converter:
    """Return a converter configured for runstore records."""
    converter = cattrs.Converter(detailed_validation=True)
    configure_converter(converter)
    return converter


converter = make_converter()


#: the ``_OMIT_WHEN`` fields that come last in a run: cattrs's generated code can leave them
#: out (it adds the fields it may omit after the others, so the order stays ``_SEED_ORDER``)
_OMIT_LAST = ("owner_host", "owner_pid", "owner_start", "heartbeat_at")
#: ... and those before ``revision``, left out by ``record_fields`` itself
_OMIT_INNER = tuple(name for name in _OMIT_WHEN if name not in _OMIT_LAST)
#: a run's fields for its journal line but ``id`` and ``status`` (they come first, with the
#: meta fields)
_FIELD_OVERRIDES: dict[str, Any] = {
    "id": override(omit=True), "status": override(omit=True),
    **{name: override(omit_if_default=True) for name in _OMIT_LAST}}
_unstructure_fields = make_dict_unstructure_fn(Run, converter, **_FIELD_OVERRIDES)


def run_to_dict(run: Run) -> dict[str, Any]:
    """The JSON-ready record of a run: snake_case field names, empty optional fields omitted."""
    raw: dict[str, Any] = converter.unstructure(run)
    return {k: raw[k] for k in _SEED_ORDER if raw[k] != _OMIT_WHEN.get(k, _KEEP)}


def run_to_json(run: Run) -> dict[str, Any]:
    """Like ``run_to_dict`` but with plain JSON values (strings for statuses and times)."""
    data: dict[str, Any] = orjson.loads(orjson.dumps(run_to_dict(run), option=_DUMPS_OPTS))
    return data


def run_from_dict(data: dict[str, Any]) -> Run:
    """Structure a record into a ``Run``; raises ``BadLine`` naming the bad field. A record
    whose fields are as this library writes them (``fields_sound``) is made without the
    converter, which takes several times as long: the same ``Run``."""
    sound = _sound_values(data)
    if sound is not None:
        layout, values = sound
        fields = dict(zip(layout.names, values, strict=True))
        for i in layout.times:
            if values[i] is not None:  # "...Z": aware, in UTC, as the converter makes it
                fields[layout.names[i]] = _dt.datetime.fromisoformat(values[i])
        fields["status"] = _STATUS_OF[fields["status"]]
        return Run(**fields)
    fields = {k: v for k, v in data.items() if k in _RUN_FIELD_SET}
    try:
        return converter.structure(fields, Run)
    except Exception as exc:  # cattrs raises an ExceptionGroup of per-field errors
        messages = cattrs.transform_error(exc, path="record") if isinstance(
            exc, cattrs.BaseValidationError) else [str(exc)]
        raise BadLine("; ".join(messages)) from None


#: how ``run_from_dict`` takes each run field: the types of value it accepts
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    a.name: ((str,) if a.type in (str, Status) else (int,) if a.type is int
             else (str, type(None)) if a.type == (_dt.datetime | None)
             else (int, type(None)) if a.type == (int | None) else ())
    for a in attrs.fields(Run)}
assert all(_FIELD_TYPES.values()), _FIELD_TYPES  # a new kind of field: teach it here
#: at most how many key layouts and type combinations ``exported_dict`` remembers (a few
#: occur: which optional fields are set, and any fields this library does not know)
_CACHE_LIMIT = 1024
#: a timestamp exactly as this library writes one (``dumps``: UTC, ``Z``, microseconds
#: only when not zero)
_CANONICAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                             r"(?:\.(?!000000)[0-9]{6})?Z")



def _sound_record_pattern() -> re.Pattern[bytes]:
    """A record line (without its newline) in the form this library writes, every value
    of a type ``check_record`` and ``fields_sound`` take and in no form ``orjson`` refuses
    or writes otherwise: strings without escapes or control characters (the line must also
    be ASCII), integers within 64 bits in their shortest form, timestamps canonical
    (``_CANONICAL_TIME``; the ``t<n>`` groups, still to be checked as dates), run fields in
    ``Run``'s order, those left out when empty optional and then not empty, nothing else.
    Its ``seq``, ``durable``, ``crc`` groups and the bytes before ``,"crc":`` (group
    ``body``) are what a reader checks of it; ``id``, ``status`` and ``st`` (where the
    status comes among the run fields) are what ``sound_export`` moves."""
    text = rb'"[^"\\\x00-\x1f]*"'
    filled = rb'"[^"\\\x00-\x1f]+"'
    integer = rb"(?:0|-?[1-9][0-9]{0,17})"
    time = b'"(' + _CANONICAL_TIME.pattern.encode() + b')"'
    parts = [rb'\{"seq":(?P<seq>[1-9][0-9]{0,17}),"id":"(?P<id>[^"\\\x00-\x1f]+)",'
             rb'"status":"(?P<status>'
             + b"|".join(re.escape(v.encode()) for v in sorted(_STATUS_VALUES))
             + rb')","change":"(?:'
             + b"|".join(re.escape(v.encode()) for v in sorted(_CHANGE_VALUES))
             + rb')","time":' + text + rb',"durable":(?P<durable>0|[1-9][0-9]{0,17})']
    times = 0
    after_status = False
    for name in RUN_FIELDS:
        if name == "status":
            after_status = True
            parts.append(b"(?P<st>)")
        if name in ("id", "status"):
            continue
        assert after_status or name not in _OMIT_WHEN, name  # the status goes before it
        kind = _FIELD_TYPES[name]
        optional = name in _OMIT_WHEN
        if kind == (str,):
            value = filled if optional else text
        elif kind == (int,):
            value = integer
        elif kind == (str, type(None)):
            value = time.replace(b"(", b"(?P<t%d>" % times, 1)
            value = value if optional else b"(?:" + value + b"|null)"
            times += 1
        else:
            assert kind == (int, type(None)), kind
            value = integer if optional else b"(?:" + integer + b"|null)"
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


@attrs.define
class _Layout:
    """How ``exported_dict`` reads the records whose keys come in one order: the run fields
    present (in the run's field order), where the timestamps and the status are among them, the
    fields left out when empty that are present, the extra fields."""

    names: tuple[str, ...]
    get: Callable[[dict[str, Any]], tuple[Any, ...]]
    times: tuple[int, ...]
    status_at: int
    omit: tuple[tuple[str, Any], ...]
    extra: tuple[str, ...]
    #: the types of the values (in ``names`` order) -> whether ``run_from_dict`` takes them
    sound: dict[tuple[type, ...], bool] = attrs.field(factory=dict)


_layouts: dict[tuple[str, ...], _Layout | None] = {}


def _layout(keys: tuple[str, ...]) -> _Layout | None:
    """The ``_Layout`` of records with these keys; None when a run field that a record
    always holds (one not left out when empty) is missing: such a record goes through its
    ``Run`` (which refuses it, or takes the field's default)."""
    present = set(keys)
    if any(name not in present and name not in _OMIT_WHEN for name in _SEED_ORDER):
        return None
    names = tuple(name for name in _SEED_ORDER if name in present)
    return _Layout(names=names, get=operator.itemgetter(*names),
                   times=tuple(i for i, name in enumerate(names)
                               if _FIELD_TYPES[name] == (str, type(None))),
                   status_at=names.index("status"),
                   omit=tuple((name, _OMIT_WHEN[name]) for name in names
                              if name in _OMIT_WHEN),
                   extra=tuple(key for key in keys if key not in _KNOWN_KEYS))


def exported_dict(data: dict[str, Any], extras: bool = True) -> dict[str, Any] | None:
    """``run_to_dict(run_from_dict(data))`` (then, with ``extras``, the record's extra fields
    after it, as ``export`` writes a run), built straight from a decoded record whose run
    fields are each of a type ``run_from_dict`` takes and, for timestamps, written as this
    library writes them; None for any other record (the caller then structures it, which
    refuses it or writes its values as a ``Run`` holds them). No ``Run`` is built: this is
    the cost of ``export`` and ``list --json`` per run."""
    sound = _sound_values(data)
    if sound is None:
        return None
    layout, values = sound
    out = dict(zip(layout.names, values, strict=True))
    for name, omitted in layout.omit:
        if out[name] == omitted:
            del out[name]
    if extras:
        for key in layout.extra:
            out.setdefault(key, data[key])
    return out


def fields_sound(data: dict[str, Any]) -> bool:
    """Whether ``exported_dict`` takes a record: then ``run_from_dict`` takes it too (its
    run fields are all there and of the types it takes), without a ``Run`` being built;
    False says nothing (call ``run_from_dict`` to know)."""
    return _sound_values(data) is not None


def _sound_values(data: dict[str, Any]) -> tuple[_Layout, tuple[Any, ...]] | None:
    """The ``_Layout`` of a record and its run fields' values, when ``exported_dict`` can
    take it (see there), else None."""
    keys = tuple(data)
    layout = _layouts.get(keys, _KEEP)
    if layout is _KEEP:
        layout = _layout(keys)
        if len(_layouts) < _CACHE_LIMIT:
            _layouts[keys] = layout
    if layout is None:
        return None
    assert isinstance(layout, _Layout)
    values = layout.get(data)
    types = tuple(map(type, values))
    sound = layout.sound.get(types)
    if sound is None:
        sound = all(t in _FIELD_TYPES[name] for name, t in zip(layout.names, types,
                                                               strict=True))
        if len(layout.sound) < _CACHE_LIMIT:
            layout.sound[types] = sound
    if not sound or values[layout.status_at] not in _STATUS_VALUES:
        return None
    for i in layout.times:
        value = values[i]
        if value is not None:
            if _CANONICAL_TIME.fullmatch(value) is None:
                return None
            try:
                _dt.datetime.fromisoformat(value)
            except ValueError:
                return None
    return layout, values


def extra_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Fields of a record line this library does not know (kept when rewriting)."""
    if data.keys() <= _KNOWN_KEYS:  # the usual case, checked at C speed on the hot path
        return {}
    return {k: v for k, v in data.items() if k not in _KNOWN_KEYS}


def kept_fields(data: dict[Any, Any]) -> dict[Any, Any]:
    """The fields of a record to import that are not run fields, reserved names included
    (``extra_problem`` refuses those, where ``extra_fields`` leaves a line's meta out)."""
    return {k: v for k, v in data.items() if k not in _RUN_FIELD_SET}


def extra_problem(extra: dict[Any, Any]) -> str | None:
    """What keeps a run's kept fields (those this library does not know) from being stored
    and read back exactly, naming the field (``'name'``, ``'name'.key[3]`` inside it), or
    None. Refused: a name the journal format uses for itself (``RESERVED_KEYS``), a key
    that is not a string, and anywhere inside a value: a value that is not JSON (a tuple,
    a set, a date, ...), an integer beyond 64 bits, a float that is not finite, a string
    or key holding a lone surrogate or a NUL character (PostgreSQL's ``jsonb`` cannot
    hold one), lists and objects nested deeper than ``MAX_FIELD_DEPTH``."""
    for key in extra:
        if not isinstance(key, str):
            return f"field {key!r}: a field name must be a string"
        problem = _text_problem(key)
        if problem is not None:
            return f"field {key!r}: the name {problem}"
        if key in RESERVED_KEYS:
            return (f"field {key!r}: the name is reserved for the journal's own use (fields "
                    f"may not be named {', '.join(sorted(RESERVED_KEYS))}); rename it")
    stack: list[tuple[str, Any, int]] = [(repr(key), value, 1) for key, value in extra.items()]
    while stack:
        path, value, depth = stack.pop()
        problem = _value_problem(value)
        if problem is not None:
            return f"field {path}: {problem}"
        if isinstance(value, dict | list):
            if depth > MAX_FIELD_DEPTH:
                return (f"field {path}: nested deeper than {MAX_FIELD_DEPTH} lists and "
                        "objects")
            if isinstance(value, list):
                stack.extend((f"{path}[{n}]", item, depth + 1) for n, item in enumerate(value))
                continue
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"field {path}: the key {key!r} is not a string"
                problem = _text_problem(key)
                if problem is not None:
                    return f"field {path}: the key {key!r} {problem}"
                stack.append((f"{path}.{key}", item, depth + 1))
    return None


def _value_problem(value: Any) -> str | None:
    """Why one JSON value (not looking inside lists and objects) cannot be kept, or None."""
    if value is None or isinstance(value, bool | dict | list):
        return None
    if isinstance(value, str):
        problem = _text_problem(value)
        return None if problem is None else f"the string {problem}"
    if isinstance(value, int):
        return None if value in _INT_RANGE else f"the integer {value} does not fit in 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a finite number"
    return f"a {type(value).__name__} is not a JSON value"


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "holds a lone surrogate (not valid UTF-8)"
    return None


def checked_fields(run: Run, extra: dict[str, Any] | None = None,
                   fields: bytes | None = None) -> bytes:
    """``record_fields(run, extra)`` (or ``fields``, made by it beforehand), once it is
    known to be storable: ``InvalidRunError`` naming the run and the size when its record
    (``fields`` and its id) is larger than ``MAX_RECORD_BYTES``, or the field that cannot be
    written as JSON. The one check of every backend's writes."""
    try:
        if fields is None:
            fields = record_fields(run, extra)
        rid = run.id  # as a JSON string: between quotes, unescaped, when plain ASCII
        plain = rid.isascii() and rid.isprintable() and '"' not in rid and "\\" not in rid
        size = len(fields) + (len(rid) + 2 if plain else len(json_string(rid)))
    except orjson.JSONEncodeError as exc:
        raise InvalidRunError(f"run {_short(run.id)} cannot be stored: "
                              f"{_unwritable(run, extra) or exc}") from None
    if size > MAX_RECORD_BYTES:
        raise InvalidRunError(
            f"run {_short(run.id)} (machine {_short(run.machine)}) is {size} bytes as "
            f"stored, more than the {MAX_RECORD_BYTES} a run may take "
            f"(runstore.MAX_RECORD_BYTES); its largest field is {_short(_largest(run, extra))}"
            ": shorten it, or keep large data in a file and store its path (artifacts_path, "
            "logs_path); nothing was stored")
    return fields


def _short(text: str, limit: int = 80) -> str:
    """``text`` quoted for an error, cut short when long."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} chars)"


def _fields_of(run: Run, extra: dict[str, Any] | None) -> dict[str, Any]:
    return {**(extra or {}), **converter.unstructure(run)}


def _unwritable(run: Run, extra: dict[str, Any] | None) -> str:
    """Which field of a run cannot be written as JSON (for an error)."""
    for name, value in _fields_of(run, extra).items():
        try:
            orjson.dumps({name: value}, option=_DUMPS_OPTS)
        except orjson.JSONEncodeError as exc:
            return f"its field {name!r} cannot be written as JSON ({exc})"
    return ""


def _largest(run: Run, extra: dict[str, Any] | None) -> str:
    """The name of the largest field of a run as stored (for an error)."""
    sizes = {name: len(orjson.dumps(value, option=_DUMPS_OPTS))
             for name, value in _fields_of(run, extra).items()}
    return max(sizes, key=sizes.__getitem__)


def json_string(text: str) -> bytes:
    """``text`` as a JSON string, quotes included, as a record line holds it."""
    return orjson.dumps(text)


def dumps(data: dict[str, Any]) -> bytes:
    """One JSON object in runstore's style (RFC 3339 UTC timestamps with Z)."""
    return orjson.dumps(data, option=_DUMPS_OPTS)


def _seal(body: dict[str, Any]) -> bytes:
    return _sealed(orjson.dumps(body, option=_DUMPS_OPTS)[:-1])


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


def record_fields(run: Run, extra: dict[str, Any] | None = None) -> bytes:
    """The fields of a run's journal line after its meta fields (``"machine":...``, without
    braces); ``extra`` are fields of the stored record this library does not know. Made
    apart from the meta fields so that a store can make it before it takes the lock."""
    fields = _unstructure_fields(run)
    for name in _OMIT_INNER:
        if not fields[name]:
            del fields[name]
    if extra:
        for key, value in extra.items():
            fields.setdefault(key, value)
    return orjson.dumps(fields, option=_DUMPS_OPTS)[1:-1]


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
                         "time": time, "durable": durable}, option=_DUMPS_OPTS)
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
    if cut < 0 or not line.endswith(b"}"):
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
    if line.startswith(MARK_START):
        return True
    if not line.startswith(RECORD_START):
        raise BadLine('neither a record nor a mark line (it does not begin with "seq" or '
                      '"mark", as runstore writes them)')
    return legacy and "mark" in data


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
    if status not in _STATUS_VALUES:
        raise BadLine(f"unknown status {status!r} for run {run_id!r}") from None
    change = data.get("change")
    if change not in _CHANGE_VALUES:
        raise BadLine(f"unknown change type {change!r} for run {run_id!r}") from None


def reseal(data: dict[str, Any]) -> bytes:
    """Re-encode a decoded line (used when rewriting records with fields we do not know)."""
    body = {k: v for k, v in data.items() if k != "crc"}
    return _seal(body)
