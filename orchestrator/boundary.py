"""Crash-boundary search: where each cell of an ablation starts to crash, as a measured probability.

A *cell* is one combination of the spec's non-LR axes (stabilizer x warmup x depth [x width ...]).
Its boundary is not a line: at a given LR some seeds crash and some do not. The search models
P(crash | lr) as a logistic in log-LR with a crash floor below and a stable lapse above
(``orchestrator/psychometric.py``: a grid posterior over LR50, the width ``s``, the floor and the
lapse, numpy only) and reports, from every finished run of the cell (all seeds): ``lr50``, where
the fitted P(crash) = 0.5, with its 90 % interval (``lr50_low``, ``lr50_high``); ``lr10`` and
``lr90``, the band of the transition, with theirs; ``censored`` and ``lr50_bound`` where LR50 lies
outside ``lr_range`` (then ``lr50`` and the band are None); ``n_trials``, ``n_seeds``;
``converged`` and ``stop_reason``; and the older one-seed-vote bracket (``stable_lr``,
``crash_lr``) beside it for reference.

For each cell an Optuna study (ask/tell, persisted in the workdir's Optuna SQLite store) holds the
trials; its sampler proposes the LR of the next one inside ``boundary.lr_range``:

* ``method: psi`` (default), :class:`PsiSampler`: the Psi method (Kontsevich & Tyler 1999): the LR
  whose outcome is expected to shrink the entropy of LR50's posterior most, given the finished
  trials and those still running (``max_in_flight_per_cell`` proposals at once, each accounting for
  the others). Every trial runs a fresh seed, ``fixed.seed`` + its number in the cell's study, so
  replicates come for free and two searches with different offsets share no run. A cell stops when
  LR50's 90 % interval is narrower than ``resolution`` (a ratio, default x1.5) after at least
  ``min_trials_per_cell`` trials (``stop_reason`` ``interval``, ``converged``), when LR50 lies
  outside ``lr_range`` with 90 % probability (``range_edge``), or when ``max_trials_per_cell`` is
  spent (``budget``, not converged).
* ``method: bisect``, :class:`BoundarySampler`: the older bisection at one seed (top of the range,
  bottom, then the geometric middle of [largest stable LR, smallest crashed LR], one re-probe above
  a converged crash end, with ``seeds: k`` the final ends repeated). A quick one-seed look: its
  bracket is narrower than the noise of the cell (issue #17); every table labels it as such. The
  same logistic fit is reported for it, over the few LRs it ran.

Every cell first runs its *reference*: ``reference_seeds`` trials (default 3) at ``reference_lr``
(default: the low end of ``lr_range``), seeds ``fixed.seed`` + 0, 1, ...; its other trials start
once they have all finished. Outcomes are the classes of ``workloads.outcome``, judged against the
cell's own reference runs (decided over the whole cell, as export does), so a cell's classes and
LR50 are the same whether it is searched alone or beside others, whatever order trials finish in;
the reference trials are runs of the cell like any other (in its fit and its budget) and are
tagged ``ablate.reference`` in MLflow, where export finds them. The spec's ``crash:`` says which
classes count as a crash. A boundary spec's ``axes.lr`` and ``axes.seed``
are refused (the search chooses both), as are ``seeds:`` and, for psi, ``boundary.seeds``.

Ray Tune runs the proposed trials of all cells in parallel: :class:`BoundarySearcher` is a Tune
``Searcher`` that asks the cells' studies for trials and tells them the outcomes, inside one Tuner,
so that the MLflow tracking and failure handling of ``ablate sweep`` apply unchanged. Why ask/tell
with one study per cell rather than Ray's ``OptunaSearch`` over one space: cells are independent
1-D problems, each needs its own posterior and stopping rule, and per-cell studies resume on their
own. An interrupted search resumes from the Optuna store: re-run ``ablate boundary SPEC``; trials
cut off by the interruption do not count against the budget, and a study refuses settings other
than those it was made with (``settings_mismatch``), naming each. The
cells' reports are logged on the search's MLflow parent run (``boundary/cells.json``), from which
``ablate export`` takes how each search ended; the fit itself export recomputes from the runs.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

from orchestrator import psychometric as psy
from orchestrator.boundary_config import BoundaryConfig, boundary_config
from orchestrator.spec import SpecError, SweepSpec
from workloads.config import TrialConfig  # (workloads.trial.TrialConfig without torch: the driver needs none)
from workloads.outcome import Bracket, Point, Reference, bracket, cell_reference, classify, criterion_label

log = logging.getLogger("ablate")
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------------------ the decisions
def cell_bracket(points: list[Point], cfg: BoundaryConfig, seed: int | None = None) -> Bracket:
    """The older seeds-vote bracket of the cell, its classes judged against the cell's own reference
    (``workloads.outcome.classify``)."""
    return bracket(points, cfg.crash, cfg.kappa, seed=seed)


def next_lr(points: list[Point], cfg: BoundaryConfig) -> float | None:
    """The next LR to try in the bisection phase (its first seed, ``seed_offset``), or None when the
    bracket is done."""
    lo, hi = cfg.lr_range
    seen = {p.lr for p in points if p.seed == cfg.seed_offset}
    b = cell_bracket(points, cfg, seed=cfg.seed_offset)
    if b.crash_lr is None:  # nothing crashed above the largest stable LR
        return None if hi in seen else hi
    if b.stable_lr is None:  # nothing stable: everything run so far crashed
        return None if lo in seen or b.crash_lr <= lo else lo
    if b.width > cfg.resolution:
        return float(f"{math.sqrt(b.stable_lr * b.crash_lr):.6g}")
    # Converged. One crash may be a fluke of a non-monotonic cell: probe once above it.
    probe = float(f"{b.crash_lr * cfg.resolution ** 2:.6g}")
    if probe < hi and not any(b.crash_lr < lr <= probe for lr in seen):
        return probe
    return None


class _LRSampler(BaseSampler):
    """What the boundary samplers share: one independent parameter, ``lr``, proposed from the
    study's own trials alone (their classes judged against the cell's own reference trials)."""

    def __init__(self, cfg: BoundaryConfig):
        self.cfg = cfg

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}


class BoundarySampler(_LRSampler):
    """Optuna sampler for the ``lr`` of a boundary study (``method: bisect``): bisection of the
    stable/crashed bracket read from the study's finished trials (see :func:`study_observations`)."""

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name != "lr":
            raise ValueError(f"BoundarySampler samples only 'lr', not {param_name!r}")
        nxt = next_lr(study_observations(study), self.cfg)
        if nxt is None:  # the caller checks first; fall back to the bracket's middle
            b = cell_bracket(study_observations(study), self.cfg)
            nxt = b.boundary or math.sqrt(self.cfg.lr_range[0] * self.cfg.lr_range[1])
        return nxt


