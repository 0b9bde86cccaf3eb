"""``python -m runstore``: inspect and operate a store (placeholder until the CLI issue)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .store import Store


def default_state_dir() -> str:
    """``$RUNSTORE_DIR``, else the user's state directory for runstore."""
    env = os.environ.get("RUNSTORE_DIR")
    if env:
        return env
    import platformdirs

    return platformdirs.user_state_dir("runstore")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    state_dir = default_state_dir()
    if args[:1] == ["--state-dir"] and len(args) > 1:
        state_dir = args[1]
    with Store(state_dir) as store:
        for run in store.list():
            print(f"{run.id}  {run.machine}  {run.status.value}  {run.test_dir_hash[:12]}")
    return 0
