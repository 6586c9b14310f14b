"""The crash boundary of one cell as a psychometric function, on a grid posterior (numpy only).

Model. With ``x = log(lr)``, a run crashes with probability

    P(crash | x) = floor + (1 - floor - lapse) * F((x - x50) / s + z0),     F(z) = 1 / (1 + exp(-z))

with ``z0 = logit((0.5 - floor) / (1 - floor - lapse))``, so that P(crash | x50) = 0.5 exactly:
``x50`` is the log of **LR50**, the LR where the *fitted* P(crash) is 0.5, and is a parameter of
the grid (with a floor, LR50 is not the midpoint of ``F``: the midpoint ``mu = x50 - s z0`` lies
above it). The four parameters, as in QUEST+ (Watson 2017), each on a grid with a prior:

* ``x50``, uniform over the cell's LR range extended by :data:`EXTEND` of its log-width at each end
  (so that a boundary outside the range shows as posterior mass outside it, not as a pile at the
  edge), on a lattice whose step is a whole fraction of the candidates' (see *Lattice*);
* ``s``, the width of the transition in log-LR, log-spaced over :data:`S_RANGE` with a prior
  proportional to ``s ** S_POWER``;
* ``floor`` (:data:`FLOORS`, prior :data:`FLOOR_PRIOR`): the chance of a crash far *below* the
  boundary. Its smallest value is the old lapse (a fluke costs a factor ~50 instead of pinning the
  boundary); larger ones absorb a plateau of crashes below the boundary (P(crash) = 0.3 over a
  decade) that a pure logistic can only explain by a wide, low transition, which drags LR50 down;
* ``lapse`` (:data:`LAPSES`, prior :data:`LAPSE_PRIOR`): the chance of a *stable* run far above the
  boundary (the fitted P(crash) tops at ``1 - lapse``): an island of stable LRs above the boundary.

Both are at most 0.4, so that P(crash) always crosses 0.5 and ``F(z0)`` lies in [0.1, 0.9]:
LR50 is always inside the band below.

The band. ``lr10`` and ``lr90`` are where the transition has risen 10 % and 90 % of the way from
the floor to the ceiling: ``mu -/+ s ln 9`` (where the fitted P(crash) is 0.1 and 0.9 when floor
and lapse are 0; with a floor of 0.3 the fitted P(crash) never falls to 0.1, but the transition
still has a width). ``lr10 <= lr50 <= lr90`` on every grid point.

Posterior. The prior times the product of the runs' Bernoulli likelihoods, normalised over the
grid (:func:`posterior`; :func:`log_likelihood` is the direct computation a test compares it
with); runs at the same LR are counted together. Every reported figure is a quantile of a function
of the grid point under the posterior: LR50's interval of the ``x50`` marginal, the band's ends of
``mu -/+ s ln 9`` (:func:`summarize`), interpolated between grid points.

Censored. When the posterior puts LR50 outside the LR range (probability >= 0.5 above the top or
below the bottom), its median and interval are numbers the prior made (the likelihood is flat
there: no run told them); :class:`Fit` then says ``censored`` ``above`` / ``below`` and gives only
a one-sided bound (``lr50_bound``: LR50 > bound with posterior probability :data:`LEVEL` for
``above``, the (1 - LEVEL) quantile, at most the range's top; for ``below`` LR50 < bound, the LEVEL
quantile, at least its bottom); ``as_dict`` sets LR50, its interval and the band to None.

Placement (the Psi method, Kontsevich & Tyler 1999; QUEST+, Watson 2017). The next LR is the
candidate that minimises the expected entropy of the posterior of ``x50`` after its outcome
(:func:`expected_entropy`): the marginal of LR50 rather than the joint, since LR50 is what the
search must pin (Prins 2013 makes the same choice for thresholds). Trials still running count:
the expectation runs over the joint outcomes of the pending trials and the candidate, so a second
proposal goes where it adds to the first (exact for up to :data:`MAX_EXACT_PENDING` pending
trials; beyond, a Thompson draw: the LR50 of a posterior sample).

Lattice (speed). The candidates (:func:`candidates`, :data:`N_CANDIDATES` log-spaced LRs over the
range, the ends included) sit on the ``x50`` lattice, every ``r``-th point. P(crash) at a lattice
LR depends on the LR only through its distance from ``x50`` in lattice steps, so one table of
P(crash) per distance (:attr:`Grid.table`) serves every run and candidate on the lattice (a view,
no exp or log per run); a run elsewhere (a grid sweep's LRs) is computed directly. The posterior
of the last few data sets is kept (:func:`posterior`), since a search asks for it several times
per trial.

Stopping (:func:`stop_reason`). A cell stops on ``interval`` when LR50's reported interval
(:data:`LEVEL`) is at most ``resolution``. A search that stops when its interval first looks narrow
enough picks the cells whose runs look sharp by chance; the stricter rules one would try against
that were measured and make it worse (``benchmarks/boundary_efficiency.py``'s families run to the
budget, every stopping rule replayed on the same runs, 100 cells a family): judging a wider
interval (95 %), requiring the interval to stay narrow for 3 or 8 more trials, or judging it
conditional on the wider half of the width's posterior all lower the coverage of wide (band x5)
cells that stopped on ``interval`` from 89 % to 52-81 %, since fewer of them stop before the
budget and those that do are the luckier ones. Measured once the same way (the runs of 100
cells a family reweighted, not part of the benchmark's ``--replay``), other priors of ``s`` move
the balance, not the selection: proportional to ``s`` every family is covered at 89-100 % for
20-25 % more trials; log-uniform saves 15-20 % of the trials with wide cells that stopped on
``interval`` at 86 % and island cells at 85 %. Placing trials for the joint entropy of (LR50,
``s``) (``target="x50_s"``, 60 cells a family) spreads them into the plateau and the island: those
fall to 75-77 %.

This module imports numpy only, so that it can be tested and benchmarked without Ray, MLflow or
Optuna (``orchestrator/boundary.py`` wraps it in an Optuna sampler).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

FLOORS = (0.02, 0.1, 0.2, 0.3, 0.4)
"""The grid of the crash floor (P(crash) far below the boundary)."""
FLOOR_PRIOR = (0.6, 0.1, 0.1, 0.1, 0.1)
"""Its prior: most cells have no floor beyond a fluke's 0.02."""
LAPSES = (0.02, 0.1, 0.2, 0.3, 0.4)
"""The grid of the lapse (P(stable) far above the boundary)."""
LAPSE_PRIOR = (0.6, 0.1, 0.1, 0.1, 0.1)
LAPSE = FLOORS[0]
"""The smallest floor and lapse: a fluke's chance at either end."""
EXTEND = 0.25
"""The prior of LR50 covers the LR range extended by this fraction of its log-width at each end."""
S_RANGE = (0.02, 2.0)
"""Transition width ``s`` in log-LR: from a band lr90/lr10 of x1.09 to one of x6600."""
N_S = 41
"""Points of the ``s`` grid (log-spaced)."""
S_POWER = 0.5
"""The prior of ``s`` is proportional to ``s ** S_POWER`` on the log grid (0 would be log-uniform):
it leans a little toward wide transitions, since a wide cell taken for a sharp one after a few
consistent runs gets too narrow an interval, while a sharp cell taken for a wide one only costs
trials."""
LEVEL = 0.90
"""The credible level of every interval reported."""
STOP_LEVEL = LEVEL
"""The level of the interval the stopping rule judges: the reported one (see *Stopping* above)."""
EDGE_MASS = 0.9
"""A cell stops on ``range_edge`` when LR50 lies outside the range with this probability."""
N_CANDIDATES = 64
"""The LRs a search may propose: log-spaced over the range, the ends included."""
MAX_STEP = 0.04
"""The largest step of the LR50 lattice in log-LR (4 %): the candidates' step divided by a whole
number ``r``, the smallest that reaches it."""
LN9 = math.log(9.0)
MAX_EXACT_PENDING = 4
TARGET = "x50"
_CACHE = 8  # posteriors kept per grid


