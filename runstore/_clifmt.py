r"""Human output for the command line: colour, aligned tables, relative times, sizes and a
progress bar. Only ``runstore.cli`` imports this module; nothing here touches a store.

Colour follows https://no-color.org: never when ``NO_COLOR`` is set (to anything but ""),
never when the stream is not a terminal or ``TERM=dumb``; ``--color always|never`` overrides.
The progress bar goes to stderr, only when stderr is a terminal, and only once the work has
lasted ``PROGRESS_DELAY`` seconds, so quick commands never flash one.

Text from a store (a machine name, an error message, an imported id) or from the user (a path)
may hold control characters and escape sequences that a terminal would obey: clear the
screen, move the cursor, set the window title, hide text, reorder a line (bidi overrides).
``visible`` shows each such character as an escape (``\x1b``, ``\n``, ``\u202e``); the
command line passes every text it prints through it, and ``json_visible`` does the same for
the characters JSON leaves raw.
"""

from __future__ import annotations

import datetime as _dt
import io
import itertools
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any, TextIO

#: seconds a long operation runs before its progress bar appears (tests set 0)
PROGRESS_DELAY = 0.5
#: seconds between two frames of the progress bar
PROGRESS_INTERVAL = 0.1

_BOLD, _DIM, _RED, _GREEN, _YELLOW, _BLUE, _MAGENTA, _CYAN = (
    "1", "2", "31", "32", "33", "34", "35", "36")
