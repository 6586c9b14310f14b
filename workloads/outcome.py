"""Outcome classes of a trial, decided by how the run ends (never by its first steps).

The papers judge a learning rate by the final state of a full run: Wortsman et al. (2023) by the
final loss (LR sensitivity uses ``min(l(eta), l_0)``), Qi et al. (2025) by a loss that diverges and
does not recover. ablate's classes, in order of precedence:

``diverged``   the loss became non-finite, or the final validation loss is >= ``l_0``, the
               validation loss of the untrained model (the run ended no better than it started);
``collapsed``  the final validation loss is >= the data's *marginal baseline* (the unigram
               cross-entropy of the validation split under the training split's token frequencies,
               or the cross-entropy of the class prior): the model learned nothing from its inputs;
``degraded``   the run is finite and learned, but ended far from the cell's best at a higher LR:
               ``(L - L*) / (l_0 - L*) > kappa``, with ``L*`` the best final loss of the cell
               reached at a lower LR. Normalised by the span ``l_0 - L*``, so the same ``kappa``
               means the same thing on bytes (l_0 5.5) and on digits (l_0 2.3);
``stable``     none of these.

:func:`trial_class` needs only the trial; ``degraded`` needs the cell (:func:`classify`). Which
classes count as a crash is the spec's ``crash:`` field (default :data:`DEFAULT_CRASH`); every table,
plot and MLflow run records the criterion it used (:func:`criterion_label`).

This module is pure Python: the trial loop, the boundary search, export and report all call it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CLASSES = ("stable", "degraded", "collapsed", "diverged")
DEFAULT_CRASH: tuple[str, ...] = ("diverged", "collapsed")
DEFAULT_KAPPA = 0.5
"""A run is degraded when it closes less than half of the gap between l_0 and the cell's best."""


def validate_crash(crash: Iterable[str]) -> tuple[str, ...]:
    crash = tuple(crash)
    bad = [c for c in crash if c not in CLASSES or c == "stable"]
    if bad or not crash:
        raise ValueError(f"crash: {list(crash)!r}; allowed: a non-empty subset of "
                         f"{[c for c in CLASSES if c != 'stable']}")
    return crash


def criterion_label(crash: Sequence[str], kappa: float = DEFAULT_KAPPA) -> str:
    """How a crash was decided, for table captions, plot titles and MLflow tags."""
    parts = []
    if "diverged" in crash:
        parts.append("diverged (non-finite, or final val loss >= l_0)")
    if "collapsed" in crash:
        parts.append("collapsed (final val loss >= marginal baseline)")
    if "degraded" in crash:
        parts.append(f"degraded ((L - L*)/(l_0 - L*) > {kappa:g})")
    return "crash = " + " or ".join(parts)


def trial_class(final_loss: float | None, initial_loss: float | None, baseline: float | None,
                stop_reason: str | None = None) -> str:
    """``diverged`` / ``collapsed`` / ``stable`` from one run's final state. A run that the
    detector stopped (``stop_reason``: ``nonfinite`` or ``above_initial``, rules calibrated to stop
    only runs that end diverged) is ``diverged``."""
    if stop_reason or final_loss is None or not math.isfinite(final_loss):
        return "diverged"
    if initial_loss is not None and math.isfinite(initial_loss) and final_loss >= initial_loss:
        return "diverged"
    if baseline is not None and math.isfinite(baseline) and final_loss >= baseline:
        return "collapsed"
    return "stable"


@dataclass(frozen=True)
class Point:
    """One finished run of a cell: its learning rate, seed and final state."""

    lr: float
    seed: int
    final_loss: float            # +inf when the loss became non-finite
    initial_loss: float | None   # l_0
    baseline: float | None       # the data's marginal baseline
    stop_reason: str | None = None  # the early-stopping rule that ended the run, if any


def classify(points: Sequence[Point], kappa: float = DEFAULT_KAPPA) -> list[str]:
    """The class of every point of one cell (``degraded`` is relative to the cell's best)."""
    classes = [trial_class(p.final_loss, p.initial_loss, p.baseline, p.stop_reason) for p in points]
    learned = [p for p, c in zip(points, classes) if c == "stable"]
    if not learned:
        return classes
    best = min(learned, key=lambda p: p.final_loss)
    for i, (p, c) in enumerate(zip(points, classes)):
        l0 = p.initial_loss if p.initial_loss is not None else best.initial_loss
        if c != "stable" or p.lr <= best.lr or l0 is None or l0 <= best.final_loss:
            continue
        if (p.final_loss - best.final_loss) / (l0 - best.final_loss) > kappa:
            classes[i] = "degraded"
    return classes


