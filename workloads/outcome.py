"""Outcome classes of a trial, decided by how the run ends (never by its first steps).

The papers judge a learning rate by the final state of a full run: Wortsman et al. (2023) by the
final loss (LR sensitivity uses ``min(l(eta), l_0)``), Qi et al. (2025) by a loss that diverges and
does not recover. ablate's classes, in order of precedence:

``diverged``   the loss became non-finite, or the final validation loss is >= ``l_0``, the
               validation loss of the untrained model (the run ended no better than it started).
               Nothing else makes a run diverged: an early stop does not, a finite run below l_0
               never is;
``collapsed``  the run learned nothing detectable from its inputs. Its *gain*, the marginal baseline
               minus the final validation loss, both measured on the same validation windows (the
               baseline of a window: the unigram cross-entropy of its targets under the training
               split's token frequencies, or the class prior's cross-entropy of its label; so the
               windows' own noise cancels), is at most ``max(COLLAPSE_SE x se, COLLAPSE_FRACTION x
               g_R)``: 2 standard errors of the per-window differences, or a tenth of the cell's
               *reference gain* g_R (below);
``degraded``   the run is finite and learned, but ended far from what its cell reaches at a safe LR:
               above the reference LR, its gain is less than ``(1 - kappa)`` of the reference gain,
               ``(g_R - g) / g_R > kappa``, i.e. it closed less than ``1 - kappa`` of the gap
               between the marginal baseline B and the reference's loss (on bytes the baseline,
               3.26, lies far below l_0, 5.5: normalised by l_0 it could never fire);
``stable``     none of these.

The reference belongs to the cell (DESIGN.md, "a measurement belongs to its cell"): its *reference
runs* are the runs marked as such (``Point.is_reference``: a boundary search runs ``k`` seeds at its
reference LR first, before any other trial of the cell) or, when none is marked (a grid sweep), the
cell's runs at its lowest LR, every seed. ``g_R`` is their mean gain (:class:`Reference`, from
:func:`cell_reference`). It depends on the cell's own runs only: never on the other cells of a
sweep or search, nor on the order trials finish. When the reference itself learned nothing (no
finite run, or a mean gain within 2 standard errors), ``collapsed`` falls back to the standard-error
margin and no run is ``degraded``; :func:`criterion_label` says in how many cells.

:func:`trial_class` needs only the trial (the standard-error margin); the reference's margin and
``degraded`` need the cell (:func:`classify`). Runs recorded before per-window baselines existed
(no ``eval_baseline``) are compared with the whole split's baseline, without the standard-error
margin; :func:`criterion_label` says so. Which classes count as a crash is the spec's ``crash:``
field (default :data:`DEFAULT_CRASH`); every table, plot and MLflow run records the criterion it
used (:func:`criterion_label`).

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
"""A run is degraded when it closes less than half of the gap between the marginal baseline and
its cell's reference loss."""
COLLAPSE_SE = 2.0
"""A run whose gain over the baseline is at most this many standard errors learned nothing
detectable."""
COLLAPSE_FRACTION = 0.1
"""A run whose gain is at most this fraction of its cell's reference gain learned nothing worth the
name."""


def validate_crash(crash: Iterable[str]) -> tuple[str, ...]:
    crash = tuple(crash)
    bad = [c for c in crash if c not in CLASSES or c == "stable"]
    if bad or not crash:
        raise ValueError(f"crash: {list(crash)!r}; allowed: a non-empty subset of "
                         f"{[c for c in CLASSES if c != 'stable']}")
    return crash