STATUS_STYLE = {
    "pending": _BLUE,
    "running": _CYAN,
    "completed": _GREEN,
    "failed": _RED,
    "interrupted": _YELLOW,
    "timeout": _MAGENTA,
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: what a terminal may act on rather than show: C0 controls and DEL, C1 controls
#: (U+0080-U+009F; U+009B is CSI), the bidi marks, embeddings, overrides and isolates
#: (U+061C, U+200E-U+200F, U+202A-U+202E, U+2066-U+2069), and the line and paragraph
#: separators (U+2028-U+2029)
_UNSAFE_ABOVE_C0 = "\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
_UNSAFE = "\x00-\x1f" + _UNSAFE_ABOVE_C0
_UNSAFE_CHAR = re.compile(f"[{_UNSAFE}]")
#: what JSON text from orjson may hold raw (it escapes U+0000-U+001F in strings, so the C0
#: controls in it are its own newlines)
_UNSAFE_IN_JSON = re.compile(f"[{_UNSAFE_ABOVE_C0}]")
#: the same, except the styles ``Painter`` writes (kept when colour is on)
_UNSAFE_OR_STYLE = re.compile(
    f"(\x1b\\[(?:(?:0|1|2|3[1-6]);)*(?:0|1|2|3[1-6])m)|[{_UNSAFE}]")
_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _escape_unstyled(match: re.Match[str]) -> str:
    return match.group(1) or _escape(match.group())


def visible(text: str, *, styles: bool = False) -> str:
    r"""``text`` safe to write to a terminal: every control character, escape sequence
    introducer and bidi control shown as an escape (``\x1b``, ``\n``, ``\t``, ``\x9b``,
    ``\u202e``) instead of being written raw; other text, backslashes included, is left as
    it is. With ``styles``, the colour styles a ``Painter`` wrote are kept (the text is
    already painted); any other sequence is escaped. Idempotent, and a no-op (one regex
    search, none for printable ASCII) on text without such characters."""
    if text.isascii() and text.isprintable():  # no control character, no style
        return text
    if styles:
        if "\x1b" in text or _UNSAFE_CHAR.search(text):
            return _UNSAFE_OR_STYLE.sub(_escape_unstyled, text)
        return text
    if _UNSAFE_CHAR.search(text) is None:
        return text
    return _UNSAFE_CHAR.sub(lambda m: _escape(m.group()), text)


def json_visible(text: str) -> str:
    r"""JSON text (from orjson, which escapes U+0000-U+001F, the quote and the backslash in
    strings) with the other characters ``visible`` escapes written as JSON escapes
    (``\u009b``, ``\u202e``): the same document to a parser, nothing a terminal acts on.
    They can only occur inside strings (JSON's own syntax is ASCII), where an escape means
    the same character."""
    if text.isascii() and "\x7f" not in text:  # (isascii is O(1) on a str)
        return text
    if _UNSAFE_IN_JSON.search(text) is None:
        return text
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class JsonVisibleOut(io.RawIOBase):
    """A binary stream for ``export``: each write (whole JSON items, UTF-8) goes to ``out``
    (binary or text) through ``json_visible``, so a streamed document shows nothing a
    terminal acts on."""

    def __init__(self, out: IO[str] | IO[bytes]) -> None:
        super().__init__()
        self._out = out

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        text = json_visible(data.decode())
        if isinstance(self._out, io.TextIOBase):
            self._out.write(text)
        else:
            self._out.write(text.encode())  # type: ignore[arg-type]  # a binary stream
        return len(data)


def colour_wanted(stream: TextIO, mode: str = "auto") -> bool:
    """Whether to colour what goes to ``stream`` (``mode``: auto, always or never)."""
    if mode != "auto":
        return mode == "always"
    if os.environ.get("NO_COLOR", "") != "" or os.environ.get("TERM") == "dumb":
        return False
    return is_terminal(stream)


def is_terminal(stream: TextIO) -> bool:
    """True when ``stream`` is an interactive terminal (False for pipes, files, captures)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class Painter:
    """Wraps text in ANSI styles when enabled, else returns it unchanged."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles or not text:
            return text
        return f"\x1b[{';'.join(styles)}m{text}\x1b[0m"

    def status(self, status: str) -> str:
        return self(status, STATUS_STYLE.get(status, ""))

    def bold(self, text: str) -> str:
        return self(text, _BOLD)

    def dim(self, text: str) -> str:
        return self(text, _DIM)

    def error(self, text: str) -> str:
        return self(text, _BOLD, _RED)

    def good(self, text: str) -> str:
        return self(text, _BOLD, _GREEN)


def visible_len(text: str) -> int:
    """Length of ``text`` on screen (ANSI styles take no room)."""
    if "\x1b" not in text:  # most cells: no style to take out
        return len(text)
    return len(_ANSI.sub("", text))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], paint: Painter,
          right: frozenset[int] = frozenset()) -> list[str]:
    """Aligned columns (two spaces apart) under a bold header; cells may already be painted.
    Column numbers in ``right`` are right-aligned (numbers)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], visible_len(cell))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            pad = " " * (widths[i] - visible_len(cell))
            out.append(pad + cell if i in right else cell + pad)
        return "  ".join(out).rstrip()

    head = line([paint.bold(h) for h in headers])
    return [head, *(line(row) for row in rows)]


def key_values(pairs: Sequence[tuple[str, str]], paint: Painter) -> list[str]:
    """``key   value`` lines with the values aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    return [f"{paint.bold(k.ljust(width))}  {v}".rstrip() for k, v in pairs]


# -- times and sizes ------------------------------------------------------------------------

def duration(delta: _dt.timedelta) -> str:
    """A short duration: ``0.4s``, ``42s``, ``3m 07s``, ``2h 05m``, ``3d 4h``."""
    seconds = delta.total_seconds()
    if seconds < 0:
        return "-" + duration(-delta)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


# -- local time -----------------------------------------------------------------------------
#
# ``datetime.astimezone()`` takes the UTC offset that the C library's ``localtime`` gives for
# the moment's second (``tm_gmtoff``), and raises OverflowError where the local time is
# outside datetime's range (the first or last hours of the years 1 and 9999, in a zone west
# or east of UTC). The command line converts every time it shows through ``local_text``,
# which shows those in UTC instead, and every local time it reads through
# ``utc_of_local``. A date is converted moment by moment: a zone may change its offset at
# any second, any number of times an hour (a POSIX TZ rule), so an offset cached for a span
# of time is not exact, and ``time.localtime`` plus the arithmetic costs as much as
# ``astimezone``.

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_NAIVE_EPOCH = _EPOCH.replace(tzinfo=None)
_SECOND = _dt.timedelta(seconds=1)
#: seconds ``astimezone`` looks either side of a naive time for its other offset
_MAX_FOLD = 86400