@dataclass
class Bracket:
    """The crash boundary of one cell.

    Per learning rate the seeds vote: an LR crashed when at least half of its runs crashed (a tie
    is a crash). ``stable_lr`` is the largest stable LR; ``crash_lr`` the smallest crashed LR above
    it. A crashed LR below ``stable_lr`` does not pin the boundary low; it sets ``non_monotonic``.
    """

    stable_lr: float | None
    crash_lr: float | None
    non_monotonic: bool = False
    classes: dict[float, list[str]] = field(default_factory=dict)   # lr -> class per run
    crashed: dict[float, tuple[int, int]] = field(default_factory=dict)  # lr -> (crashed, runs)

    @property
    def width(self) -> float:
        if self.stable_lr is None or self.crash_lr is None:
            return math.inf
        return self.crash_lr / self.stable_lr

    @property
    def boundary(self) -> float | None:
        """Point estimate: the geometric middle of the bracket (one end if the other is open)."""
        if self.stable_lr and self.crash_lr:
            return math.sqrt(self.stable_lr * self.crash_lr)
        return self.stable_lr or self.crash_lr

    @property
    def lowest_crash(self) -> float | None:
        crashed = [lr for lr, (c, n) in self.crashed.items() if 2 * c >= n]
        return min(crashed) if crashed else None


def bracket(points: Sequence[Point], crash: Sequence[str] = DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA,
            seed: int | None = None) -> Bracket:
    """The bracket of one cell from its points (``seed``: only that seed's runs vote; the classes,
    ``degraded`` included, are always decided over all points of the cell)."""
    classes = classify(points, kappa)
    by_lr: dict[float, list[str]] = defaultdict(list)
    votes: dict[float, list[bool]] = defaultdict(list)
    for p, c in zip(points, classes):
        by_lr[p.lr].append(c)
        if seed is None or p.seed == seed:
            votes[p.lr].append(c in crash)
    crashed = {lr: (sum(v), len(v)) for lr, v in votes.items()}
    is_crash = {lr: 2 * c >= n for lr, (c, n) in crashed.items()}
    stable = [lr for lr, c in is_crash.items() if not c]
    stable_lr = max(stable) if stable else None
    above = [lr for lr, c in is_crash.items() if c and (stable_lr is None or lr > stable_lr)]
    crash_lr = min(above) if above else None
    non_mono = stable_lr is not None and any(c and lr < stable_lr for lr, c in is_crash.items())
    return Bracket(stable_lr, crash_lr, non_mono, dict(by_lr), crashed)


# ------------------------------------------------------------------------ LR sensitivity
def lr_sensitivity(points: Sequence[Point], lr_range: tuple[float, float],
                   tolerance: float = 1.01) -> tuple[float | None, bool]:
    """Wortsman et al. (2023), Sec. 3.2: ``E_{eta ~ log-uniform[a, b]}[min(l(eta), l_0) - l*]``.

    ``l(eta)`` is the final loss (seeds averaged per LR, a non-finite loss counting as ``l_0``),
    interpolated linearly in log-LR between the LRs run and integrated with trapezoid weights over
    ``lr_range``, the same range for every cell; ``l*`` is the best capped loss of the cell. Returns
    ``(value, covers)``: ``covers`` is False, and the value None, when the cell's LRs do not reach
    both ends of the range (within ``tolerance`` x), since extrapolating would invent the answer.
    """
    a, b = lr_range
    per_lr: dict[float, list[float]] = defaultdict(list)
    for p in points:
        l0 = p.initial_loss if p.initial_loss is not None and math.isfinite(p.initial_loss) else math.inf
        loss = p.final_loss if math.isfinite(p.final_loss) else l0
        per_lr[p.lr].append(min(loss, l0))
    if not per_lr:
        return None, False
    lrs = sorted(per_lr)
    if lrs[0] > a * tolerance or lrs[-1] < b / tolerance:
        return None, False
    ys = [sum(per_lr[x]) / len(per_lr[x]) for x in lrs]
    if not all(math.isfinite(y) for y in ys):
        return None, False
    best = min(ys)
    la, lb = math.log(a), math.log(b)
    if lb <= la:
        return ys[0] - best, True
    xs = [math.log(x) for x in lrs]

    def at(x: float) -> float:  # piecewise-linear in log-LR, flat beyond the ends
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1]
        for i in range(1, len(xs)):
            if x <= xs[i]:
                t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + t * (ys[i] - ys[i - 1])
        return ys[-1]

    knots = [la] + [x for x in xs if la < x < lb] + [lb]
    vals = [at(x) - best for x in knots]
    area = sum((knots[i] - knots[i - 1]) * (vals[i] + vals[i - 1]) / 2 for i in range(1, len(knots)))
    return area / (lb - la), True
