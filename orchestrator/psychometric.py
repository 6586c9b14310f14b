"""The crash boundary of one cell as a psychometric function, on a grid posterior (numpy only).

Model. With ``x = log(lr)``, a run crashes with probability

    P(crash | x) = lapse + (1 - 2 lapse) * F((x - mu) / s),     F(z) = 1 / (1 + exp(-z))

``mu`` is the log of LR50 (P(crash) = 0.5) and ``s`` the width of the transition, in log-LR: the
underlying curve ``F`` goes from 0.1 to 0.9 between ``lr10 = exp(mu - s ln 9)`` and
``lr90 = exp(mu + s ln 9)`` (a band of ``lr90 / lr10 = 9^(2 s)``). The *lapse* rate (default
:data:`LAPSE` = 0.02 at each end) is the chance that a run ends against its LR's odds: a crash far
below the boundary or a stable run far above it. Without it one fluke would pin the boundary (the
likelihood of a crash at an LR where F is 1e-9 would be 1e-9); with it a fluke costs a factor
~50, which a few runs around it outweigh. ``lr10`` / ``lr90`` are those of ``F``, not of the lapsed
curve (which never reaches 0 or 1).

Posterior. A grid over ``(mu, log s)``: ``mu`` uniform over the cell's LR range extended by
:data:`EXTEND` of its log-width at each end (so that a boundary outside the range shows as
posterior mass outside it, not as a pile at the edge), ``s`` over ``S_RANGE`` with a prior
proportional to ``s ** S_POWER`` on the log grid. The
posterior given the cell's finished runs ``(x_i, crashed_i)`` is the prior times the product of the
Bernoulli likelihoods, normalised over the grid (:func:`posterior`; :func:`log_likelihood` is the
direct computation a test compares it with). Intervals are equal-tailed quantiles of the posterior
(:func:`summarize`), interpolated between grid points.

Placement (the Psi method, Kontsevich & Tyler 1999; QUEST+, Watson 2017). The next LR is the
candidate that minimises the expected entropy of the posterior of ``mu`` after its outcome
(:func:`expected_entropy`): the marginal of ``mu`` rather than the joint, since LR50 is what the
search must pin (Prins 2013 makes the same choice for thresholds). Trials still running count:
the expectation runs over the joint outcomes of the pending trials and the candidate, so a second
proposal goes where it adds to the first (exact for up to :data:`MAX_EXACT_PENDING` pending
trials; beyond, a Thompson draw: the ``mu`` of a posterior sample).

This module imports numpy only, so that it can be tested and benchmarked without Ray, MLflow or
Optuna (``orchestrator/boundary.py`` wraps it in an Optuna sampler).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LAPSE = 0.02
"""Lapse rate at each end: P(crash) never goes below 0.02 or above 0.98."""
EXTEND = 0.25
"""The prior of ``mu`` covers the LR range extended by this fraction of its log-width at each end."""
S_RANGE = (0.02, 2.0)
"""Transition width ``s`` in log-LR: from a band lr90/lr10 of x1.09 to one of x6600 (log-uniform prior)."""
S_POWER = 0.5
"""The prior of ``s`` is proportional to ``s ** S_POWER`` on the log grid (0 would be log-uniform):
it leans a little toward wide transitions, since a wide cell taken for a sharp one after a few
consistent runs gets too narrow an interval (coverage of band-x5 cells 85 % with 0, 88 % with 0.5
in benchmarks/boundary_efficiency.py, 72 cells each), while a sharp cell taken for a wide one only
costs trials (median 13 -> 15)."""
LEVEL = 0.90
"""The credible level of every interval."""
LN9 = math.log(9.0)
MAX_EXACT_PENDING = 4
TARGET = "mu"


@dataclass(frozen=True)
class Grid:
    mu: np.ndarray       # (M,) log-LR
    log_s: np.ndarray    # (S,)
    lr_range: tuple[float, float]
    lapse: float = LAPSE
    s_power: float = 0.0
    """The prior of ``s`` is proportional to ``s ** s_power`` on the log-spaced grid (0: uniform in log s)."""

    @property
    def log_prior(self) -> np.ndarray:
        lp = np.broadcast_to(self.s_power * self.log_s[None, :], self.shape)
        return lp - np.logaddexp.reduce(lp, axis=None)

    @property
    def s(self) -> np.ndarray:
        return np.exp(self.log_s)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.mu), len(self.log_s)


def make_grid(lr_range: tuple[float, float], n_mu: int = 241, n_s: int = 21, lapse: float = LAPSE,
              extend: float = EXTEND, s_range: tuple[float, float] = S_RANGE, s_power: float = S_POWER) -> Grid:
    lo, hi = math.log(lr_range[0]), math.log(lr_range[1])
    pad = extend * (hi - lo)
    return Grid(np.linspace(lo - pad, hi + pad, n_mu), np.linspace(*np.log(s_range), n_s),
                (float(lr_range[0]), float(lr_range[1])), lapse, s_power)


def p_crash(grid: Grid, x: np.ndarray | float) -> np.ndarray:
    """P(crash | x, mu, s) on the grid: shape ``x.shape + (M, S)``."""
    x = np.asarray(x, dtype=float)[..., None, None]
    z = (x - grid.mu[:, None]) / grid.s[None, :]
    return grid.lapse + (1 - 2 * grid.lapse) / (1 + np.exp(-np.clip(z, -500, 500)))


def log_likelihood(grid: Grid, lrs: Sequence[float], crashed: Sequence[bool]) -> np.ndarray:
    """log P(data | mu, s) on the grid, summed run by run (the direct computation)."""
    out = np.zeros(grid.shape)
    for lr, c in zip(lrs, crashed):
        p = p_crash(grid, math.log(lr))
        out += np.log(p if c else 1 - p)
    return out


def posterior(grid: Grid, lrs: Sequence[float], crashed: Sequence[bool]) -> np.ndarray:
    """The normalised posterior over the grid (uniform prior in ``mu`` and ``log s``); runs at the
    same LR are counted together (crashes k of n: ``k log p + (n - k) log(1 - p)``)."""
    if len(lrs) == 0:
        return np.exp(grid.log_prior)
    x = np.log(np.asarray(lrs, dtype=float))
    c = np.asarray(crashed, dtype=bool)
    ux, inv = np.unique(x, return_inverse=True)
    k = np.bincount(inv, weights=c.astype(float), minlength=len(ux))
    n = np.bincount(inv, minlength=len(ux)).astype(float)
    p = p_crash(grid, ux)                                    # (U, M, S)
    ll = np.tensordot(k, np.log(p), axes=1) + np.tensordot(n - k, np.log1p(-p), axes=1) + grid.log_prior
    w = np.exp(ll - ll.max())
    return w / w.sum()


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles of a discrete distribution, the CDF interpolated linearly between mass points."""
    v, w = values.ravel(), weights.ravel()
    order = np.argsort(v, kind="stable")
    v, w = v[order], w[order]
    cdf = np.cumsum(w) - w / 2
    cdf /= w.sum()
    return np.interp(qs, cdf, v)


