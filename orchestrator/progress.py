"""A sweep's progress on the terminal: one line on stderr, at most every few seconds."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from typing import Callable, Iterable

Note = Callable[[int], str]
"""What the line adds about the trials still pending, given their count ("" for nothing): the
cluster's state (``orchestrator.capacity.waiting_note``: trials waiting for the autoscaler's nodes)."""


class Progress:
    """The progress line of sweep ``sweep`` of ``total`` trials (``total_is_budget``: a search,
    whose total is an upper bound: no ETA). Its clock starts when it is made."""

    every = 5.0  # seconds between two lines of :meth:`tick`

    def __init__(self, sweep: str, total: int, total_is_budget: bool = False):
        self.sweep, self.total, self.total_is_budget = sweep, total, total_is_budget
        self._t0 = time.monotonic()
        self._last = 0.0

    def tick(self, statuses: Iterable[str], outcomes: Iterable[str], done: int, note: Note | None = None) -> None:
        """:meth:`show`, when ``every`` seconds have passed since the last tick that showed."""
        if time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        self.show(statuses, outcomes, done, note)

    def show(self, statuses: Iterable[str], outcomes: Iterable[str], done: int, note: Note | None = None) -> None:
        print(self.line(statuses, outcomes, done, note), file=sys.stderr, flush=True)

    def line(self, statuses: Iterable[str], outcomes: Iterable[str], done: int, note: Note | None = None) -> str:
        """``statuses``: every trial's Tune status (PENDING, RUNNING, TERMINATED, ERROR...);
        ``outcomes``: the classes of the trials that ended here, ``done`` of them (the ETA's rate);
        ``note``: called with the number of PENDING trials, what it returns is added."""
        total = self.total
        by = defaultdict(int)
        for s in statuses:
            by[s] += 1
        finished = by["TERMINATED"] + by["ERROR"]
        diverged = sum(1 for v in outcomes if v in ("diverged", "collapsed"))
        elapsed = time.monotonic() - self._t0
        extra = note(by["PENDING"]) if note is not None else ""
        running = f"{by['RUNNING']} running" + (f", {extra}" if extra else "")
        if self.total_is_budget:  # a search: the total is an upper bound, no ETA
            return (f"[{self.sweep}] {finished} trials done (budget {total}; {diverged} diverged/collapsed, "
                    f"{by['ERROR']} failed), {running}, elapsed {_hms(elapsed)}")
        remaining = total - finished
        eta = (elapsed / done * remaining) if done and remaining else 0.0
        return (f"[{self.sweep}] {finished}/{total} done ({diverged} diverged/collapsed, "
                f"{by['ERROR']} failed), {running}, elapsed {_hms(elapsed)}"
                + (f", ETA {_hms(eta)}" if remaining and done else ""))


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