def crashes(points: list[Point], cfg: BoundaryConfig) -> list[bool]:
    """Crashed or not, per point: the classes of ``workloads.outcome`` (judged against the cell's own
    reference runs, as export does) against the spec's ``crash:``."""
    return [c in cfg.crash for c in classify(points, cfg.kappa)]


def cell_fit(points: list[Point], cfg: BoundaryConfig, grid: psy.Grid | None = None) -> psy.Fit:
    """The cell's psychometric fit (:mod:`orchestrator.psychometric`) from every finished run, the
    reference trials included."""
    return psy.fit(cfg.lr_range, [p.lr for p in points], crashes(points, cfg), grid)


class PsiSampler(_LRSampler):
    """Optuna sampler for the ``lr`` of a boundary study (``method: psi``, the default): the LR that
    minimises the expected entropy of LR50's posterior (:func:`orchestrator.psychometric.next_lr`),
    given the study's finished trials and the LRs of its trials still running (their outcomes
    unknown, averaged over)."""

    def __init__(self, cfg: BoundaryConfig):
        super().__init__(cfg)
        self.grid = psy.grid_for(cfg.lr_range)
        self.cands = psy.candidates(self.grid)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name != "lr":
            raise ValueError(f"PsiSampler samples only 'lr', not {param_name!r}")
        pts = study_observations(study)
        pending = [t.params["lr"] for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number != trial.number and "lr" in t.params]
        rng = np.random.default_rng([self.cfg.seed_offset, trial.number])
        return psy.next_lr(self.grid, [p.lr for p in pts], crashes(pts, self.cfg), pending,
                           self.cands, rng)


