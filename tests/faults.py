"""The fault suite's helpers under their historical name: everything here comes from the
modules of ``faultlib`` (one module per idea: ``basics``, ``powerloss``, ``history``,
``failing_fs``, ``locking``, ``acks``, ``procs``); import from either."""

from __future__ import annotations

from faultlib.acks import Acked, AckLog, audit_store, lost_acks, read_acks
from faultlib.basics import (
    checkpoints,
    cycle,
    figure,
    full_reading,
    history,
    mixed,
    open_fds,
    run_for,
    scale,
    sized,
    snapshot_dir,
    view,
)
from faultlib.failing_fs import FailingFS, ReadLog
from faultlib.history import History, Scratch, check_crash_state, record_history
from faultlib.locking import (
    break_stress_workers,
    lock_held,
    lock_the_data_file,
    lockf_without_mutex,
    no_cross_process_lock,
)
from faultlib.powerloss import (
    WRITE_FATES,
    Op,
    RecordingFS,
    Replay,
    crash_states,
    materialise,
    replay,
)
from faultlib.procs import (
    NOBODY,
    as_nobody,
    failpoint_names,
    in_thread,
    spawn_python,
    stop_all,
    wait_pid,
    writer,
)

__all__ = [
    "NOBODY", "WRITE_FATES", "Acked", "AckLog", "as_nobody", "audit_store",
    "break_stress_workers", "check_crash_state", "checkpoints", "crash_states", "cycle",
    "FailingFS", "failpoint_names", "figure", "full_reading", "History", "history",
    "in_thread", "lock_held", "lock_the_data_file", "lockf_without_mutex", "lost_acks",
    "materialise", "mixed", "no_cross_process_lock", "Op", "open_fds", "read_acks", "ReadLog",
    "record_history", "RecordingFS", "Replay", "replay", "run_for", "scale", "Scratch",
    "sized", "snapshot_dir", "spawn_python", "stop_all", "view", "wait_pid", "writer",
]
