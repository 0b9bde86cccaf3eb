"""The fault suite's helpers, one module per idea (``faults`` re-exports them all):

* ``basics``: loop sizes (``sized``), CI figures, ``run_for``, a cycle/history on a store, its
  whole view, checkpoint lines, a directory's bytes, open descriptors;
* ``powerloss``: ``RecordingFS`` and the crash states a power loss may leave;
* ``history``: a store driven through random operations, and the check of a crash state
  against what had been acknowledged;
* ``failing_fs``: ``FailingFS`` (the k-th write/sync/rename fails) and ``ReadLog``;
* ``locking``: broken locking for the race tests' proofs, and a process holding the lock;
* ``acks``: children's write-ahead acknowledgement logs and what a reopened store lost;
* ``procs``: the failpoint/SIGKILL writer, ``spawn_python``, ``wait_pid``, ``in_thread``.
"""
