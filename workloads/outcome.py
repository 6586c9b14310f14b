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
               windows' own noise cancels), is at most ``COLLAPSE_SE`` (2) standard errors of the
               per-window differences, or less than ``COLLAPSE_FRACTION`` (a tenth) of the best
               gain in the cell;
``degraded``   the run is finite and learned, but ended far from the cell's best at a higher LR:
               ``(L - L*) / (B - L*) > kappa``, i.e. it closed less than ``1 - kappa`` of the gap
               between the marginal baseline B and the cell's best L* (reached at a lower LR);
               normalised by the baseline-to-best gap, so it can fire on byte-level text, whose
               baseline (3.26) lies far below l_0 (5.5);
``stable``     none of these.

:func:`trial_class` needs only the trial (the standard-error margin); the tenth-of-the-best margin
and ``degraded`` need the cell (:func:`classify`). Runs recorded before per-window baselines existed
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
the cell's best."""
COLLAPSE_SE = 2.0
"""A run whose gain over the baseline is at most this many standard errors learned nothing
detectable."""
COLLAPSE_FRACTION = 0.1
"""A run that closed less than this fraction of the gap between the baseline and the cell's best run
learned nothing worth the name."""
SIZE_FIELDS = ("workload", "depth", "width", "heads", "seq_len", "img_size", "patch_size", "window_size",
               "mlp_ratio", "batch_size", "steps", "data", "data_path", "vocab_size", "eval_batches")
"""The TrialConfig fields that make a *workload and size*: the runs over which the best gain, the
scale of ``collapsed``'s margin, is taken (stabilizers, warmup, schedule, LR and seed vary within)."""


def validate_crash(crash: Iterable[str]) -> tuple[str, ...]:
    crash = tuple(crash)
    bad = [c for c in crash if c not in CLASSES or c == "stable"]
    if bad or not crash:
        raise ValueError(f"crash: {list(crash)!r}; allowed: a non-empty subset of "
                         f"{[c for c in CLASSES if c != 'stable']}")
    return crash


def criterion_label(crash: Sequence[str], kappa: float = DEFAULT_KAPPA, fallback: int = 0) -> str:
    """How a crash was decided, for table captions, plot titles and MLflow tags. ``fallback``: how
    many runs were recorded without per-window baselines (compared with the whole split's)."""
    parts = []
    if "diverged" in crash:
        parts.append("diverged (non-finite, or final val loss >= l_0)")
    if "collapsed" in crash:
        parts.append(f"collapsed (final val loss not below the marginal baseline of the same eval windows "
                     f"by more than {COLLAPSE_SE:g} standard errors and {COLLAPSE_FRACTION:g} of the "
                     f"baseline-to-best gap)")
    if "degraded" in crash:
        parts.append(f"degraded ((L - L*)/(B - L*) > {kappa:g}, B the baseline)")
    label = "crash = " + " or ".join(parts)
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


def best_gain(points: Iterable[Point]) -> float | None:
    """The largest gain of the runs that learned (:func:`trial_class` ``stable``), or None: the
    reference of :func:`classify`'s ``collapse_fraction`` margin, over a workload and size."""
    gains = [p.gain for p in points
             if p.gain is not None and trial_class(p.final_loss, p.initial_loss, p.reference,
                                                   se=p.final_loss_se) == "stable"]
    return max(gains) if gains else None


def classify(points: Sequence[Point], kappa: float = DEFAULT_KAPPA,
             collapse_fraction: float = COLLAPSE_FRACTION, reference_gain: float | None = None) -> list[str]:
    """The class of every point of one cell. ``degraded`` is relative to the cell's best run (the
    one with the largest gain); the ``collapse_fraction`` margin of ``collapsed`` to the best gain
    of the workload and size, ``reference_gain`` (:func:`best_gain` over every cell of the same
    workload and size), or the cell's own best where that is larger or not given."""
    classes = [trial_class(p.final_loss, p.initial_loss, p.reference, p.stop_reason, se=p.final_loss_se)
               for p in points]
    learned = [i for i, c in enumerate(classes) if c == "stable"]
    if not learned:
        return classes
    if all(points[i].gain is not None for i in learned):
        b = max(learned, key=lambda i: (points[i].gain, -points[i].lr))
        best, g_best = points[b], points[b].gain
        g_ref = max(g_best, reference_gain or 0.0)
        for i in learned:
            p = points[i]
            if p.gain < collapse_fraction * g_ref:
                classes[i] = "collapsed"
            elif p.lr > best.lr and (g_best - p.gain) / g_best > kappa:
                classes[i] = "degraded"
        return classes
    # no baseline recorded: the gap to l_0 is the scale (the rule before baselines were recorded)
    best = min((points[i] for i in learned), key=lambda p: p.final_loss)
    for i in learned:
        p = points[i]
        l0 = p.initial_loss if p.initial_loss is not None else best.initial_loss
        if p.lr <= best.lr or l0 is None or l0 <= best.final_loss:
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
            seed: int | None = None, reference_gain: float | None = None) -> Bracket:
    """The bracket of one cell from its points (``seed``: only that seed's runs vote; the classes,
    ``degraded`` included, are always decided over all points of the cell; ``reference_gain`` as
    in :func:`classify`)."""
    classes = classify(points, kappa, reference_gain=reference_gain)
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
