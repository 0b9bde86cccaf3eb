"""The long-running commands of ``runstore``: ``watch`` (follow the change feed until
Ctrl-C or ``--timeout``) and ``stress`` (``runstore.stress``, its arguments passed through)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import threading
import time
from collections.abc import Iterator

from . import _clifmt as fmt, _codec
from ._cli_context import EXIT_OK, Context, _dumps
from .errors import HistoryTruncatedError, RunstoreError
from .model import Change
from .protocol import RunStore


def _change_line(ctx: Context, change: Change) -> str:
    run = change.run
    when = fmt.local_text(change.time, clock=True)
    status = ctx.paint.status(run.status.value) + " " * (11 - len(run.status.value))
    extra = []
    if run.exit_code is not None:
        extra.append(f"exit {run.exit_code}")
    if run.error_code:
        extra.append(fmt.visible(run.error_code))
    tail = f"  {', '.join(extra)}" if extra else ""
    return (f"{change.seq:>6}  {ctx.paint.dim(when)}  {change.type.value:<12}  {status}  "
            f"{fmt.visible(run.machine)}  {fmt.visible(run.id)}{tail}")


#: seconds of one ``watch()`` call of ``runstore watch`` on a file store: how soon it sees
#: that Ctrl-C asked it to stop
WATCH_SLICE = 0.1


class _Stop:
    """Set by Ctrl-C (SIGINT) while ``watch`` follows a file store."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def _interrupt_ends_watch(stop: _Stop) -> Iterator[None]:
    """While following, the first Ctrl-C only sets ``stop.requested``; the watch loop ends
    at its next change or within ``WATCH_SLICE``. A second one raises KeyboardInterrupt
    (a watch blocked writing to a full pipe). SIGINT's handler runs wherever the main
    thread is, and a KeyboardInterrupt raised inside a finalizer (the store drops a read
    descriptor in one each time it reads new changes) is printed as "Exception ignored"
    and swallowed, so the watch would go on; the flag leaves that to no place but ours."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum: int, frame: object) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _follow(store: RunStore, since: int | None, timeout: float | None, stop: _Stop,
            slice_seconds: float | None) -> Iterator[Change]:
    """``store.watch`` from ``since`` (None: from now; 0: from the oldest retained change)
    for ``timeout`` seconds (None: until ``stop``), in calls of ``slice_seconds`` (None: one
    call) so that ``stop`` is looked at even when nothing changes.

    ``since`` 0 asks for every retained change: when a compaction dropped the first ones,
    ``watch(0)`` raises ``HistoryTruncatedError`` before delivering any, and the follow
    starts again from the oldest retained change it names. A positive ``since`` older than
    that, or a follower that falls behind a compaction later, still raises it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seq = store.last_seq() if since is None else since
    delivered = False
    while not stop.requested:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        span = left if slice_seconds is None else (
            slice_seconds if left is None else min(slice_seconds, left))
        try:
            for change in store.watch(seq, timeout=span):
                seq, delivered = change.seq, True
                yield change
                if stop.requested:
                    return
        except HistoryTruncatedError as exc:
            if since != 0 or delivered:
                raise
            seq = exc.oldest_seq - 1
            continue
        if deadline is not None and time.monotonic() >= deadline:
            return


def _cmd_watch(ctx: Context, args: argparse.Namespace) -> int:
    stop = _Stop()
    # a PostgreSQL watch opens a listening connection per call: it is followed in one call,
    # and Ctrl-C interrupts it as a KeyboardInterrupt
    file_store = not ctx.location.postgres
    with ctx.store(existing=True) as store, (
            _interrupt_ends_watch(stop) if file_store else contextlib.nullcontext()):
        if not args.json and fmt.is_terminal(ctx.err):
            what = ctx.location.display if ctx.location.postgres else ctx.journal_path
            ctx.note(f"watching {what} (Ctrl-C to stop)")
        for change in _follow(store, args.since, args.timeout, stop,
                              WATCH_SLICE if file_store else None):
            if args.json:
                data = _codec.change_to_json(change.seq, change.time, change.type, change.run)
                line = _dumps(data)
            else:
                line = _change_line(ctx, change)
            ctx.print(line)
            ctx.out.flush()
    return EXIT_OK



def _cmd_stress(ctx: Context, args: argparse.Namespace) -> int:
    if (args.state_dir or args.store) and "--state-dir" not in args.args:
        ctx.note("runstore: note: stress makes a fresh temporary store unless you pass "
                 "`stress --state-dir DIR`; the global --state-dir/--store does not apply")
    try:
        stress = importlib.import_module("runstore.stress")
    except ModuleNotFoundError as exc:
        if exc.name != "runstore.stress":
            raise
        raise RunstoreError("the stress command is not available: this installation of "
                            "runstore has no runstore.stress module") from None
    return int(stress.main(list(args.args)))