INF_VALUE = 1e30  # Optuna values must be finite: a non-finite final loss is told as this


def study_observations(study: optuna.Study) -> list[Point]:
    """The study's finished trials as points: value = final loss (``INF_VALUE`` for non-finite),
    user attrs ``seed``, ``initial_loss``, ``baseline``, ``stop_reason``, ``eval_baseline``,
    ``final_loss_se`` and ``reference`` (a reference trial)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        loss = t.value if t.value is not None and t.value < INF_VALUE else math.inf
        a = t.user_attrs
        out.append(Point(t.params["lr"], int(a.get("seed", 0)), loss, a.get("initial_loss"), a.get("baseline"),
                         a.get("stop_reason"), a.get("eval_baseline"), a.get("final_loss_se"),
                         bool(a.get("reference", False))))
    return out


# ---------------------------------------------------------------------------------- one cell
@dataclass
class Cell:
    key: str                  # e.g. "stabilizers=weyl warmup_steps=0 depth=4"
    values: dict[str, Any]    # the axis values of this cell
    base: dict[str, Any]      # TrialConfig fields (without lr / seed)


# Cell config fields that do not change what a trial computes (beyond float rounding, which each
# trial records: threads, device): a resumed study may run them otherwise.
NEUTRAL_FIELDS = ("threads", "device", "compile", "probe_interval", "sync_interval", "eval_interval")


def study_settings(cell: Cell, cfg: BoundaryConfig) -> dict[str, Any]:
    """What a cell's study remembers (user attr ``settings``): the boundary settings that give its
    trials their meaning (``BoundaryConfig.study_settings``) and the cell's trial config (less
    ``NEUTRAL_FIELDS``), as JSON values."""
    base = {k: v for k, v in cell.base.items() if k not in NEUTRAL_FIELDS}
    return json.loads(json.dumps({"boundary": cfg.study_settings(), "cell": base}, sort_keys=True, default=str))


_SPEC_KEY = {"crash": "crash", "kappa": "degraded_kappa", "seed_offset": "fixed.seed"}


def settings_mismatch(study: optuna.Study, cell: Cell, cfg: BoundaryConfig) -> str | None:
    """None when the study may be resumed with these settings; else one line naming each setting
    that differs (``boundary.lr_range: [0.003, 3] in the study, [0.001, 3] in the spec``). A study
    with trials but no recorded settings was made by an older ablate and is refused too."""
    saved = study.user_attrs.get("settings")
    where = f"boundary study {study.study_name!r}"
    restart = "give the spec another name (or use another --workdir) to start a new search"
    if saved is None:
        if not study.get_trials(deepcopy=False):
            return None
        return (f"{where} was made by an older ablate that did not record its settings (its classes had no "
                f"reference trials): it cannot be resumed; {restart}")
    now = study_settings(cell, cfg)
    diffs = []
    for part, prefix in (("boundary", "boundary."), ("cell", "")):
        old, new = saved.get(part, {}), now[part]
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                name = _SPEC_KEY.get(k, prefix + k) if part == "boundary" else k
                diffs.append(f"{name}: {json.dumps(old.get(k))} in the study, {json.dumps(new.get(k))} in the spec")
    if not diffs:
        return None
    return (f"{'; '.join(diffs)} ({where}, cell {cell.key}): a study resumes only with the settings it was "
            f"made with; restore them to resume it, or {restart}")


def check_studies(cells: list[Cell], cfg: BoundaryConfig, storage: str, prefix: str) -> None:
    """Before anything is written: the cells' existing studies in ``storage`` were made with these
    settings (``settings_mismatch``), else ``SpecError``. A SQLite store that does not exist yet is
    not created."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).exists():
        return
    names = set(optuna.study.get_all_study_names(storage))
    for c in cells:
        if study_name(prefix, c) in names:
            problem = settings_mismatch(optuna.load_study(study_name=study_name(prefix, c), storage=storage), c, cfg)
            if problem:
                raise SpecError(problem)


def study_name(prefix: str, cell: Cell) -> str:
    return f"{prefix}::{cell.key}"


