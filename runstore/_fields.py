"""A run's fields as a journal line and an export hold them: the one cattrs converter, a
``Run`` to and from its dict, the fields this library does not know that an import keeps,
and the checks every stored record passes (``checked_fields``: no kept field named like a
meta field, nothing a line cannot hold exactly, at most ``MAX_RECORD_BYTES``).

Run fields use their snake_case names; unset pointers are ``null``; ``batch_id``,
``plan_entry`` and the owner fields are omitted when empty. ``BadLine`` is what decoding
raises for a record it cannot take (``codec`` reads lines with it too).
"""

from __future__ import annotations

import datetime as _dt
import math
import operator
import re
from collections.abc import Callable
from typing import Any

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_unstructure_fn, override

from .errors import InvalidRunError
from .model import Run, Status

#: keys of a record line that are not run fields
META_KEYS = frozenset({"seq", "change", "time", "durable", "crc"})

#: names a run's kept fields may not have: the meta fields of a record line and the key
#: that begins a mark line (a record holding one would be written twice over, or, for
#: a version 1 reader, be taken for a mark)
RESERVED_KEYS = META_KEYS | {"mark"}

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
OMIT_WHEN = {
    "batch_id": "",
    "plan_entry": "",
    "owner_host": "",
    "owner_pid": None,
    "owner_start": "",
    "heartbeat_at": None,
}

STATUS_VALUES = frozenset(s.value for s in Status)

_STATUS_OF = {s.value: s for s in Status}

_KEEP = object()

#: the field order of a record: id first, then the rest in ``Run``'s order
_SEED_ORDER = ("id", *(name for name in RUN_FIELDS if name != "id"))

DUMPS_OPTS = orjson.OPT_UTC_Z

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

#: the ``OMIT_WHEN`` fields that come last in a run: cattrs's generated code can leave them
#: out (it adds the fields it may omit after the others, so the order stays ``_SEED_ORDER``)
_OMIT_LAST = ("owner_host", "owner_pid", "owner_start", "heartbeat_at")

#: ... and those before ``revision``, left out by ``record_fields`` itself
_OMIT_INNER = tuple(name for name in OMIT_WHEN if name not in _OMIT_LAST)

#: a run's fields for its journal line but ``id`` and ``status`` (they come first, with the
#: meta fields)
_FIELD_OVERRIDES: dict[str, Any] = {
    "id": override(omit=True), "status": override(omit=True),
    **{name: override(omit_if_default=True) for name in _OMIT_LAST}}

_unstructure_fields = make_dict_unstructure_fn(Run, converter, **_FIELD_OVERRIDES)

def run_to_dict(run: Run) -> dict[str, Any]:
    """The JSON-ready record of a run: snake_case field names, empty optional fields omitted."""
    raw: dict[str, Any] = converter.unstructure(run)
    return {k: raw[k] for k in _SEED_ORDER if raw[k] != OMIT_WHEN.get(k, _KEEP)}

def run_to_json(run: Run) -> dict[str, Any]:
    """Like ``run_to_dict`` but with plain JSON values (strings for statuses and times)."""
    data: dict[str, Any] = orjson.loads(orjson.dumps(run_to_dict(run), option=DUMPS_OPTS))
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
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    a.name: ((str,) if a.type in (str, Status) else (int,) if a.type is int
             else (str, type(None)) if a.type == (_dt.datetime | None)
             else (int, type(None)) if a.type == (int | None) else ())
    for a in attrs.fields(Run)}

#: at most how many key layouts and type combinations ``exported_dict`` remembers (a few
#: occur: which optional fields are set, and any fields this library does not know)
_CACHE_LIMIT = 1024

#: a timestamp exactly as this library writes one (``dumps``: UTC, ``Z``, microseconds
#: only when not zero)
CANONICAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                             r"(?:\.(?!000000)[0-9]{6})?Z")

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
    if any(name not in present and name not in OMIT_WHEN for name in _SEED_ORDER):
        return None
    names = tuple(name for name in _SEED_ORDER if name in present)
    return _Layout(names=names, get=operator.itemgetter(*names),
                   times=tuple(i for i, name in enumerate(names)
                               if FIELD_TYPES[name] == (str, type(None))),
                   status_at=names.index("status"),
                   omit=tuple((name, OMIT_WHEN[name]) for name in names
                              if name in OMIT_WHEN),
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
        sound = all(t in FIELD_TYPES[name] for name, t in zip(layout.names, types,
                                                               strict=True))
        if len(layout.sound) < _CACHE_LIMIT:
            layout.sound[types] = sound
    if not sound or values[layout.status_at] not in STATUS_VALUES:
        return None
    for i in layout.times:
        value = values[i]
        if value is not None:
            if CANONICAL_TIME.fullmatch(value) is None:
                return None
            try:
                _dt.datetime.fromisoformat(value)
            except ValueError:
                return None
    return layout, values

def change_time(value: object) -> _dt.datetime:
    """A change's ``time`` as the change feed reads it: an ISO date and time with a UTC
    offset whose moment is within datetime's range; ``ValueError`` for anything else (a
    string that is no date, a time without an offset, a non-string)."""
    if not isinstance(value, str):
        raise ValueError(f"the change time {value!r} is not a string")
    try:
        when = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"the change time {value!r} is not a date") from None
    if when.tzinfo is None:
        raise ValueError(f"the change time {value!r} has no UTC offset")
    try:
        return when.astimezone(_dt.UTC)
    except OverflowError:
        raise ValueError(f"the change time {value!r} is outside the years 1 to 9999 in "
                         "UTC") from None

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
        rid = run.id
        if rid.isascii() and len(fields) + 6 * len(rid) + 2 <= MAX_RECORD_BYTES:
            return fields  # within the limit however its ASCII escapes (\u00XX at most)
        # as a JSON string: between quotes, unescaped, when plain ASCII
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
            orjson.dumps({name: value}, option=DUMPS_OPTS)
        except orjson.JSONEncodeError as exc:
            return f"its field {name!r} cannot be written as JSON ({exc})"
    return ""

def _largest(run: Run, extra: dict[str, Any] | None) -> str:
    """The name of the largest field of a run as stored (for an error)."""
    sizes = {name: len(orjson.dumps(value, option=DUMPS_OPTS))
             for name, value in _fields_of(run, extra).items()}
    return max(sizes, key=sizes.__getitem__)

def json_string(text: str) -> bytes:
    """``text`` as a JSON string, quotes included, as a record line holds it."""
    return orjson.dumps(text)

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
    return orjson.dumps(fields, option=DUMPS_OPTS)[1:-1]