def criterion_label(crash: Sequence[str], kappa: float = DEFAULT_KAPPA, fallback: int = 0,
                    no_reference: int = 0) -> str:
    """How a crash was decided, for table captions, plot titles and MLflow tags. ``fallback``: how
    many runs were recorded without per-window baselines (compared with the whole split's);
    ``no_reference``: in how many cells the reference learned nothing (the standard-error margin
    alone, no ``degraded``)."""
    parts = []
    if "diverged" in crash:
        parts.append("diverged (non-finite, or final val loss >= l_0)")
    if "collapsed" in crash:
        parts.append(f"collapsed (gain over the marginal baseline of the same eval windows at most "
                     f"max({COLLAPSE_SE:g} standard errors, {COLLAPSE_FRACTION:g} x the cell's reference gain))")
    if "degraded" in crash:
        parts.append(f"degraded (above the reference LR, (g_R - g)/g_R > {kappa:g}, g the gain over the baseline)")
    label = "crash = " + " or ".join(parts)
    if "collapsed" in crash or "degraded" in crash:
        label += ("; g_R, the cell's reference gain: the mean gain of its reference runs (a boundary search's "
                  "reference trials, run first; else the cell's runs at its lowest LR)")
    if no_reference:
        label += (f"; in {no_reference} cell(s) the reference learned nothing: standard-error margin only, "
                  "no run degraded")
    if fallback:
        label += (f"; {fallback} run(s) recorded without per-window baselines: compared with the whole "
                  f"validation split's baseline, no standard-error margin")
    return label


def paired_gap(window_losses: Sequence[float], window_baselines: Sequence[float]) -> tuple[float, float]:
    """``(mean(loss_i - base_i), its standard error)`` over paired validation windows: the final loss
    minus the marginal baseline on the same windows, and ``sd / sqrt(n)`` (ddof 1) of the
    differences. ``(nan, nan)`` without windows; the standard error is nan for one window."""
    n = len(window_losses)
    if n == 0 or n != len(window_baselines):
        return math.nan, math.nan
    d = [a - b for a, b in zip(window_losses, window_baselines)]
    mean = sum(d) / n
    if n < 2:
        return mean, math.nan
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, math.sqrt(var / n)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def trial_class(final_loss: float | None, initial_loss: float | None, baseline: float | None,
                stop_reason: str | None = None, *, se: float | None = None) -> str:
    """``diverged`` / ``collapsed`` / ``stable`` from one run's final state.

    ``baseline``: the marginal baseline of the windows the final loss was measured on (or, for old
    recordings, of the whole validation split); ``se``: the standard error of the per-window
    differences (:func:`paired_gap`), which sets the margin a run must clear to count as having
    learned. ``stop_reason`` is accepted for the record and decides nothing: a run stopped on a
    non-finite loss has a non-finite final loss, and a run stopped by a loss rule is classed by the
    validation loss it was stopped at (a finite loss below l_0 is never ``diverged``)."""
    if not _finite(final_loss):
        return "diverged"
    if _finite(initial_loss) and final_loss >= initial_loss:
        return "diverged"
    if _finite(baseline):
        margin = COLLAPSE_SE * se if _finite(se) else 0.0
        if baseline - final_loss <= margin:
            return "collapsed"
    return "stable"


@dataclass(frozen=True)
class Point:
    """One finished run of a cell: its learning rate, seed and final state."""

    lr: float
    seed: int
    final_loss: float            # +inf when the loss became non-finite
    initial_loss: float | None   # l_0
    baseline: float | None       # the data's marginal baseline (whole validation split)
    stop_reason: str | None = None  # the early-stopping rule that ended the run, if any
    eval_baseline: float | None = None  # the baseline of the windows final_loss was measured on
    final_loss_se: float | None = None  # standard error of final_loss - eval_baseline over those windows
    is_reference: bool = False  # one of its cell's reference runs (a boundary search's reference trial)

    @property
    def reference(self) -> float | None:
        """The baseline this run is compared with: of its own eval windows when recorded, else of
        the whole validation split."""
        return self.eval_baseline if _finite(self.eval_baseline) else self.baseline

    @property
    def gain(self) -> float | None:
        """What the run learned beyond the marginal baseline, in nats (None without a baseline or
        a finite final loss)."""
        ref = self.reference
        if not _finite(ref) or not _finite(self.final_loss):
            return None
        return ref - self.final_loss

    @property
    def paired(self) -> bool:
        """Whether the run recorded its eval windows' own baseline (else: the fallback)."""
        return _finite(self.eval_baseline)