def _gmtoff(seconds: int) -> int:
    """The local UTC offset in seconds at ``seconds`` since 1970 (UTC)."""
    return time.localtime(seconds).tm_gmtoff


def local_text(moment: _dt.datetime, clock: bool = False) -> str:
    """The local date of an aware ``moment`` (``2026-11-23``), with ``clock`` its local time
    to the second (``2026-11-23 11:02:03``), as ``moment.astimezone()`` gives them; where
    the local time is outside datetime's range, the UTC date or time followed by ``Z``
    (``0001-01-01Z``, ``0001-01-01 00:00:00Z``)."""
    try:
        local = moment.astimezone()
    except (OverflowError, OSError, ValueError):  # ValueError: an offset of a day or more
        utc = moment.astimezone(_dt.UTC)
        return (utc.isoformat(" ", "seconds")[:19] if clock else utc.date().isoformat()) + "Z"
    if clock:
        return local.strftime("%Y-%m-%d %H:%M:%S")
    # isoformat is strftime's "%Y-%m-%d" at a third of its cost (but for years before 1000,
    # which strftime does not pad)
    return local.date().isoformat() if local.year >= 1000 else local.strftime("%Y-%m-%d")


def utc_of_local(naive: _dt.datetime) -> _dt.datetime | None:
    """The UTC moment of a naive local time as ``naive.astimezone(datetime.UTC)`` finds it
    (the same steps: a repeated time is its first instance, or its second with ``fold=1``;
    a time in a gap is moved by the gap's length), for every naive time whose UTC moment is
    within datetime's range, where ``astimezone`` raises OverflowError for those within a
    day of its ends; None for a time whose UTC moment is outside the range."""
    wall = (naive - _NAIVE_EPOCH) // _SECOND  # the wall clock's seconds, read as UTC
    try:
        a = _gmtoff(wall)
        u1 = wall - a
        b = _gmtoff(u1)
        u1_right = b == a
        if u1_right:  # one solution: look for another a day before (fold 0) or after
            b = _gmtoff(u1 + (_MAX_FOLD if naive.fold else -_MAX_FOLD))
            if b == a:
                return _utc(u1, naive)
        u2 = wall - b
        if _gmtoff(u2) == b:
            found = u2
        elif u1_right:
            found = u1
        else:  # in a gap: neither offset gives the time
            found = min(u1, u2) if naive.fold else max(u1, u2)
        return _utc(wall - _gmtoff(found), naive)
    except (OverflowError, OSError, ValueError):  # beyond what the C library converts, or
        return None  # an offset of a day or more, which datetime does not take


def _utc(seconds: int, naive: _dt.datetime) -> _dt.datetime | None:
    """The UTC moment ``seconds`` after 1970 plus ``naive``'s microseconds; None past the
    year 9999 or before 1."""
    try:
        return _EPOCH + _dt.timedelta(seconds=seconds, microseconds=naive.microsecond)
    except OverflowError:
        return None


def ago(moment: _dt.datetime | None, now: _dt.datetime) -> str:
    """``just now``, ``42s ago``, ``3m ago``, ``2h 05m ago``, ``5d ago``; past 30 days the
    local date (``local_text``); ``in 3m`` for a moment in the future (another host's
    clock); ``-`` for None."""
    if moment is None:
        return "-"
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        return "in " + _coarse(-seconds)
    if seconds < 1:
        return "just now"
    if seconds >= 30 * 86400:
        return local_text(moment)
    return _coarse(seconds) + " ago"


def _coarse(seconds: float) -> str:
    """``42s``, ``26m``, ``1h 52m``, ``3d``: two units only where the second one matters."""
    whole = int(seconds)
    if whole >= 86400:
        return f"{whole // 86400}d"
    if whole >= 3600:
        hours, minutes = divmod(whole // 60, 60)
        return f"{hours}h {minutes:02d}m"
    if whole >= 60:
        return f"{whole // 60}m"
    return f"{whole}s"


def timestamp(moment: _dt.datetime | None, now: _dt.datetime) -> str:
    """RFC 3339 UTC plus the relative time: ``2026-11-23T11:02:03.123456Z (3m ago)``."""
    if moment is None:
        return "-"
    text = moment.astimezone(_dt.UTC).isoformat().replace("+00:00", "Z")
    return f"{text} ({ago(moment, now)})"


def size(n: int) -> str:
    """``812 B``, ``12.3 KiB``, ``4.0 MiB``, ``1.2 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> _dt.timedelta:
    """``90s``, ``10m``, ``2h``, ``30d``, ``1w``, or combined (``1h30m``); ValueError else."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{text!r} is not a duration (use e.g. 90s, 10m, 2h, 30d, 1h30m)")
    return _dt.timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))