@dataclass(frozen=True)
class Fit:
    """A cell's boundary: LR50 and the band's ends with their intervals (``LEVEL``), in LR."""

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

    @property
    def width(self) -> float:
        """The interval of LR50 as a ratio, high / low."""
        return self.lr50_high / self.lr50_low

    @property
    def band(self) -> float:
        """The transition band lr90 / lr10 at the posterior medians."""
        return self.lr90 / self.lr10

    def as_dict(self) -> dict[str, float]:
        return {"lr50": self.lr50, "lr50_low": self.lr50_low, "lr50_high": self.lr50_high,
                "lr10": self.lr10, "lr10_low": self.lr10_low, "lr10_high": self.lr10_high,
                "lr90": self.lr90, "lr90_low": self.lr90_low, "lr90_high": self.lr90_high,
                "interval_ratio": self.width, "band": self.band, "transition_s": self.s,
                "p_above_range": self.p_above_range, "p_below_range": self.p_below_range}


def summarize(grid: Grid, post: np.ndarray, n_trials: int = 0, level: float = LEVEL) -> Fit:
    a = (1 - level) / 2
    qs = (0.5, a, 1 - a)
    mu_w = post.sum(axis=1)
    m = np.exp(weighted_quantiles(grid.mu, mu_w, qs))
    s_med = float(np.exp(weighted_quantiles(grid.log_s, post.sum(axis=0), [0.5])[0]))
    off = LN9 * grid.s[None, :]
    l10 = np.exp(weighted_quantiles(grid.mu[:, None] - off, post, qs))
    l90 = np.exp(weighted_quantiles(grid.mu[:, None] + off, post, qs))
    lo, hi = math.log(grid.lr_range[0]), math.log(grid.lr_range[1])
    return Fit(*map(float, m), *map(float, l10), *map(float, l90), s_med,
               float(mu_w[grid.mu > hi].sum()), float(mu_w[grid.mu < lo].sum()), n_trials)


