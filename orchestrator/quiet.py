"""Library output a user cannot act on, folded into one line with the reason.

Ray Tune (2.60) logs "... took 0.6 s, which may be a performance bottleneck" whenever processing one
trial result on the driver takes longer than 0.5 s (``ray.tune.utils.util.warn_if_slow``, from the
60th second of a run on; dozens of lines in a CPU sweep), and similar lines when saving its
experiment state is slow (``ray.tune.execution.experiment_state``). In ablate that time is the
tracking callback writing the result to MLflow on a driver whose CPUs the trials are using: it
delays when Tune hands out the next result, not the training, and no setting of the spec changes
it. :class:`FoldedWarnings`, around ``tuner.fit()`` (``orchestrator.sweep.Session.fit``, for sweeps
and boundary searches alike), drops those lines and the Python warnings (``warnings.warn``) raised
inside installed libraries, and logs one line at the end that counts them and says why.
``ABLATE_LIBRARY_WARNINGS=show`` lets everything through unchanged (for debugging Ray or MLflow).
"""

from __future__ import annotations

import logging
import os
import re
import sysconfig
import warnings
from collections import Counter

log = logging.getLogger("ablate")

TUNE_LOGGERS = ("ray.tune.utils.util", "ray.tune.execution.experiment_state", "ray.tune.execution.tune_controller")
"""The loggers Tune's bottleneck warnings come from (``warn_if_slow`` logs through the first)."""
BOTTLENECK = ("performance bottleneck", "may become a bottleneck")
_TOOK = re.compile(r"took ~?(\d+(?:\.\d+)?) s")
ENV = "ABLATE_LIBRARY_WARNINGS"


def _library_dirs() -> tuple[str, ...]:
    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    return tuple(sorted(d for d in dirs if d))


class FoldedWarnings(logging.Filter):
    """A context manager (and the logging filter it installs on :data:`TUNE_LOGGERS`): inside it,
    Tune's bottleneck warnings and library ``warnings.warn`` calls are counted, not shown; on exit
    one line sums them up (:meth:`line`). Warnings raised by code outside the installed libraries
    (ablate's own) are shown as usual."""

    def __init__(self, show: bool | None = None):
        super().__init__("ablate.folded")
        self.show = os.environ.get(ENV, "").lower() == "show" if show is None else show
        self.bottlenecks = 0
        self.longest = 0.0
        self.library: Counter[str] = Counter()  # category name -> count
        self._catch: warnings.catch_warnings | None = None
        self._recorded: list[warnings.WarningMessage] = []

    # logging.Filter
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not any(p in msg for p in BOTTLENECK):
            return True
        self.bottlenecks += 1
        m = _TOOK.search(msg)
        if m:
            self.longest = max(self.longest, float(m.group(1)))
        return False

    def __enter__(self) -> FoldedWarnings:
        if self.show:
            return self
        for name in TUNE_LOGGERS:
            logging.getLogger(name).addFilter(self)
        self._catch = warnings.catch_warnings(record=True)
        self._recorded = self._catch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.show:
            return
        for name in TUNE_LOGGERS:
            logging.getLogger(name).removeFilter(self)
        recorded, self._recorded = list(self._recorded), []
        self._catch.__exit__(None, None, None)
        self._catch = None
        libs = _library_dirs()
        for w in recorded:
            if str(w.filename).startswith(libs):
                self.library[w.category.__name__] += 1
            else:  # ablate's own: shown as it would have been
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        text = self.line()
        if text:
            log.warning(text)

    def line(self) -> str | None:
        """The one line that stands for everything folded (None: nothing was)."""
        parts = []
        if self.bottlenecks:
            parts.append(f"Ray Tune warned {self.bottlenecks} time{'s' if self.bottlenecks > 1 else ''} of a "
                         f"'performance bottleneck' (processing a result took up to {self.longest:.1f} s): the "
                         "driver writes every result to MLflow while the trials use the CPUs; it delays Tune's "
                         "bookkeeping, not the training or its results")
        if self.library:
            kinds = ", ".join(f"{n} {c}" for c, n in sorted(self.library.items()))
            parts.append(f"{sum(self.library.values())} warnings from installed libraries ({kinds}) not shown")
        if not parts:
            return None
        return "note: " + "; ".join(parts) + f"; nothing to act on ({ENV}=show prints them)"
