"""What ``check`` rebuilds of a store's view as it reads the journal, to compare with the two
summaries that opening the store trusts without reading what they describe: a compacted
base's, in the header (``codec.BaseSummary``: the CRC-32 of the base's bytes, its run count,
where its unfinished runs are, the greatest id), and a checkpoint line's
(``codec.Checkpoint``: the record lines and runs before it, the greatest id, where the
unfinished runs' latest versions are). A summary that says otherwise than the lines would
have a process take a running run for finished (and prune it), count runs wrongly, or hand
out ids that sort before existing ones.

Memory: the unfinished runs and the runs pruned since the base (which a prune's compaction
soon folds in), never one entry per run.
"""

from __future__ import annotations

from typing import Any

import attrs

from ._codec import BaseSummary, Checkpoint

_ACTIVE = ("pending", "running")
_ACTIVE_RAW = (b"pending", b"running")


@attrs.define
class Replay:
    """The view as the lines read so far give it. ``start`` is where the base begins (the
    header's end), ``latest_end`` where its latest versions end and ``end`` where the base
    (with its retained history) ends."""

    start: int
    latest_end: int
    end: int
    #: CRC-32 of the base's bytes (``check`` adds each chunk's)
    crc: int = 0
    base_lines: int = 0
    #: offsets (from ``start``) of the base's unfinished runs, and their ids
    base_active: list[int] = attrs.field(factory=list)
    ids: dict[int, str] = attrs.field(factory=dict)
    #: the greatest id among the base's sound lines (ASCII bytes) and its other lines
    max_raw: bytes = b""
    max_id: str = ""
    history: int = 0
    tail_lines: int = 0
    created: int = 0
    pruned: set[str] = attrs.field(factory=set)
    tail_max: str = ""
    #: unfinished run id -> the offset of its latest version, in insertion order
    active: dict[str, int] = attrs.field(factory=dict)
    #: unfinished base run id -> the offset of the same version in the retained history,
    #: which a process that compacted the file may list instead
    copies: dict[str, int] = attrs.field(factory=dict)
    #: (offset, what is wrong) of the checkpoint lines that do not describe the lines
    #: before them, as found (``check`` takes them)
    found: list[tuple[int, str]] = attrs.field(factory=list)

    def sound(self, offset: int, status: bytes, run_id: bytes, change: bytes) -> None:
        """A record line read from its bytes (ASCII)."""
        if offset < self.latest_end:
            self.base_lines += 1
            if status in _ACTIVE_RAW:
                self._base_active(offset, run_id.decode())
            if run_id > self.max_raw:
                self.max_raw = run_id
        else:
            self._record(offset, status.decode(), run_id.decode(), change.decode())

    def decoded(self, offset: int, data: dict[str, Any]) -> None:
        """A record line decoded (``check_record`` took it)."""
        run_id, status = str(data["id"]), data["status"]
        if offset < self.latest_end:
            self.base_lines += 1
            if status in _ACTIVE:
                self._base_active(offset, run_id)
            if run_id > self.max_id:
                self.max_id = run_id
        else:
            self._record(offset, status, run_id, str(data["change"]))

    def _base_active(self, offset: int, run_id: str) -> None:
        self.base_active.append(offset - self.start)
        self.ids[offset - self.start] = run_id
        self.active[run_id] = offset

    def _record(self, offset: int, status: str, run_id: str, change: str) -> None:
        if offset < self.end:  # the retained history: counted, not taken in
            self.history += 1
            if run_id in self.active:  # its last line there is the base's version
                self.copies[run_id] = offset
            return
        self.tail_lines += 1
        if change == "run_created":  # a new id (create and import refuse existing ones)
            self.created += 1
        elif change == "run_pruned":
            self.pruned.add(run_id)
        if run_id > self.tail_max:
            self.tail_max = run_id
        self.copies.pop(run_id, None)
        if status in _ACTIVE:
            self.active[run_id] = offset
        else:
            self.active.pop(run_id, None)

    def base_problems(self, summary: BaseSummary) -> list[str]:
        """How the base differs from the header's ``summary``."""
        where = f"the compacted base (bytes {self.start} to {self.end})"
        found = []
        if self.crc != summary.crc:
            found.append(
                f"{where} does not match the CRC-32 its header records ({summary.crc}; its "
                f"bytes give {self.crc}): lines of it were removed, reordered or edited "
                "after the compaction wrote it, each with its own checksum made to match")
        if self.base_lines != summary.lines:
            found.append(f"{where} holds {self.base_lines} runs where its header says "
                         f"{summary.lines}")
        if tuple(self.base_active) != summary.active:
            listed = set(summary.active)
            missed = [self.ids[a] for a in self.base_active if a not in listed]
            extra = [a for a in summary.active if a not in self.ids]
            found.append(f"the header lists the unfinished runs of {where} where they are "
                         "not: " + _differences(missed, [str(a) for a in extra]))
        greatest = max(self.max_raw.decode(), self.max_id)
        if greatest > summary.max_id:
            found.append(
                f"the header's greatest run id {summary.max_id!r} sorts before run "
                f"{greatest!r} of the base: new run ids could sort before existing ones")
        return found

    def checkpoint(self, offset: int, point: Checkpoint, summary: BaseSummary | None) -> None:
        """Compare the checkpoint line at ``offset`` with the lines before it."""
        lines = self.base_lines + self.history + self.tail_lines
        runs = self.base_lines + self.created - len(self.pruned)
        greatest = max(summary.max_id if summary is not None else "", self.max_raw.decode(),
                       self.max_id, self.tail_max)
        wrong = []
        if point.lines != lines:
            wrong.append(f"{point.lines} record lines before it where there are {lines}")
        if point.runs != runs:
            wrong.append(f"{point.runs} runs where there are {runs}")
        if point.max_id < greatest:
            wrong.append(f"the greatest run id {point.max_id!r} where run {greatest!r} "
                         "comes before it (new run ids could sort before existing ones)")
        ids = list(self.active)
        if len(point.active) != len(ids) or not all(
                o in (self.active[i], self.copies.get(i)) for o, i in zip(point.active, ids,
                                                                        strict=True)):
            at = {o: i for i, o in self.active.items()} | {o: i for i, o in
                                                            self.copies.items()}
            listed = {at.get(o) for o in point.active}
            missed = [i for i in ids if i not in listed]
            extra = [str(o) for o in point.active if o not in at]
            wrong.append("the unfinished runs where they are not: "
                         + _differences(missed, extra))
        if wrong:
            self.found.append((offset, "a checkpoint line says " + "; ".join(wrong)
                               + ": a process opening the store there takes it at its word"))


def _differences(missed: list[str], extra: list[str]) -> str:
    """What a list of unfinished runs gets wrong: ``missed`` runs left out, ``extra``
    offsets listed that hold none, or the order."""
    return "; ".join(
        ([f"runs {missed!r} are unfinished but not listed (a process opening the store "
          "takes them for finished: prune would remove them)"] if missed else [])
        + ([f"offsets {', '.join(extra)} are listed but hold no unfinished run"]
           if extra else [])
        + ([] if missed or extra else ["they are listed out of order"]))
