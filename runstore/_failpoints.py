"""Named crash points for the fault suite.

Set ``RUNSTORE_FAILPOINT=name`` (optionally ``name:N`` to fire on the N-th hit) in a child
process and it kills itself with SIGKILL when it reaches that point, so the parent can verify
what a crash there leaves behind. With the variable unset a hit costs one global lookup.
Points: append.before_write, append.after_write, append.after_sync, compact.after_tmp_write,
compact.after_tmp_sync, compact.after_replace, recover.before_truncate, prune.after_archive.
"""

from __future__ import annotations

import os
import signal

_ARMED: str | None = None
_AFTER = 1
_hits = 0


def _arm(spec: str | None) -> None:
    global _ARMED, _AFTER, _hits
    _hits = 0
    if not spec:
        _ARMED = None
        return
    name, _, count = spec.partition(":")
    _ARMED = name
    _AFTER = int(count) if count else 1


def hit(name: str) -> None:
    """Crash the process here if this failpoint is armed."""
    global _hits
    if _ARMED is None or name != _ARMED:
        return
    _hits += 1
    if _hits >= _AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


_arm(os.environ.get("RUNSTORE_FAILPOINT"))