def fit(lr_range: tuple[float, float], lrs: Sequence[float], crashed: Sequence[bool],
        grid: Grid | None = None) -> Fit:
    g = grid or make_grid(lr_range)
    return summarize(g, posterior(g, lrs, crashed), len(lrs))


def _entropy_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For unnormalised masses ``a`` (..., M): their total Z and the entropy of a / Z."""
    z = a.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        alog = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0).sum(axis=-1)
        h = np.where(z > 0, np.log(np.where(z > 0, z, 1.0)) - alog / np.where(z > 0, z, 1.0), 0.0)
    return z, h


def expected_entropy(grid: Grid, post: np.ndarray, candidates: Sequence[float],
                     pending: Sequence[float] = (), target: str = TARGET) -> np.ndarray:
    """E[H(mu | data, pending outcomes, candidate outcome)] for every candidate LR: the pending
    trials' outcomes are not known yet, so the expectation runs over them too."""
    pending = list(pending)[:MAX_EXACT_PENDING]
    ws = [post]
    for lr in pending:  # every joint outcome of the pending trials: 2^m weighted posteriors
        p = p_crash(grid, math.log(lr))
        ws = [w * q for w in ws for q in (p, 1 - p)]
    pc = p_crash(grid, np.log(np.asarray(candidates, dtype=float)))   # (C, M, S)
    total = np.zeros(len(candidates))
    for w in ws:
        for lik in (pc, 1 - pc):
            a = (np.einsum("ms,cms->cm", w, lik) if target == "mu"
                 else (w[None] * lik).reshape(len(candidates), -1))
            z, h = _entropy_rows(a)
            total += z * h
    return total


def candidates(lr_range: tuple[float, float], n: int = 64) -> list[float]:
    """The LRs the search may propose: log-spaced over the range, rounded to 6 significant digits."""
    return sorted({float(f"{v:.6g}") for v in np.geomspace(lr_range[0], lr_range[1], n)})


def next_lr(grid: Grid, lrs: Sequence[float], crashed: Sequence[bool], pending: Sequence[float] = (),
            cands: Sequence[float] | None = None, rng: np.random.Generator | None = None,
            target: str = TARGET) -> float:
    """The Psi method's next LR given the finished runs and the LRs still running."""
    cands = list(cands) if cands is not None else candidates(grid.lr_range)
    post = posterior(grid, lrs, crashed)
    if len(pending) > MAX_EXACT_PENDING:  # Thompson: the LR50 of one posterior sample
        rng = rng or np.random.default_rng(len(lrs) + len(pending))
        i = rng.choice(post.size, p=post.ravel())
        mu = grid.mu[i // grid.shape[1]]
        return min(cands, key=lambda c: abs(math.log(c) - mu))
    e = expected_entropy(grid, post, cands, pending, target)
    return cands[int(np.argmin(e))]


def stop_reason(f: Fit, resolution: float, edge_mass: float = 0.9) -> str | None:
    """Why a cell's search may stop now: ``interval`` (the LR50 interval is narrower than
    ``resolution``), ``range_edge`` (LR50 lies outside the LR range with posterior probability
    >= ``edge_mass``), else None (go on, budget permitting)."""
    if f.width <= resolution:
        return "interval"
    if f.p_above_range >= edge_mass or f.p_below_range >= edge_mass:
        return "range_edge"
    return None