# -- progress -------------------------------------------------------------------------------

class Progress:
    """A simple activity bar on stderr for work whose length the library does not report:
    ``compacting runs.jsonl [    <=>     ] 2.3s``. A context manager; draws nothing unless
    ``enabled`` (stderr is a terminal) and the work outlasts ``PROGRESS_DELAY``, and erases
    itself before the command prints its result."""

    WIDTH = 24

    def __init__(self, stream: TextIO, label: str, *, enabled: bool) -> None:
        self.stream = stream
        self.label = label
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = 0
        self._started = 0.0
        self._write_lock = threading.Lock()

    def __enter__(self) -> Progress:
        if self.enabled:
            self._started = time.monotonic()
            if PROGRESS_DELAY <= 0:
                self._draw()
            self._thread = threading.Thread(target=self._loop, name="runstore-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if self._drawn:
            self._write("\r" + " " * self._drawn + "\r")

    def _loop(self) -> None:
        if self._stop.wait(max(PROGRESS_DELAY, 0.0)):
            return
        while True:
            self._draw()
            if self._stop.wait(PROGRESS_INTERVAL):
                return

    def frame(self, elapsed: float) -> str:
        """The bar at ``elapsed`` seconds: a marker bouncing across the track."""
        span = self.WIDTH - 3
        step = int(elapsed / PROGRESS_INTERVAL) % (2 * span)
        pos = step if step <= span else 2 * span - step
        track = " " * pos + "<=>" + " " * (span - pos)
        return f"{self.label} [{track}] {elapsed:.1f}s"

    def _draw(self) -> None:
        text = self.frame(time.monotonic() - self._started)
        pad = " " * max(self._drawn - len(text), 0)
        self._write("\r" + text + pad)
        self._drawn = max(self._drawn, len(text))

    def _write(self, text: str) -> None:
        with self._write_lock:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken terminal must not break the command


def table_stream(headers: Sequence[str], rows: Iterable[Sequence[str]], paint: Painter,
                 right: frozenset[int] = frozenset(), block: int = 1000) -> Iterator[list[str]]:
    """``table`` for rows that arrive one by one, in lists of lines of up to ``block`` rows:
    the header and the first block as soon as they are there, the columns as wide as that
    block needs; a later row wider than a column widens it from then on (never narrows).
    A cell holds a style only if ``paint`` put it there (any other text is escaped)."""
    widths = [len(h) for h in headers]

    def line(cells: Sequence[str], lengths: Sequence[int]) -> str:
        out = []
        for i, (cell, n) in enumerate(zip(cells, lengths, strict=True)):
            pad = " " * (widths[i] - n)
            out.append(pad + cell if i in right else cell + pad)
        return "  ".join(out).rstrip()

    first = True
    it = iter(rows)
    while batch := list(itertools.islice(it, block)):
        if paint.enabled and "\x1b" in "".join(itertools.chain.from_iterable(batch)):
            sized = [(row, [visible_len(cell) for cell in row]) for row in batch]
            for _, lengths in sized:
                widths = list(map(max, widths, lengths))
            lines = [line(row, lengths) for row, lengths in sized]
        else:  # no style in the block: a cell's length is its width, one format per row
            columns = zip(*batch, strict=True)
            widths = [max(w, *map(len, column))
                      for w, column in zip(widths, columns, strict=True)]
            form = "  ".join(f"{{:{'>' if i in right else '<'}{w}}}"
                             for i, w in enumerate(widths)).format
            lines = [form(*row).rstrip() for row in batch]
        if first:
            lines.insert(0, line([paint.bold(h) for h in headers], [len(h) for h in headers]))
            first = False
        yield lines