@dataclass(frozen=True)
class Reference:
    """What a cell reaches at a safe LR: the mean of its reference runs (:func:`cell_reference`),
    against which ``collapsed``'s margin and ``degraded`` are judged. ``gain`` and ``loss`` are
    over the runs whose final loss is finite (``finite`` of ``runs``); ``se`` is their mean standard
    error. ``marked``: the runs were marked as reference runs (a boundary search) rather than taken
    at the cell's lowest LR (a grid sweep)."""

    lr: float | None
    runs: int = 0
    finite: int = 0
    gain: float | None = None
    loss: float | None = None
    se: float | None = None
    marked: bool = False

    @property
    def learned(self) -> bool:
        """Whether the reference learned something to judge by: a finite run, and a mean gain above
        ``COLLAPSE_SE`` of its standard errors (above 0 where none was recorded)."""
        return self.gain is not None and self.gain > max(0.0, COLLAPSE_SE * (self.se or 0.0))

    def collapse_margin(self, se: float | None) -> float:
        """The gain a run with standard error ``se`` must exceed not to be ``collapsed``: the larger
        of ``COLLAPSE_SE`` x se and ``COLLAPSE_FRACTION`` x the reference gain (the standard-error
        margin alone when the reference learned nothing)."""
        m = COLLAPSE_SE * se if _finite(se) else 0.0
        return max(m, COLLAPSE_FRACTION * self.gain) if self.learned else m

    def as_dict(self) -> dict:
        return {"reference_lr": self.lr, "reference_runs": self.runs, "reference_finite": self.finite,
                "reference_gain": self.gain, "reference_loss": self.loss, "reference_se": self.se,
                "reference_learned": self.learned, "reference_marked": self.marked}


def reference_indices(points: Sequence[Point]) -> list[int]:
    """The cell's reference runs: those marked ``is_reference``, else every run at its lowest LR."""
    marked = [i for i, p in enumerate(points) if p.is_reference]
    if marked or not points:
        return marked
    lo = min(p.lr for p in points)
    return [i for i, p in enumerate(points) if p.lr == lo]


def cell_reference(points: Sequence[Point]) -> Reference:
    """The :class:`Reference` of a cell from its runs (:func:`reference_indices`)."""
    idx = reference_indices(points)
    if not idx:
        return Reference(None)
    refs = [points[i] for i in idx]
    fin = [p for p in refs if _finite(p.final_loss)]
    gains = [p.gain for p in fin]
    ses = [p.final_loss_se for p in fin if _finite(p.final_loss_se)]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return Reference(refs[0].lr, len(refs), len(fin),
                     mean(gains) if gains and all(g is not None for g in gains) else None,
                     mean([p.final_loss for p in fin]), mean(ses), any(p.is_reference for p in refs))


def classify(points: Sequence[Point], kappa: float = DEFAULT_KAPPA, reference: Reference | None = None) -> list[str]:
    """The class of every point of one cell, against the cell's :class:`Reference` (``reference``,
    else :func:`cell_reference` of ``points``): ``collapsed`` when the gain is at most
    ``reference.collapse_margin(se)``; ``degraded`` when, above the reference LR, the gain is less
    than ``1 - kappa`` of the reference gain. Runs without any recorded baseline (the oldest
    recordings) are judged by their loss: degraded when ``(L - L_R) / (l_0 - L_R) > kappa``."""
    classes = [trial_class(p.final_loss, p.initial_loss, p.reference, p.stop_reason, se=p.final_loss_se)
               for p in points]
    ref = reference if reference is not None else cell_reference(points)
    for i, p in enumerate(points):
        if classes[i] != "stable":
            continue
        above = ref.lr is not None and p.lr > ref.lr
        if p.gain is not None:
            if p.gain <= ref.collapse_margin(p.final_loss_se):
                classes[i] = "collapsed"
            elif above and ref.learned and (ref.gain - p.gain) / ref.gain > kappa:
                classes[i] = "degraded"
        elif above and ref.loss is not None and _finite(p.initial_loss) and p.initial_loss > ref.loss:
            # no baseline recorded: the gap to l_0 is the scale (the rule before baselines were recorded)
            if (p.final_loss - ref.loss) / (p.initial_loss - ref.loss) > kappa:
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
            seed: int | None = None, classes: Sequence[str] | None = None) -> Bracket:
    """The bracket of one cell from its points (``seed``: only that seed's runs vote; the classes,
    ``degraded`` included, are always decided over all points of the cell, :func:`classify`, unless
    given as ``classes``)."""
    classes = classify(points, kappa) if classes is None else classes
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
