"""The library's one logger, ``runstore``: recovery and failed housekeeping are logged, never
a call's own outcome (that is its return value or exception)."""

from __future__ import annotations


def log_warning(message: str, *args: object) -> None:
    """Log on the ``runstore`` logger (``logging`` is imported here, not at the top: it
    costs a fresh process ~4 ms, and only recovery and failed housekeeping log)."""
    import logging

    logging.getLogger("runstore").warning(message, *args)