def logit(p):
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True, eq=False)
class Grid:
    """The parameter grid of one LR range, with its prior and the lattice tables (shape
    ``(M, S, G, L)``: x50, log s, floor, lapse)."""

    x50: np.ndarray        # (M,) log-LR, lattice points x0 + (i - pad) * step
    log_s: np.ndarray      # (S,)
    floor: np.ndarray      # (G,)
    lapse: np.ndarray      # (L,)
    lr_range: tuple[float, float]
    step: float            # the lattice step in log-LR
    pad: int               # x50[0] is lattice point -pad (lattice point 0: the range's bottom)
    top: int               # lattice point of the range's top
    ratio: int             # lattice points per candidate step
    log_prior: np.ndarray  # (M, S, G, L), normalised
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.x50), len(self.log_s), len(self.floor), len(self.lapse)

    @property
    def s(self) -> np.ndarray:
        return np.exp(self.log_s)

    def clear_cache(self) -> None:
        """Forget the posteriors kept (see :func:`posterior`): the next one is computed afresh."""
        self._cache.clear()

    @cached_property
    def z0(self) -> np.ndarray:
        """(G, L): F's argument at LR50, logit((0.5 - floor) / (1 - floor - lapse))."""
        g, lam = self.floor[:, None], self.lapse[None, :]
        return logit((0.5 - g) / (1 - g - lam))

    def p_of_distance(self, d: np.ndarray) -> np.ndarray:
        """P(crash) at ``x = x50 + d`` for every (s, floor, lapse): shape ``d.shape + (S, G, L)``."""
        d = np.asarray(d, dtype=float)[..., None, None, None]
        z = d / self.s[:, None, None] + self.z0[None]
        g, lam = self.floor[:, None], self.lapse[None, :]
        return g + (1 - g - lam) / (1 + np.exp(-np.clip(z, -500, 500)))

    @cached_property
    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P(crash), log P and log(1 - P) per lattice distance, rows ``n = 0 .. 2 (top + pad)`` at
        ``x - x50 = (top + pad - n) * step``, each ``(K,)`` = S * G * L flattened. The rows for a
        run at lattice point ``t`` and every ``x50`` are ``[top - t, top - t + M)``."""
        n = np.arange(2 * (self.top + self.pad) + 1)
        p = self.p_of_distance((self.top + self.pad - n) * self.step).reshape(len(n), -1)
        # log(1 - p) from the complementary form: 1 - p = lapse + (1 - floor - lapse) F(-z)
        d = ((self.top + self.pad - n) * self.step)[:, None, None, None]
        z = d / self.s[:, None, None] + self.z0[None]
        g, lam = self.floor[:, None], self.lapse[None, :]
        q = (lam + (1 - g - lam) / (1 + np.exp(np.clip(z, -500, 500)))).reshape(len(n), -1)
        return p, np.log(p), np.log(q)

    def lattice_point(self, lr: float) -> int | None:
        """The lattice point of ``lr`` if it is one inside the range (to 1e-9 of a step), else None."""
        t = (math.log(lr) - math.log(self.lr_range[0])) / self.step
        k = round(t)
        return k if abs(t - k) < 1e-9 and 0 <= k <= self.top else None

    @cached_property
    def band_order(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """log lr10 and log lr90 of every grid point, flattened and sorted, with their orders."""
        s = self.s[None, :, None, None]
        z0 = self.z0[None, None]
        x50 = self.x50[:, None, None, None]
        x10 = np.broadcast_to(x50 - s * (z0 + LN9), self.shape).ravel()
        x90 = np.broadcast_to(x50 - s * (z0 - LN9), self.shape).ravel()
        o10, o90 = np.argsort(x10, kind="stable"), np.argsort(x90, kind="stable")
        return x10[o10], o10, x90[o90], o90


def _prior(values: Sequence[float], weights: Sequence[float] | None, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or not len(v) or (v < 0).any() or (v > 0.4).any():
        raise ValueError(f"{name}: {list(values)}: must be values in [0, 0.4] (P(crash) must cross 0.5 "
                         "with LR50 inside the band)")
    w = np.ones(len(v)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != v.shape or (w <= 0).any():
        raise ValueError(f"{name} prior: {list(w)}: must be {len(v)} positive weights")
    return np.log(w / w.sum())


def make_grid(lr_range: tuple[float, float], n_s: int = N_S, floors: Sequence[float] = FLOORS,
              floor_prior: Sequence[float] | None = FLOOR_PRIOR, lapses: Sequence[float] = LAPSES,
              lapse_prior: Sequence[float] | None = LAPSE_PRIOR, extend: float = EXTEND,
              s_range: tuple[float, float] = S_RANGE, s_power: float = S_POWER,
              n_candidates: int = N_CANDIDATES, max_step: float = MAX_STEP) -> Grid:
    """The grid of one LR range: ``x50`` on the candidates' lattice refined to at most
    ``max_step``, extended by ``extend`` of the range's log-width at each end."""
    lo, hi = math.log(lr_range[0]), math.log(lr_range[1])
    d = (hi - lo) / (n_candidates - 1)
    ratio = max(1, math.ceil(d / max_step - 1e-9))
    step = d / ratio
    top = (n_candidates - 1) * ratio
    pad = math.ceil(extend * top)
    x50 = lo + np.arange(-pad, top + pad + 1) * step
    log_s = np.linspace(*np.log(s_range), n_s)
    lp_s = s_power * log_s
    lp_s[[0, -1]] += math.log(0.5)  # trapezoid weights: the ends stand for half a step each
    lp_x = np.zeros(len(x50))
    lp_x[[0, -1]] = math.log(0.5)
    lp = (lp_x[:, None, None, None] + lp_s[None, :, None, None] + _prior(floors, floor_prior, "floors")[None, None, :, None]
          + _prior(lapses, lapse_prior, "lapses")[None, None, None, :])
    lp = np.broadcast_to(lp, (len(x50), n_s, len(floors), len(lapses)))
    lp = lp - np.logaddexp.reduce(lp, axis=None)
    return Grid(x50, log_s, np.asarray(floors, dtype=float), np.asarray(lapses, dtype=float),
                (float(lr_range[0]), float(lr_range[1])), step, pad, top, ratio, np.ascontiguousarray(lp))