class CellSearch:
    """The state machine of one cell. First its reference: ``reference_seeds`` trials at
    ``reference_lr`` (seeds ``seed_offset`` + 0, 1, ...), the runs its classes are judged against
    (``workloads.outcome``); no other trial starts before they have all finished, so no class is
    decided before the reference is known. Then ``psi``: Psi-method proposals, a fresh seed per
    trial (``seed_offset`` + the trial's number in the cell's study), up to
    ``max_in_flight_per_cell`` at once, until LR50's interval is narrower than ``resolution``, LR50
    is outside the range, or the budget is spent; ``bisect``: bisection at one seed, then the
    bracket's ends with more seeds. The cell reads its own trials only: its classes and fit are the
    same whatever other cells are searched beside it and in whatever order trials finish.

    Trials in flight when the driver stopped are marked PRUNED (cut off by an interruption) and do
    not count against ``max_trials_per_cell``; failed trials (an exception) do. The study remembers
    the settings it was made with (:func:`study_settings`); other settings are refused
    (``SpecError``, :func:`settings_mismatch`)."""

    def __init__(self, cell: Cell, cfg: BoundaryConfig, storage: str | None, prefix: str):
        self.cell, self.cfg = cell, cfg
        sampler = (PsiSampler if cfg.method == "psi" else BoundarySampler)(cfg)
        self.study = optuna.create_study(storage=storage, study_name=study_name(prefix, cell),
                                         sampler=sampler, direction="minimize", load_if_exists=True)
        problem = settings_mismatch(self.study, cell, cfg)
        if problem:
            raise SpecError(problem)
        if "settings" not in self.study.user_attrs:
            self.study.set_user_attr("settings", study_settings(cell, cfg))
        self.grid = psy.grid_for(cfg.lr_range)
        self.study.set_user_attr("cell", cell.values)
        self.study.set_user_attr("method", cfg.method)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(t.number, state=TrialState.PRUNED)  # cut off by an interruption: not counted
        self.in_flight = 0
        self._finished = False  # once done, a cell stays done: only its own tells change it

    def observations(self) -> list[Point]:
        return study_observations(self.study)

    def reference(self, obs: list[Point] | None = None) -> Reference:
        """The cell's reference (``workloads.outcome.cell_reference``): its finished reference trials."""
        return cell_reference(self.observations() if obs is None else obs)

    def _reference_todo(self) -> tuple[list[int], int]:
        """The reference seeds not yet finished nor running (a failed one is run again), and how many
        reference trials are running."""
        taken, running = set(), 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.user_attrs.get("reference"):
                taken.add(t.user_attrs.get("seed"))
                running += t.state == TrialState.RUNNING
        seeds = [self.cfg.seed_offset + j for j in range(self.cfg.reference_seeds)]
        return [s for s in seeds if s not in taken], running

    def reference_ready(self) -> bool:
        """Every reference trial has finished: the cell's classes can be decided."""
        missing, running = self._reference_todo()
        return not missing and not running

    def _count(self, *states: TrialState) -> int:
        return len(self.study.get_trials(deepcopy=False, states=states))

    def trials_used(self) -> int:
        """Trials that count against the budget: finished, failed and running (not the PRUNED ones,
        cut off by an interruption)."""
        return self._count(TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)

    def _pending_repeats(self, obs: list[Point]) -> list[tuple[float, int]]:
        if self.cfg.method != "bisect" or self.cfg.seeds <= 1:
            return []
        b = cell_bracket(obs, self.cfg)
        have = {(o.lr, o.seed) for o in obs}
        running = {(t.params.get("lr"), t.user_attrs.get("seed"))
                   for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        off = self.cfg.seed_offset
        return [(lr, off + s) for lr in (b.stable_lr, b.crash_lr) if lr is not None
                for s in range(1, self.cfg.seeds) if (lr, off + s) not in have and (lr, off + s) not in running]

    def settled(self, obs: list[Point] | None = None) -> str | None:
        """Why the cell needs no more trials (``interval`` / ``range_edge``), from its finished
        trials; None if it does (always while its reference is not finished). The budget is not
        counted here."""
        if not self.reference_ready():
            return None
        obs = self.observations() if obs is None else obs
        if self.cfg.method == "psi":
            if len(obs) < self.cfg.min_trials_per_cell:
                return None
            return psy.stop_reason(self.grid, [p.lr for p in obs], crashes(obs, self.cfg), self.cfg.resolution)
        if next_lr(obs, self.cfg) is None and not self._pending_repeats(obs):
            b = cell_bracket(obs, self.cfg)
            return "interval" if b.width <= self.cfg.resolution else "range_edge"
        return None

    def done(self) -> bool:
        if self._finished or self.in_flight:
            return self._finished
        self._finished = (self.trials_used() >= self.cfg.max_trials_per_cell or self.settled() is not None)
        return self._finished

    def stop_reason(self) -> str:
        """Why the cell's search stopped (or would stop now): ``interval`` (the LR50 interval, or for
        bisect the bracket, is narrower than ``resolution``), ``range_edge`` (the boundary lies
        outside ``lr_range``), ``budget`` (``max_trials_per_cell`` spent first)."""
        reason = self.settled()
        if reason is None:
            return "budget" if self.trials_used() >= self.cfg.max_trials_per_cell else "running"
        return reason

    def ask(self) -> tuple[optuna.trial.Trial, float, int] | None:
        """The next trial to run, or None when the cell must wait for trials in flight (or is done).
        A reference trial first (user attr ``reference``), until the cell has all of them; then,
        once they have finished, the method's proposals. Tune polls this often: a finished cell
        answers without reading its study."""
        if (self.in_flight >= self.cfg.max_in_flight_per_cell or self.done()
                or self.trials_used() >= self.cfg.max_trials_per_cell):  # budget, trials in flight counted
            return None
        missing, running = self._reference_todo()
        if missing:
            lr = self.cfg.ref_lr  # a one-point distribution: Optuna takes it as given, no sampler
            trial = self.study.ask({"lr": FloatDistribution(lr, lr, log=True)})
            trial.set_user_attr("reference", True)
            trial.set_user_attr("seed", missing[0])
            self.in_flight += 1
            return trial, float(trial.params["lr"]), missing[0]
        if running:  # no other trial before the reference is known
            return None
        obs = self.observations()
        dist = {"lr": FloatDistribution(*self.cfg.lr_range, log=True)}
        if self.cfg.method == "psi":
            if self.settled(obs) is not None:  # trials still in flight finish; no new ones
                return None
            trial = self.study.ask(dist)
            seed = self.cfg.seed_offset + trial.number
        else:
            lr_next = next_lr(obs, self.cfg)
            if lr_next is not None:
                if self.in_flight:  # bisection is sequential: the next point depends on the running one
                    return None
                seed = self.cfg.seed_offset
                trial = self.study.ask(dist)
            else:
                repeats = self._pending_repeats(obs)
                if not repeats:
                    return None
                lr_next, seed = repeats[0]
                self.study.enqueue_trial({"lr": lr_next}, user_attrs={"seed": seed})
                trial = self.study.ask(dist)
        trial.set_user_attr("seed", seed)
        self.in_flight += 1
        return trial, float(trial.params["lr"]), seed

    def tell(self, trial: optuna.trial.Trial, result: dict | None, failed: bool = False) -> None:
        """``result``: the trial's summary (``final_loss``, ``initial_loss``, ``baseline_loss``,
        ``stop_reason``; non-finite losses as inf, "inf" or None)."""
        self.in_flight -= 1
        if failed or result is None:
            self.study.tell(trial, state=TrialState.FAIL)
            return
        final = _num(result.get("final_loss"))
        for attr, key in (("initial_loss", "initial_loss"), ("baseline", "baseline_loss"),
                          ("eval_baseline", "eval_baseline"), ("final_loss_se", "final_loss_se")):
            v = _num(result.get(key))
            if math.isfinite(v):
                trial.set_user_attr(attr, v)
        trial.set_user_attr("stop_reason", result.get("stop_reason"))
        if not math.isfinite(final):
            trial.set_user_attr("final_loss", "inf")
        self.study.tell(trial, final if math.isfinite(final) else INF_VALUE)

    def report(self) -> dict[str, Any]:
        """The cell's row: the fit (``lr50`` with its interval, ``lr10``, ``lr90``), how the search
        ended (``converged``, ``stop_reason``), what it used, its reference (``reference_*``, and
        the ``criterion`` its classes were decided by), and the old bracket beside it."""
        obs = self.observations()
        b = cell_bracket(obs, self.cfg)
        ends = {}
        for name, lr in (("stable", b.stable_lr), ("crash", b.crash_lr)):
            crashed, runs = b.crashed.get(lr, (0, 0))
            ends[name] = {"lr": lr, "seeds": runs, "crashed": crashed}
        lo, hi = self.cfg.lr_range
        f = cell_fit(obs, self.cfg, self.grid)  # export recomputes the same fit from MLflow's runs
        reason = self.stop_reason()
        ref = self.reference(obs)
        return {
            "cell": self.cell.key, **self.cell.values, "values": self.cell.values,
            "method": self.cfg.method, "resolution": self.cfg.resolution, "lr_range": list(self.cfg.lr_range),
            "seed_offset": self.cfg.seed_offset,
            **f.as_dict(), "n_trials": len(obs), "n_seeds": len({o.seed for o in obs}),
            "converged": reason == "interval", "stop_reason": reason,
            "stable_lr": b.stable_lr, "crash_lr": b.crash_lr, "boundary_lr": b.boundary,
            "bracket_width": b.width,
            "bracket_above_range": b.crash_lr is None and b.stable_lr is not None and b.stable_lr >= hi,
            "bracket_below_range": b.stable_lr is None and b.crash_lr is not None and b.crash_lr <= lo,
            "non_monotonic": b.non_monotonic,
            "stable_end_crashed": ends["stable"]["crashed"], "stable_end_seeds": ends["stable"]["seeds"],
            "crash_end_crashed": ends["crash"]["crashed"], "crash_end_seeds": ends["crash"]["seeds"],
            "trials": len(obs), "failed_trials": self._count(TrialState.FAIL),
            "interrupted_trials": self._count(TrialState.PRUNED),
            "outcomes": {f"{lr:.6g}": v for lr, v in sorted(b.classes.items())},
            "crash_criterion": list(self.cfg.crash), "reference_seeds": self.cfg.reference_seeds,
            **ref.as_dict(),
            "criterion": criterion_label(self.cfg.crash, self.cfg.kappa, no_reference=0 if ref.learned else 1),
        }


def cells_of(spec: SweepSpec, cfg: BoundaryConfig) -> list[Cell]:
    """One cell per combination of the spec's swept values (its ``cells:`` with its axes;
    ``boundary_config`` has refused ``lr`` and ``seed`` there: the search chooses both; they are left
    out here too, for callers that skip it)."""
    base = spec.base_config()
    cells = []
    for values in spec.combos(skip=("seed", "lr")):
        values = {k: v for k, v in values.items() if k not in ("seed", "lr")}
        fields = {**base, **values}
        TrialConfig(**{**fields, "lr": cfg.lr_range[0]})  # validated already by the spec
        shown = {k: ("+".join(v) or "none") if k == "stabilizers" else v for k, v in values.items()}
        key = " ".join(f"{k}={v}" for k, v in shown.items()) or "all"
        cells.append(Cell(key, shown, fields))
    return cells


def dense_grid_size(cfg: BoundaryConfig) -> int:
    """Trials per cell (per seed) of a log-spaced grid over lr_range: at the bracket's resolution
    for bisect, at 2^(1/4) for psi (whose resolution is an interval's, not a grid step)."""
    lo, hi = cfg.lr_range
    step = cfg.resolution if cfg.method == "bisect" else 2 ** 0.25
    return math.ceil(math.log(hi / lo) / math.log(step)) + 1


# -------------------------------------------------------------------- search without Ray (tests)
def search_local(cells: list[Cell], cfg: BoundaryConfig, storage: str | None, prefix: str,
                 evaluate: Callable[[TrialConfig], dict]) -> list[dict]:
    """Run the same cell searches in this process: ``evaluate(config)`` returns the trial's result
    as a dict with ``final_loss``, ``initial_loss``, ``baseline_loss`` and ``stop_reason``
    (``TrialResult.to_dict()`` does). Each round asks a cell for as many trials as it takes at once
    (``max_in_flight_per_cell``), then tells their outcomes, as a cluster would. ``storage`` None:
    an in-memory Optuna store. Used by the synthetic benchmark and tests."""
    searches = [CellSearch(c, cfg, storage, prefix) for c in cells]
    for s in searches:
        while not s.done():
            batch = []
            while (nxt := s.ask()) is not None:
                batch.append(nxt)
            if not batch:
                break
            for trial, lr, seed in batch:
                s.tell(trial, evaluate(TrialConfig(**{**s.cell.base, "lr": lr, "seed": seed})))
    return [s.report() for s in searches]


def _num(v: Any) -> float:
    """A loss from a summary: a number, or inf / "inf" / "nan" / None for a non-finite one."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.inf
    return v if math.isfinite(v) else math.inf


# ------------------------------------------------------------------------ Ray Tune searcher
try:
    from ray.tune.search import Searcher
except ImportError:  # pragma: no cover - ray is a dependency; keeps this module importable
    Searcher = object  # type: ignore[misc,assignment]


class BoundarySearcher(Searcher):
    """A Tune ``Searcher`` over the cells' studies: ``suggest`` asks a cell that can take a trial
    (round robin), ``on_trial_complete`` tells its study the outcome."""

    def __init__(self, searches: list[CellSearch]):
        super().__init__()
        self.searches = searches
        self.live: dict[str, tuple[CellSearch, Any]] = {}
        self._rr = itertools.cycle(range(len(searches)))
        self._lock = threading.Lock()
        # Cells whose ask() said "not now", skipped until their next tell. Tune polls suggest on
        # every step it has room for a trial; each poll asked every cell, and a cell that waits for
        # its trials in flight (at max_in_flight_per_cell, or settled with trials still running)
        # read its study and fitted its posterior to say None again: a poll cost grew with the
        # cells. What a cell answers changes with its own tells (its trials in flight, its
        # observations), so a tell is what makes it worth asking again.
        self._waiting: set[int] = set()
        self._index = {id(s): i for i, s in enumerate(searches)}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def __getstate__(self):
        # Tune pickles the searcher with its experiment state. Studies hold database connections
        # and live trials; the search resumes from the Optuna store instead (see run_boundary).
        return {}

    def __setstate__(self, state):
        self.__init__([])

    def save(self, checkpoint_path: str) -> None:
        """Tune saves its searcher with the experiment state (and warned "save not implemented"
        without this). The search's state is the Optuna store, written at every tell; this file
        only says which studies the search uses and which trials were in flight, for a reader."""
        with self._lock:
            state = {"kind": "ablate.boundary", "studies": [s.study.study_name for s in self.searches],
                     "in_flight": {tid: s.study.study_name for tid, (s, _) in self.live.items()}}
        Path(checkpoint_path).write_text(json.dumps(state, indent=1))

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to load: a resumed search reads its studies from the Optuna store (trials that
        were in flight are marked PRUNED there and not counted, see CellSearch). The file is only checked to be
        this searcher's."""
        try:
            state = json.loads(Path(checkpoint_path).read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("kind") != "ablate.boundary":
            log.warning("boundary searcher: %s is not a boundary search's state; ignored", checkpoint_path)

    def suggest(self, trial_id: str):
        with self._lock:
            for _ in range(len(self.searches)):
                i = next(self._rr)
                if i in self._waiting:
                    continue
                s = self.searches[i]
                nxt = s.ask()
                if nxt is None:
                    self._waiting.add(i)
                    continue
                trial, lr, seed = nxt
                self.live[trial_id] = (s, trial)
                cfg = TrialConfig(**{**s.cell.base, "lr": lr, "seed": seed})
                reference = bool(trial.user_attrs.get("reference"))
                label = (f"{s.cell.key} lr={lr:.4g}" + (f" seed={seed}" if seed else "")
                         + (" (reference)" if reference else ""))
                return {"point": {"trial": cfg.to_dict(), "label": label, "cell": s.cell.key, "reference": reference}}
            if not self.live and all(s.done() for s in self.searches):
                return Searcher.FINISHED
            return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """A trial's last report carries its summary: its study is told at once. Tune hands the same
        report to the tracking callback, which records the trial in MLflow, in the same step; the
        trial's end comes as a later event. Telling only at that end (``on_trial_complete``) let a
        stop (``ray job stop``, SIGTERM: Tune stops between steps) fall in between: MLflow held a
        finished trial its study never counted, and the resumed search ran a replacement."""
        if "summary" not in result:
            return
        with self._lock:
            s, trial = self.live.pop(trial_id, (None, None))
            if s is None:
                return
            self._waiting.discard(self._index[id(s)])
            s.tell(trial, json.loads(result["summary"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        with self._lock:
            s, trial = self.live.pop(trial_id, (None, None))
            if s is None:  # told already, from its last report
                return
            self._waiting.discard(self._index[id(s)])
            if error or not result or "summary" not in result:
                s.tell(trial, None, failed=True)
                return
            s.tell(trial, json.loads(result["summary"]))


@dataclass
class BoundaryOutcome:
    name: str
    experiment: str
    tracking_uri: str
    parent_run_id: str
    cells: list[dict]
    wall_time: float
    dense_grid_trials: int


def run_boundary(spec: SweepSpec, spec_raw: dict | None = None, *, workdir: str | Path = "ablate_runs",
                 tracking_uri: str | None = None, address: str | None = None,
                 progress: bool = True, optuna_storage: str | None = None, trial_fn=None) -> BoundaryOutcome:
    """Find every cell's maximum stable LR with Ray Tune running Optuna-proposed trials.
    ``trial_fn``: what each trial runs (default ``orchestrator.trainable.train_trial``; a benchmark's
    stand-in)."""
    import time

    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from orchestrator.sweep import open_session, run_config, trainable_for
    from orchestrator.tracking import TrackingCallback

    t0 = time.monotonic()
    cfg = boundary_config(spec)
    cells = cells_of(spec, cfg)
    store = optuna_storage or f"sqlite:///{Path(workdir).expanduser().resolve() / 'optuna.db'}"
    # a study made with other settings is refused before anything is written
    ses = open_session(spec, spec_raw, workdir, tracking_uri, address,
                       precheck=lambda _: check_studies(cells, cfg, store, spec.name))
    optuna_storage = optuna_storage or f"sqlite:///{ses.workdir / 'optuna.db'}"
    searches = [CellSearch(c, cfg, optuna_storage, spec.name) for c in cells]
    # Runs of an interrupted search that never finished are replaced by the resumed search (closed first).
    for r in ses.tracker.trial_runs(spec.name, "tags.status = 'running'"):
        ses.tracker.discard(r, "cut off; the resumed search replaces it")
    budget = len(cells) * cfg.max_trials_per_cell
    callback = TrackingCallback(ses.tracking_uri, spec.experiment_name, spec.name, ses.parent, budget,
                                progress=progress, total_is_budget=True, crash=spec.crash,
                                crash_criterion=spec.crash_criterion, need=ses.autoscaled_need(spec))
    if progress:
        print(f"[{spec.name}] boundary search ({cfg.method}) over {len(cells)} cells, lr in {list(cfg.lr_range)}, "
              f"resolution {cfg.resolution:.4g}x, at most {cfg.max_trials_per_cell} trials a cell, seeds from "
              f"{cfg.seed_offset}; "
              f"MLflow: {ses.tracking_uri}; Optuna: {optuna_storage}", flush=True)
    # Without spec.concurrency: as many trials as the cluster can hold at its largest (the nodes
    # there and those its autoscaler may add: a fresh autoscaling cluster has no worker yet), and no
    # more than the cells can take at once.
    need = {"CPU": spec.resources.cpus, "GPU": spec.resources.gpus}
    concurrency = spec.concurrency or min(ses.capacity.slots(need), len(cells) * cfg.max_in_flight_per_cell)
    searcher = ConcurrencyLimiter(BoundarySearcher(searches), max_concurrent=concurrency)
    tuner = tune.Tuner(
        trainable_for(spec, trial_fn),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, reuse_actors=True,
                                    trial_name_creator=lambda t: t.trial_id,
                                    trial_dirname_creator=lambda t: t.trial_id),
        # a fresh Tune experiment per invocation: the search's state is the Optuna store's
        run_config=run_config(spec, f"{spec.name}-boundary-{int(time.time())}", ses.storage, callback),
    )
    ses.fit(tuner, callback)
    reports = [s.report() for s in searches]
    ses.tracker.log_text(ses.parent, json.dumps(reports, indent=1, default=str), "boundary/cells.json")
    ses.finish()
    return BoundaryOutcome(spec.name, spec.experiment_name, ses.tracking_uri, ses.parent, reports,
                           time.monotonic() - t0, dense_grid_size(cfg))