def candidates(grid: Grid) -> list[float]:
    """The LRs the search may propose: every ``ratio``-th lattice point over the range, the range's
    own ends exactly."""
    lo, hi = grid.lr_range
    out = [float(math.exp(math.log(lo) + t * grid.step)) for t in range(0, grid.top + 1, grid.ratio)]
    out[0], out[-1] = lo, hi
    return out


def p_crash(grid: Grid, x: np.ndarray | float) -> np.ndarray:
    """P(crash | x, grid point) computed directly: shape ``x.shape + (M, S, G, L)``."""
    x = np.asarray(x, dtype=float)
    return grid.p_of_distance(x[..., None] - grid.x50)


def run_rows(grid: Grid, lr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(crash), log P, log(1 - P) of a run at ``lr`` for every grid point, ``(M, K)``: a view of
    the lattice table for a lattice LR, computed otherwise."""
    t = grid.lattice_point(lr)
    m = len(grid.x50)
    if t is not None:
        p, lp, lq = grid.table
        a = grid.top - t
        return p[a:a + m], lp[a:a + m], lq[a:a + m]
    p = p_crash(grid, math.log(lr)).reshape(m, -1)
    return p, np.log(p), np.log1p(-p)


def log_likelihood(grid: Grid, lrs: Sequence[float], crashed: Sequence[bool]) -> np.ndarray:
    """log P(data | grid point), summed run by run from the model's formula (the direct computation)."""
    out = np.zeros(grid.shape)
    for lr, c in zip(lrs, crashed):
        p = p_crash(grid, math.log(lr))
        out += np.log(p if c else 1 - p)
    return out


def posterior(grid: Grid, lrs: Sequence[float], crashed: Sequence[bool]) -> np.ndarray:
    """The normalised posterior over the grid, ``(M, S, G, L)``; runs at the same LR are counted
    together (crashes k of n: ``k log p + (n - k) log(1 - p)``). The last few are kept per grid
    (read-only arrays)."""
    key = (tuple(float(v) for v in lrs), tuple(bool(c) for c in crashed))
    hit = grid._cache.get(key)
    if hit is not None:
        grid._cache.move_to_end(key)
        return hit
    m = len(grid.x50)
    ll = grid.log_prior.reshape(m, -1).copy()
    counts: dict[float, list[int]] = {}
    for lr, c in zip(*key):
        kn = counts.setdefault(lr, [0, 0])
        kn[0] += c
        kn[1] += 1
    for lr, (k, n) in counts.items():
        _, lp, lq = run_rows(grid, lr)
        if k:
            ll += k * lp
        if n - k:
            ll += (n - k) * lq
    w = np.exp(ll - ll.max())
    post = (w / w.sum()).reshape(grid.shape)
    post.flags.writeable = False
    grid._cache[key] = post
    if len(grid._cache) > _CACHE:
        grid._cache.popitem(last=False)
    return post


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles of a discrete distribution, the CDF interpolated linearly between mass points."""
    v, w = values.ravel(), weights.ravel()
    order = np.argsort(v, kind="stable")
    return _sorted_quantiles(v[order], w[order], qs)


def lr50_quantiles(grid: Grid, weights: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles (log-LR) of LR50 given weights over ``grid.x50`` (a marginal of the posterior)."""
    return _sorted_quantiles(grid.x50, np.asarray(weights, dtype=float), qs)


def _sorted_quantiles(v: np.ndarray, w: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    cdf = np.cumsum(w) - w / 2
    cdf /= w.sum()
    return np.interp(qs, cdf, v)


@dataclass(frozen=True)
class Fit:
    """A cell's boundary: LR50 and the band's ends with their intervals (``level``), in LR; how
    much of LR50's posterior lies outside the range, and what that makes of the cell."""

    lr50: float
    lr50_low: float
    lr50_high: float
    lr10: float
    lr10_low: float
    lr10_high: float
    lr90: float
    lr90_low: float
    lr90_high: float
    s: float                 # posterior median of the transition width (log-LR)
    p_above_range: float     # posterior mass of LR50 above / below the LR range
    p_below_range: float
    n_trials: int
    floor: float = LAPSE     # posterior means of the crash floor and the stable lapse
    lapse: float = LAPSE
    lr50_q_low: float = 0.0  # LR50's (1 - level) and level quantiles: the one-sided limits
    lr50_q_high: float = 0.0
    lr_range: tuple[float, float] = (0.0, math.inf)
    level: float = LEVEL

    @property
    def width(self) -> float:
        """The interval of LR50 as a ratio, high / low."""
        return self.lr50_high / self.lr50_low

    @property
    def band(self) -> float:
        """The transition band lr90 / lr10 at the posterior medians."""
        return self.lr90 / self.lr10

    @property
    def censored(self) -> str | None:
        """``above`` / ``below`` when LR50 lies outside the LR range with probability >= 0.5 (its
        median would be a number the prior made), else None."""
        if self.p_above_range >= 0.5:
            return "above"
        if self.p_below_range >= 0.5:
            return "below"
        return None

    @property
    def bound(self) -> float | None:
        """A censored cell's one-sided limit at ``level``: ``above``: LR50 > bound with probability
        ``level`` (its (1 - level) quantile, at most the range's top); ``below``: LR50 < bound (its
        ``level`` quantile, at least the range's bottom); None when not censored."""
        if self.censored == "above":
            return min(self.lr50_q_low, self.lr_range[1])
        if self.censored == "below":
            return max(self.lr50_q_high, self.lr_range[0])
        return None

    def as_dict(self) -> dict[str, float | str | None]:
        """The reported fields; a censored cell's LR50, interval and band are None (no number the
        prior made) and ``lr50_bound`` holds its one-sided limit."""
        cen = self.censored
        out: dict[str, float | str | None] = {
            "lr50": self.lr50, "lr50_low": self.lr50_low, "lr50_high": self.lr50_high,
            "lr10": self.lr10, "lr10_low": self.lr10_low, "lr10_high": self.lr10_high,
            "lr90": self.lr90, "lr90_low": self.lr90_low, "lr90_high": self.lr90_high,
            "interval_ratio": self.width, "band": self.band}
        if cen:
            out = dict.fromkeys(out)
        out.update({"censored": cen, "lr50_bound": self.bound, "transition_s": self.s,
                    "crash_floor": self.floor, "stable_lapse": self.lapse,
                    "p_above_range": self.p_above_range, "p_below_range": self.p_below_range})
        return out


def lr50_summary(grid: Grid, post: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, float, float]:
    """LR50's median, the ends of its ``level`` interval, its (1 - level) and ``level`` quantiles
    (an array of five LRs), and its posterior mass above and below the LR range."""
    a = (1 - level) / 2
    m_w = post.reshape(len(grid.x50), -1).sum(axis=1)
    q = np.exp(_sorted_quantiles(grid.x50, m_w, (0.5, a, 1 - a, 1 - level, level)))
    lo, hi = math.log(grid.lr_range[0]), math.log(grid.lr_range[1])
    return q, float(m_w[grid.x50 > hi + 1e-12].sum()), float(m_w[grid.x50 < lo - 1e-12].sum())


def summarize(grid: Grid, post: np.ndarray, n_trials: int = 0, level: float = LEVEL) -> Fit:
    a = (1 - level) / 2
    qs = (0.5, a, 1 - a)
    q50, above, below = lr50_summary(grid, post, level)
    s_med = float(np.exp(weighted_quantiles(grid.log_s, post.sum(axis=(0, 2, 3)), [0.5])[0]))
    x10, o10, x90, o90 = grid.band_order
    flat = post.ravel()
    l10 = np.exp(_sorted_quantiles(x10, flat[o10], qs))
    l90 = np.exp(_sorted_quantiles(x90, flat[o90], qs))
    floor = float(post.sum(axis=(0, 1, 3)) @ grid.floor)
    lapse = float(post.sum(axis=(0, 1, 2)) @ grid.lapse)
    return Fit(*map(float, q50[:3]), *map(float, l10), *map(float, l90), s_med, above, below, n_trials,
               floor, lapse, float(q50[3]), float(q50[4]), grid.lr_range, level)


def curve(grid: Grid, post: np.ndarray, lrs: Sequence[float], qs: Sequence[float] = (0.05, 0.5, 0.95),
          tol: float = 1e-9) -> np.ndarray:
    """Posterior quantiles of the fitted P(crash) at each LR, ``(len(lrs), len(qs))``, over the grid
    points whose posterior mass is at least ``tol`` of the largest (the rest change no quantile)."""
    flat = post.ravel()
    idx = np.flatnonzero(flat >= tol * flat.max())
    mi, ki = np.divmod(idx, flat.size // len(grid.x50))
    si, gi, li = np.unravel_index(ki, grid.shape[1:])
    s, g, lam, z0 = grid.s[si], grid.floor[gi], grid.lapse[li], grid.z0[gi, li]
    out = []
    for lr in lrs:
        z = (math.log(lr) - grid.x50[mi]) / s + z0
        p = g + (1 - g - lam) / (1 + np.exp(-np.clip(z, -500, 500)))
        out.append(weighted_quantiles(p, flat[idx], qs))
    return np.array(out)


def model_description() -> dict:
    """The model, its grids and priors, and the rules, as recorded beside exported fits."""
    return {"p_crash": "floor + (1 - floor - lapse) / (1 + exp(-((log lr - log lr50) / s + z0))), "
                       "z0 = logit((0.5 - floor) / (1 - floor - lapse))",
            "floors": list(FLOORS), "floor_prior": list(FLOOR_PRIOR), "lapses": list(LAPSES),
            "lapse_prior": list(LAPSE_PRIOR), "s_range": list(S_RANGE), "s_prior_power": S_POWER,
            "lr50_prior": f"log-uniform over the LR range extended by {EXTEND:g} of its log-width at each end",
            "band": "lr10, lr90: where the transition has risen 10 % and 90 % of the way from floor to ceiling",
            "level": LEVEL, "stop_level": STOP_LEVEL,
            "censored": f"above / below when LR50 lies outside the LR range with probability >= 0.5; lr50_bound: "
                        f"above: LR50 > bound with probability {LEVEL:g} (at most the range's top); below: "
                        f"LR50 < bound with probability {LEVEL:g} (at least the range's bottom)"}


def fit(lr_range: tuple[float, float], lrs: Sequence[float], crashed: Sequence[bool],
        grid: Grid | None = None, level: float = LEVEL) -> Fit:
    g = grid or grid_for(lr_range)
    return summarize(g, posterior(g, lrs, crashed), len(lrs), level)


_GRIDS: OrderedDict = OrderedDict()


def grid_for(lr_range: tuple[float, float]) -> Grid:
    """The default grid of an LR range, shared by every caller (its tables are built once)."""
    key = (float(lr_range[0]), float(lr_range[1]))
    if key not in _GRIDS:
        _GRIDS[key] = make_grid(key)
        if len(_GRIDS) > 8:
            _GRIDS.popitem(last=False)
    return _GRIDS[key]


def _entropy_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For unnormalised masses ``a`` (..., M): their total Z and the entropy of a / Z."""
    z = a.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        alog = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0).sum(axis=-1)
        h = np.where(z > 0, np.log(np.where(z > 0, z, 1.0)) - alog / np.where(z > 0, z, 1.0), 0.0)
    return z, h


def expected_entropy(grid: Grid, post: np.ndarray, cands: Sequence[float],
                     pending: Sequence[float] = (), target: str = TARGET, tol: float = 1e-12) -> np.ndarray:
    """E[H(x50 | data, pending outcomes, candidate outcome)] for every candidate LR: the pending
    trials' outcomes are not known yet, so the expectation runs over them too. ``target``
    ``x50_s``: the entropy of the joint of LR50 and the width (measured, not used: see *Stopping*);
    ``joint``: of the whole grid. LR50 values whose posterior mass is below ``tol`` of the
    largest (at either end of the grid) are left out: they change no candidate's score beyond that.
    For the candidates on the lattice the crash marginals of every candidate and LR50 come from one
    product with the lattice table (:attr:`Grid.table`)."""
    m = len(grid.x50)
    w0 = post.reshape(m, -1)
    mass = w0.sum(axis=1)
    keep = np.flatnonzero(mass > tol * mass.max())
    i0, i1 = (int(keep[0]), int(keep[-1]) + 1) if target != "joint" else (0, m)
    ws = [w0[i0:i1]]
    for lr in list(pending)[:MAX_EXACT_PENDING]:  # every joint outcome of the pending trials: 2^m weighted posteriors
        p = run_rows(grid, lr)[0][i0:i1]
        ws = [w * q for w in ws for q in (p, 1 - p)]
    pts = [grid.lattice_point(c) if target in (TARGET, "x50_s") else None for c in cands]
    on = [j for j, t in enumerate(pts) if t is not None]
    starts = np.array([grid.top - pts[j] for j in on], dtype=int)
    total = np.zeros(len(cands))
    cols = np.arange(i1 - i0)
    for w in ws:
        if on and target == TARGET:  # crash[j, i] = sum_k w[i, k] p(lattice distance of candidate j and x50_i, k)
            r0, r1 = starts.min() + i0, starts.max() + i1
            prod = grid.table[0][r0:r1] @ w.T                  # (rows, i)
            crash = prod[(starts - starts.min())[:, None] + cols[None, :], cols[None, :]]
            marg = w.sum(axis=1)
            for a in (crash, marg[None, :] - crash):
                z, h = _entropy_rows(np.maximum(a, 0.0))
                total[on] += z * h
        elif on:  # "x50_s": the joint of LR50 and the width, one product per width
            r0, r1 = starts.min() + i0, starts.max() + i1
            n_s = len(grid.log_s)
            tab = grid.table[0][r0:r1].reshape(r1 - r0, n_s, -1)
            w3 = w.reshape(len(cols), n_s, -1)
            st = starts - starts.min()
            if len(st) > 1 and (np.diff(st) == st[1] - st[0]).all():  # evenly spaced: a strided view
                view = np.lib.stride_tricks.as_strided(
                    tab[st[0]:], shape=(len(st), len(cols)) + tab.shape[1:],
                    strides=((st[1] - st[0]) * tab.strides[0],) + tab.strides, writeable=False)
            else:
                view = tab[st[:, None] + cols[None, :]]
            crash = np.einsum("isk,cisk->cis", w3, view)            # (C, i, S)
            marg = w3.sum(axis=2)
            for a in (crash, marg[None] - crash):
                z, h = _entropy_rows(np.maximum(a, 0.0).reshape(len(on), -1))
                total[on] += z * h
        for j, t in enumerate(pts):
            if t is not None:
                continue
            crash = w * run_rows(grid, cands[j])[0][i0:i1]
            for lik in (crash, w - crash):
                a = (lik.sum(axis=1) if target == TARGET else
                     lik.reshape(len(lik), len(grid.log_s), -1).sum(axis=2).ravel() if target == "x50_s" else lik.ravel())
                z, h = _entropy_rows(a)
                total[j] += z * h
    return total


def next_lr(grid: Grid, lrs: Sequence[float], crashed: Sequence[bool], pending: Sequence[float] = (),
            cands: Sequence[float] | None = None, rng: np.random.Generator | None = None,
            target: str = TARGET) -> float:
    """The Psi method's next LR given the finished runs and the LRs still running."""
    cands = list(cands) if cands is not None else candidates(grid)
    post = posterior(grid, lrs, crashed)
    if len(pending) > MAX_EXACT_PENDING:  # Thompson: the LR50 of one posterior sample
        rng = rng or np.random.default_rng(len(lrs) + len(pending))
        m_w = post.reshape(len(grid.x50), -1).sum(axis=1)
        x = grid.x50[rng.choice(len(m_w), p=m_w / m_w.sum())]
        return min(cands, key=lambda c: abs(math.log(c) - x))
    e = expected_entropy(grid, post, cands, pending, target)
    return cands[int(np.argmin(e))]


def stop_reason(grid: Grid, lrs: Sequence[float], crashed: Sequence[bool], resolution: float,
                stop_level: float = STOP_LEVEL, edge_mass: float = EDGE_MASS) -> str | None:
    """Why a cell's search may stop now: ``interval`` (LR50's interval at ``stop_level``, by
    default the reported one, is at most ``resolution``), ``range_edge`` (LR50 lies outside the LR
    range with probability >= ``edge_mass``), else None (go on, budget permitting)."""
    q, above, below = lr50_summary(grid, posterior(grid, lrs, crashed), stop_level)
    if q[2] / q[1] <= resolution:
        return "interval"
    if above >= edge_mass or below >= edge_mass:
        return "range_edge"
    return None
