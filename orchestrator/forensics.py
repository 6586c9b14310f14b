"""Divergence forensics: which stability probe warns of a crash first, how far ahead, how reliably.

Read from MLflow alone (``orchestrator.runs``, as ``export`` reads it): every finished trial run's
class (``workloads.outcome``, via ``runs.with_outcomes``: the run's end decides; forensics has no
crash rule of its own) and the histories of its probe metrics. Every value is read as it was logged
(``mlflow_store.logged_value``: the +-1.8e308 that MLflow's SQL stores write for +-inf reads back as
+-inf).

**Groups.** A *group* is the runs that differ only in their seed: the same workload, stabilizer,
every other axis of the sweep that varies (warmup, depth, width, schedule, ...: the cell,
``runs.cell_fields_of``) and the same LR. The seeds of a group are replicates, so every split and
every interval here is over groups, never over runs; runs of different warmups (say) are never
pooled as replicates. (A boundary search proposes a fresh LR for every trial, so its groups are
mostly single runs.)

**Crash step.** Every crashed run's crash step comes from its own trace, by the rule of its class,
on the training loss at its probe steps (the only loss recorded at every probe step; the validation
loss is recorded at step 0, every ``eval_interval`` steps and at the end, and the calibration sweeps
set ``eval_interval: 0``). The end of the run decides the class; the trace only says from when the
run was where it ended:

- ``diverged``: the first step from which the training loss is at or above l_0 (the validation loss
  of the untrained model, whose loss hardly depends on the batch: sd 0.02 nats over training batches
  on the smoke GPT and ViT) or non-finite, at every recorded loss until the end;
- ``collapsed``: the first probe step from which the gain of the training loss over its baseline
  stays within the run's collapse margin (``runs``' ``collapse_margin`` column: the margin its class
  was decided with, so the step follows the class rule whatever it becomes) until the end. The
  baseline is the one of the very batch the loss was measured on (``loss_baseline``, recorded at
  every probe step by ``workloads.trainer``: its targets' cost under the training split's marginal),
  as the class pairs the final loss with the baseline of its own eval windows: on the smoke GPT
  (batch 16 x 64 bytes) one training batch's baseline varies with sd 0.11 nats about a mean 0.03
  below the eval windows', as much as the margin itself, so a fixed baseline would move the step
  with the batches drawn. Runs recorded before ``loss_baseline`` existed are compared with their eval
  windows' baseline (else the whole split's) at every step: an approximation;
- a crashed run with no such step (its training loss never settles at its class's level; its class
  comes from its end only: the validation loss, or ``degraded``, which has no level in a trace) has
  no crash step. It is counted apart (the warnings table's "no crash step" column) and never given
  its last step.

Per workload and probe:

- **Predictive power.** The probe's value at a fraction of training (``FRACTIONS``) scores "ends
  crashed". The value is read at the run's first probe step *at or after* that fraction and after
  step 0 (``eval_step``: with probes every 20 of 200 steps, "5 %" is step 20; the tables' headers say
  which step). A run that has already crashed by the step read (its crash step at or before it) or
  already ended (stopped before that fraction) is not scored there: the AUC at a fraction is
  prediction, not crashes already visible; the AUC table counts them apart. The LR, the same at
  every step, is read at the loss's probe step, so it scores the same runs. The ROC AUC
  (Mann-Whitney, ties count half) with a bootstrap 95 % interval over groups (groups resampled with
  all their runs), the counts of crashed and stable runs; and the AUC over only the crashed/stable
  pairs *within one group* (seeds of the same configuration and LR): what the probe tells beyond
  the configuration and the LR, with its own interval over groups. Each probe has a fixed danger
  direction (``PROBES``: entropy low, everything else high), so an AUC below 0.5 means the probe
  points the wrong way.
- **Warnings.** A probe *crosses* at its first recorded step beyond a threshold. The threshold is
  chosen on the *train* groups (every other group of a workload, in stabilizer, axis and LR order;
  all seeds of a group on the same side) as the least extreme value that no stable train run ever
  reached (the rule an early stop would need: no false crash; a non-finite value reaches every
  threshold). It is usable only if some crashed train run reached it with a finite value; otherwise
  the table says "none" and the probe warns of nothing. It is evaluated on the *test* groups: a
  crashed run with a crash step is *warned* only if the probe crossed strictly before its crash
  step; a crossing at or after it is *late* (not a warning); false alarms are stable test runs that
  crossed. Rates carry bootstrap 95 % intervals
  that resample the train and the test groups (each side with replacement, its size kept) and
  choose the threshold again on every resampled train half, so that the interval holds the
  threshold's own variation.
- **Lead time.** Steps (and fraction of the run) from the warning to the crash step, for warned
  runs only, so it is always positive. The loss itself is listed as a probe, so "no probe beats the
  loss" is visible in the same table.

Tables go out as Markdown, LaTeX and Parquet beside the ablation tables and are logged to the
sweeps' MLflow parent runs; ``figures`` draws the summary (AUC against fraction of training) and a
per-run figure for crashed runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.mlflow_store import TAG_SWEEP, Tracker
from orchestrator.runs import FINISHED, cell_fields_of, fetch_runs, runs_table, with_outcomes
from orchestrator.writers import axis_token, file_stem, fmt, write_table
from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA, criterion_label

LR = "learning rate"
"""Not a probe: the run's configured LR, the same at every step: the baseline every probe must
beat (in an LR sweep anything that grows with the LR predicts crashes)."""
PROBES: dict[str, int] = {
    # metric -> danger direction: +1 high values warn, -1 low values warn
    LR: +1,
    "loss": +1,
    "attn_entropy/min": -1,
    "attn_entropy/mean": -1,
    "max_logit": +1,
    "spectral_conc/max": +1,
    "spectral_conc_norm/max": +1,
    "qk_sigma1/max": +1,
    "tev/mean": +1,
    "tev/std": +1,
    "grad_norm": +1,
    "param_norm": +1,
}
LOSS_BASELINE = "loss_baseline"
"""The marginal baseline of the training batch whose loss each probe step records (not a probe)."""
FRACTIONS = (0.05, 0.1, 0.25)
WITHIN_GROUP_FRACTION = 0.1
BOOTSTRAP = 1000

Group = tuple[str, str, tuple, float]
"""(workload, stabilizer, ((axis, value), ...) of every other axis that varies, lr): the runs that
differ only in their seed."""


def group_order(g: Group) -> tuple:
    """A sort key of groups: workload, stabilizer, the other axes, LR (an axis value None first)."""
    return g[0], g[1], tuple((k, (0, 0) if v is None else (1, v)) for k, v in g[2]), g[3]


@dataclasses.dataclass
class RunHistory:
    run_id: str
    label: str
    workload: str
    stabilizer: str
    lr: float
    seed: int
    steps: int
    outcome: str
    crashed: bool
    initial_loss: float | None
    baseline: float | None
    """The baseline of the run's eval windows (the whole validation split's for old recordings): a
    collapsed run's crash level where no ``loss_baseline`` was recorded."""
    series: dict[str, list[tuple[int, float]]]   # metric -> [(step, value)] in step order
    split: str = ""                               # "train" | "test"
    steps_run: int | None = None                  # None: all ``steps``
    scores: dict = dataclasses.field(default_factory=dict, repr=False)  # memo: _score's answers, peaks, crossings
    axes: dict = dataclasses.field(default_factory=dict)
    """The run's value of every other field that varies in the table (warmup_steps, depth, ...): part
    of its group, and its figure's file name carries them."""
    collapse_margin: float | None = None
    """The gain over its baseline the run had to exceed not to be collapsed (``runs``' column)."""

    @property
    def group(self) -> Group:
        return self.workload, self.stabilizer, tuple(sorted(self.axes.items())), self.lr

    def eval_step(self, metric: str, fraction: float) -> int | None:
        """The first probe step of ``metric`` at or after ``fraction`` of training and after step 0
        (None: the run recorded none there)."""
        at = fraction * self.steps
        for s, _ in self.series.get(metric, []):
            if s >= at and s > 0:
                return s
        return None

    def value_at(self, metric: str, step: int) -> float | None:
        """The metric's value recorded at exactly ``step`` (None if not recorded there)."""
        for s, v in self.series.get(metric, []):
            if s == step:
                return v
        return None

    def ended_before(self, step: float) -> bool:
        return self.steps_run is not None and self.steps_run <= step

    def at_crash_level(self) -> list[tuple[int, bool]] | None:
        """The run's trace for its class: (step, whether the training loss is at the class's crash
        level there), in step order; None when the class has no level in a trace (``degraded``) or
        the run recorded nothing to compare. ``diverged``: at or above l_0, or non-finite;
        ``collapsed``: the gain over the batch's own baseline (``loss_baseline``, at probe steps;
        runs recorded without it: ``baseline`` at every step) within ``collapse_margin``, or
        non-finite."""
        loss = self.series.get("loss", [])
        if not loss:
            return None
        if self.outcome == "diverged":
            l0 = self.initial_loss
            if l0 is None or not math.isfinite(l0):
                return None
            return [(s, not math.isfinite(v) or v >= l0) for s, v in loss]
        if self.outcome == "collapsed":
            margin = self.collapse_margin if self.collapse_margin is not None else 0.0
            base = dict(self.series.get(LOSS_BASELINE, []))
            if base:
                return [(s, not math.isfinite(v) or base[s] - v <= margin) for s, v in loss if s in base]
            if self.baseline is None or not math.isfinite(self.baseline):
                return None
            return [(s, not math.isfinite(v) or self.baseline - v <= margin) for s, v in loss]
        return None

    def crash_step(self) -> int | None:
        """A crashed run's crash step: the first step of :meth:`at_crash_level` from which the trace
        stays at its class's crash level until its end. None: not crashed, or no such step (the
        class comes from the run's end only: :attr:`end_only`). Memoised."""
        if "crash_step" not in self.scores:
            trace = self.at_crash_level() if self.crashed else None
            step = None
            if trace and trace[-1][1]:
                step = trace[-1][0]
                for s, at in reversed(trace):
                    if not at:
                        break
                    step = s
            self.scores["crash_step"] = step
        return self.scores["crash_step"]

    @property
    def end_only(self) -> bool:
        """A crashed run whose trace never settles at its crash level: its class comes from its end."""
        return self.crashed and self.crash_step() is None


def load_histories(tracking_uri: str, experiment: str, sweep: str | None, crash=DEFAULT_CRASH,
                   kappa: float = DEFAULT_KAPPA, probes=tuple(PROBES), table: pa.Table | None = None) -> list[RunHistory]:
    """The finished runs with their probe histories (and, whatever ``probes`` says, the training
    loss and its batches' baseline, which place the crash step); ``table``: the trials table with
    outcomes (``runs.with_outcomes``) when the caller has read it already."""
    if table is None:
        runs = fetch_runs(tracking_uri, experiment, sweep)
        if not runs:
            raise ValueError(f"no trial runs in MLflow experiment {experiment!r}"
                             + (f" for sweep {sweep!r}" if sweep else "") + f" at {tracking_uri}")
        table = with_outcomes(runs_table(runs, experiment), crash, kappa)
    tr = Tracker(tracking_uri, experiment)
    out = []
    varying = [f for f in cell_fields_of(table) if f not in ("stabilizer", "workload")]  # the group's other axes
    metrics = [m for m in dict.fromkeys([*probes, "loss", LOSS_BASELINE]) if m != LR]
    for row in table.to_pylist():
        if row["status"] not in FINISHED or row["outcome"] is None:
            continue
        series = {LR: [(0, row["lr"])]} if LR in probes else {}
        for m in metrics:
            hist = tr.metric_history(row["run_id"], m)  # +-inf as logged, not +-1.8e308
            if hist:
                series[m] = sorted((h.step, h.value) for h in hist)
        base = row.get("eval_baseline")
        base = base if base is not None and math.isfinite(base) else row["baseline_loss"]
        out.append(RunHistory(row["run_id"], row["label"] or row["run_id"], row["workload"], row["stabilizer"],
                              row["lr"], row["seed"] or 0, row["steps"], row["outcome"], bool(row["crashed"]),
                              row["initial_loss"], base, series, steps_run=row.get("steps_run"),
                              axes={f: row[f] for f in varying}, collapse_margin=row.get("collapse_margin")))
    assign_split(out)
    return out


def assign_split(runs: list[RunHistory]) -> None:
    """Every other group of each workload, in stabilizer, axis and LR order (:func:`group_order`),
    is ``train``, the others ``test``: all seeds of a group fall on the same side (a test run is
    never a replicate of a train run), and both halves cover every stabilizer and the LR range."""
    for wl in {r.workload for r in runs}:
        groups = sorted({r.group for r in runs if r.workload == wl}, key=group_order)
        side = {g: "train" if i % 2 == 0 else "test" for i, g in enumerate(groups)}
        for r in runs:
            if r.workload == wl:
                r.split = side[r.group]


def by_group(runs: list[RunHistory]) -> list[list[RunHistory]]:
    groups: dict[Group, list[RunHistory]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    return [groups[g] for g in sorted(groups, key=group_order)]


# ----------------------------------------------------------------------------- statistics
def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U / n m)."""
    if not pos or not neg:
        return None
    p, n = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def bootstrap_groups(groups: list[list[RunHistory]], stat: Callable[[list[list[RunHistory]]], float | None],
                     n: int = BOOTSTRAP, seed: int = 0,
                     strata: Callable[[list[RunHistory]], Hashable] | None = None) -> tuple[float, float] | None:
    """Percentile 95 % interval of ``stat`` over ``n`` resamples of ``groups`` (with replacement,
    each drawn group with all its runs); resamples where ``stat`` is undefined are skipped. With
    ``strata`` (group -> its stratum, e.g. its split), each stratum is resampled on its own and keeps
    its number of groups."""
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    keys = [strata(g) if strata else None for g in groups]
    layers = [np.array([i for i, k in enumerate(keys) if k == key]) for key in dict.fromkeys(keys)]
    vals = []
    for _ in range(n):
        draw = np.concatenate([idx[rng.integers(0, len(idx), len(idx))] for idx in layers])
        v = stat([groups[i] for i in draw.tolist()])
        if v is not None:
            vals.append(v)
    if not vals:
        return None
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


ENDED, CRASHED = "ended", "crashed"
"""Why a run is not scored at a fraction: it had already ended, or already crashed, by then."""


def _score(run: RunHistory, metric: str, fraction: float) -> tuple[float, int | None] | str | None:
    """(danger score, step read) of ``metric`` at ``fraction`` of training (:meth:`RunHistory.eval_step`;
    the LR at the loss's step); ``ENDED`` for a run that ended before that point and ``CRASHED`` for
    one whose crash step is at or before the step read (neither is prediction); None: nothing to
    read. Memoised on the run (the bootstraps ask again and again)."""
    key = (metric, fraction)
    if key not in run.scores:
        run.scores[key] = _read_score(run, metric, fraction)
    return run.scores[key]


def _read_score(run: RunHistory, metric: str, fraction: float) -> tuple[float, int | None] | str | None:
    d = PROBES.get(metric, 1)
    at = "loss" if metric == LR else metric
    if not run.series.get(metric) or not run.series.get(at):
        return None
    step = run.eval_step(at, fraction)
    if step is None:
        return ENDED if run.ended_before(fraction * run.steps) else None
    crash = run.crash_step()
    if crash is not None and crash <= step:
        return CRASHED
    if metric == LR:
        return d * run.lr, step
    v = run.value_at(metric, step)
    if not math.isfinite(v):  # a non-finite probe value is as dangerous as it gets
        return math.inf, step
    return d * v, step


def _scored(run: RunHistory, metric: str, fraction: float) -> tuple[float, int | None] | None:
    s = _score(run, metric, fraction)
    return s if isinstance(s, tuple) else None


def pooled_auc(groups: list[list[RunHistory]], metric: str, fraction: float) -> float | None:
    pos, neg = [], []
    for g in groups:
        for r in g:
            s = _scored(r, metric, fraction)
            if s is not None:
                (pos if r.crashed else neg).append(s[0])
    return auc(pos, neg)


def within_group_pairs(group: list[RunHistory], metric: str, fraction: float) -> tuple[float, int]:
    """(wins, pairs) over the (crashed, stable) pairs of one group, ties half."""
    scored = [(r.crashed, s[0]) for r in group if (s := _scored(r, metric, fraction)) is not None]
    wins, pairs = 0.0, 0
    for c, sc in scored:
        if not c:
            continue
        for c2, ss in scored:
            if c2:
                continue
            pairs += 1
            wins += 1.0 if sc > ss else 0.5 if sc == ss else 0.0
    return wins, pairs


def auc_within_group(groups: list[list[RunHistory]], metric: str, fraction: float) -> tuple[float | None, int]:
    """The AUC over (crashed, stable) pairs of the same group (the same configuration and LR,
    different seeds): what the probe tells beyond them. Returns (AUC, number of pairs)."""
    wins, pairs = 0.0, 0
    for g in groups:
        w, p = within_group_pairs(g, metric, fraction)
        wins, pairs = wins + w, pairs + p
    return (wins / pairs if pairs else None), pairs


def _peak(run: RunHistory, metric: str) -> tuple[float | None, bool]:
    """(the most dangerous finite score the run recorded for ``metric``, None if none; whether it
    recorded a non-finite value, which crosses every threshold)."""
    key = ("peak", metric)
    if key not in run.scores:
        d = PROBES.get(metric, 1)
        values = [v for _, v in run.series.get(metric, [])]
        finite = [d * v for v in values if math.isfinite(v)]
        run.scores[key] = (max(finite) if finite else None, len(finite) < len(values))
    return run.scores[key]


def threshold(runs: list[RunHistory], metric: str) -> float | None:
    """The least extreme danger score no stable run ever reached; None ("none" in the tables) when
    no stable run recorded the probe, a stable run recorded a non-finite value (it crosses any
    threshold: :func:`first_crossing`), or no crashed run reached that score with a finite value (a
    threshold at the edge of the probe's range, e.g. an entropy below a stable run's 0, warns of
    nothing)."""
    stable = [_peak(r, metric) for r in runs if not r.crashed and r.series.get(metric)]
    if not stable or any(nonfinite for _, nonfinite in stable):
        return None
    reached = [p for p, _ in stable if p is not None]
    if not reached:
        return None
    thr = float(np.nextafter(max(reached), math.inf))
    if not any(p is not None and p >= thr for r in runs if r.crashed for p in [_peak(r, metric)[0]]):
        return None
    return thr


def first_crossing(run: RunHistory, metric: str, thr: float | None) -> int | None:
    """The first step at which ``metric`` is beyond ``thr`` (a non-finite value counts). Memoised
    per threshold (the bootstrap of the warning rates asks again for every resampled threshold)."""
    if thr is None:
        return None
    key = ("cross", metric, thr)
    if key not in run.scores:
        d = PROBES.get(metric, 1)
        run.scores[key] = next((s for s, v in run.series.get(metric, []) if not math.isfinite(v) or d * v >= thr),
                               None)
    return run.scores[key]


def _rate(runs: list[RunHistory], hit: Callable[[RunHistory], bool]) -> float | None:
    return sum(map(hit, runs)) / len(runs) if runs else None


def _warned(r: RunHistory, metric: str, thr: float | None) -> bool:
    w = first_crossing(r, metric, thr)
    return w is not None and w < r.crash_step()


def warning_rates(groups: list[list[RunHistory]], metric: str) -> tuple[float | None, float | None]:
    """(share of the test runs crashed with a crash step that the probe warned, share of the stable
    test runs it alarmed), with the threshold chosen on the train groups among ``groups``."""
    runs = [r for g in groups for r in g]
    thr = threshold([r for r in runs if r.split == "train"], metric)
    test = [r for r in runs if r.split == "test"]
    return (_rate([r for r in test if r.crashed and r.crash_step() is not None], lambda r: _warned(r, metric, thr)),
            _rate([r for r in test if not r.crashed], lambda r: first_crossing(r, metric, thr) is not None))


# ------------------------------------------------------------------------------------ tables
@dataclasses.dataclass
class Forensics:
    auc_rows: list[dict]
    warning_rows: list[dict]
    warnings: dict[tuple[str, str], int | None]   # (run_id, metric) -> first crossing (test and train)
    runs: list[RunHistory]


def _ci(ci: tuple[float, float] | None) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _split(g: list[RunHistory]) -> str:
    return g[0].split


def analyse(runs: list[RunHistory], probes=tuple(PROBES), fractions=FRACTIONS, n_boot: int = BOOTSTRAP) -> Forensics:
    auc_rows, warn_rows, warnings = [], [], {}
    for wl in sorted({r.workload for r in runs}):
        mine = [r for r in runs if r.workload == wl]
        for m in probes:
            have = [r for r in mine if r.series.get(m)]
            if not have:
                continue
            groups = by_group(have)
            row = {"workload": wl, "probe": m, "direction": "high" if PROBES.get(m, 1) > 0 else "low",
                   "crashed_runs": sum(r.crashed for r in have), "stable_runs": sum(not r.crashed for r in have),
                   "groups": len(groups)}
            for f in fractions:
                row[f"auc@{f:g}"] = pooled_auc(groups, m, f)
                row[f"ci@{f:g}"] = _ci(bootstrap_groups(groups, lambda gs, f=f: pooled_auc(gs, m, f), n_boot))
                row[f"steps@{f:g}"] = sorted({s[1] for r in have if (s := _scored(r, m, f)) is not None})
                row[f"crashed_by@{f:g}"] = sum(_score(r, m, f) == CRASHED for r in have)
                row[f"ended_by@{f:g}"] = sum(_score(r, m, f) == ENDED for r in have)
            f = WITHIN_GROUP_FRACTION
            row["auc_within_group"], row["within_group_pairs"] = auc_within_group(groups, m, f)
            paired = [g for g in groups if within_group_pairs(g, m, f)[1]]
            row["groups_with_pairs"] = len(paired)
            row["ci_within_group"] = _ci(bootstrap_groups(paired, lambda gs: auc_within_group(gs, m, f)[0], n_boot))
            auc_rows.append(row)

            train = [r for r in have if r.split == "train"]
            test_groups = [g for g in groups if _split(g) == "test"]
            thr = threshold(train, m)
            for r in have:
                warnings[(r.run_id, m)] = first_crossing(r, m, thr)

            def alarm(r, m=m):
                return warnings[(r.run_id, m)] is not None

            def late(r, m=m):
                w = warnings[(r.run_id, m)]
                return w is not None and w >= r.crash_step()

            test = [r for g in test_groups for r in g]
            crashed_test = [r for r in test if r.crashed and r.crash_step() is not None]
            end_only = [r for r in test if r.end_only]
            stable_test = [r for r in test if not r.crashed]
            warned = [r for r in crashed_test if _warned(r, m, thr)]
            leads = [r.crash_step() - warnings[(r.run_id, m)] for r in warned]
            fracs = [(r.crash_step() - warnings[(r.run_id, m)]) / r.steps for r in warned]
            # the threshold chosen again on every resampled train half (both halves resampled)
            rates = lambda i: lambda gs: warning_rates(gs, m)[i]  # noqa: E731
            warn_rows.append({
                "workload": wl, "probe": m,
                "threshold": None if thr is None else PROBES.get(m, 1) * thr,
                "test_crashed_warned": f"{len(warned)}/{len(crashed_test)}",
                "ci_warned": _ci(bootstrap_groups(groups, rates(0), n_boot, strata=_split)),
                "test_crashed_late": f"{sum(map(late, crashed_test))}/{len(crashed_test)}",
                "test_crashed_no_crash_step": len(end_only),
                "test_false_alarms": f"{sum(alarm(r) for r in stable_test)}/{len(stable_test)}",
                "ci_false_alarms": _ci(bootstrap_groups(groups, rates(1), n_boot, strata=_split)),
                "train_false_alarms": 0 if thr is not None else None,
                "train_test_groups": f"{len(groups) - len(test_groups)} / {len(test_groups)}",
                "lead_steps_median": float(np.median(leads)) if leads else None,
                "lead_steps_min": min(leads) if leads else None, "lead_steps_max": max(leads) if leads else None,
                "lead_fraction_median": float(np.median(fracs)) if fracs else None,
            })
    return Forensics(auc_rows, warn_rows, warnings, runs)


def _auc_text(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _steps_text(rows: list[dict], f: float) -> str:
    """Which probe step(s) the tables read "at ``f``": one step, or the range over runs."""
    steps = sorted({s for r in rows if r["probe"] != LR for s in r[f"steps@{f:g}"]})
    if not steps:
        return ""
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _not_scored(r: dict, fractions) -> str:
    """The runs not scored at each fraction: crashed already (+ ended already, where any)."""
    return " / ".join(f"{r[f'crashed_by@{f:g}']}" + (f" + {r[f'ended_by@{f:g}']}" if r[f"ended_by@{f:g}"] else "")
                      for f in fractions)


def write_tables(fx: Forensics, out: Path, name: str, crit: str, fractions=FRACTIONS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    steps = {f: _steps_text(fx.auc_rows, f) for f in fractions}
    runs_steps = sorted({r.steps for r in fx.runs})
    at = " / ".join(f"{f:.0%}" for f in fractions)
    header = (["workload", "probe", "warns when"]
              + [f"AUC at {f:.0%}" + (f" ({steps[f]})" if steps[f] else "") + " [95% CI]" for f in fractions]
              + [f"AUC at {WITHIN_GROUP_FRACTION:.0%} within a group [95% CI] (pairs / groups)", "crashed / stable",
                 f"not scored at {at}: crashed already (+ ended)"])
    body = [[r["workload"], r["probe"], r["direction"]]
            + [f"{_auc_text(r[f'auc@{f:g}'])} {r[f'ci@{f:g}']}".strip() for f in fractions]
            + [f"{_auc_text(r['auc_within_group'])} {r['ci_within_group']} ({r['within_group_pairs']} / "
               f"{r['groups_with_pairs']})".replace("  ", " "),
               f"{r['crashed_runs']} / {r['stable_runs']}", _not_scored(r, fractions)]
            for r in fx.auc_rows]
    files += write_table(out, "forensics_auc", header, body,
                         f"Which probe predicts a crash, {name}: ROC AUC of 'ends crashed' from the probe's value at "
                         "the first probe step at or after a fraction of training and after step 0 (of "
                         + "/".join(map(str, runs_steps)) + " steps; the step read is in each header), over the runs "
                         "not yet crashed there (a run whose crash step is at or before the step read, or that ended "
                         "before it, is not scored: last column), with bootstrap 95% intervals over groups (runs that "
                         "differ only in their seed); 'within a group': over crashed/stable pairs of seeds of one "
                         f"group (what the probe adds to the configuration and the LR); {crit}")
    header = ["workload", "probe", "threshold", "crashed warned before the crash (test) [95% CI]",
              "late: crossed at/after the crash (test)", "crashed with no crash step (test)",
              "false alarms (test) [95% CI]", "lead steps median [min, max]", "lead / run", "train / test groups"]
    body = []
    for r in fx.warning_rows:
        lead = ("–" if r["lead_steps_median"] is None else
                f"{fmt(r['lead_steps_median'])} [{r['lead_steps_min']}, {r['lead_steps_max']}]")
        body.append([r["workload"], r["probe"], "none" if r["threshold"] is None else fmt(r["threshold"]),
                     f"{r['test_crashed_warned']} {r['ci_warned']}".strip(), r["test_crashed_late"],
                     str(r["test_crashed_no_crash_step"]),
                     f"{r['test_false_alarms']} {r['ci_false_alarms']}".strip(), lead,
                     fmt(r["lead_fraction_median"]), r["train_test_groups"]])
    files += write_table(out, "forensics_warnings", header, body,
                         f"Probe warnings, {name}: threshold chosen on the train groups (every other group of runs "
                         "that differ only in their seed, all seeds of a group on one side) as the least extreme "
                         "value no stable train run reached ('none': no crashed train run reached it either); "
                         "evaluated on the test groups. A crash is warned only if the probe crossed strictly before "
                         "its crash step (from its own trace: the first probe step from which the training loss stays "
                         "at or above l_0 or non-finite for diverged runs, within the collapse margin of its batch's "
                         "baseline for collapsed runs); later crossings are 'late'; crashed runs whose trace never "
                         "settles there (class from the end only) have no crash step and are counted apart. Lead: "
                         "steps from the warning to the crash step. Intervals: bootstrap over train and test groups, "
                         f"the threshold chosen again on each resampled train half; {crit}")
    for stem, rows in (("forensics_auc", fx.auc_rows), ("forensics_warnings", fx.warning_rows)):
        path = out / f"{stem}.parquet"
        cols = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in cols}), path)
        files.append(path)
    return files


def figures(fx: Forensics, out: Path, max_runs: int = 40, fractions=FRACTIONS) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    from matplotlib.lines import Line2D

    workloads = sorted({r["workload"] for r in fx.auc_rows})
    present = [m for m in PROBES if any(r["probe"] == m for r in fx.auc_rows)]
    others = [m for m in present if m not in (LR, "loss")]
    style = {m: dict(color=plt.cm.tab10(i % 10), lw=1) for i, m in enumerate(others)}
    style.update({"loss": dict(color="k", lw=2.2), LR: dict(color="0.45", lw=2.2, ls="--")})
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.6 * len(workloads) + 1.8, 3.6), squeeze=False, sharey=True)
    for ax, wl in zip(axes[0], workloads):
        for r in (r for r in fx.auc_rows if r["workload"] == wl):
            ys = [r[f"auc@{f:g}"] for f in fractions]
            ax.plot([100 * f for f in fractions], [np.nan if y is None else y for y in ys], marker="o",
                    **style[r["probe"]])
        ax.axhline(0.5, color="0.5", lw=0.6, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("% of training")
        ax.set_title(wl)
    axes[0][0].set_ylabel("ROC AUC of 'ends crashed'")
    axes[0][-1].legend(handles=[Line2D([], [], marker="o", label=m, **style[m]) for m in present], fontsize=7,
                       loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"forensics_auc.{ext}", dpi=150)
        files.append(out / f"forensics_auc.{ext}")
    plt.close(fig)

    # seed 0 of every crashed group first, then further seeds: max_runs covers the workloads and groups
    crashed = sorted((r for r in fx.runs if r.crashed), key=lambda r: (r.seed, r.workload, r.stabilizer, r.lr))[:max_runs]
    used: set[str] = set()
    if crashed:
        (out / "forensics_runs").mkdir(exist_ok=True)
    for r in crashed:
        metrics = [m for m in PROBES if m != LR and r.series.get(m)]
        fig, axes = plt.subplots(len(metrics), 1, figsize=(6, 1.25 * len(metrics) + 0.8), sharex=True, squeeze=False)
        crash = r.crash_step()
        for ax, m in zip(axes[:, 0], metrics):
            xs, ys = zip(*r.series[m])
            ax.plot(xs, ys, lw=1)
            if m in ("loss", "max_logit", "qk_sigma1/max", "grad_norm") and min(ys) > 0:
                ax.set_yscale("log")
            ax.set_ylabel(m, fontsize=7, rotation=0, ha="right")
            ax.tick_params(which="both", labelsize=6)
            if crash is not None:
                ax.axvline(crash, color="C3", lw=1)
            w = fx.warnings.get((r.run_id, m))
            if w is not None:  # a warning before the crash step; a late crossing (or no crash step) in grey
                ax.axvline(w, color="C1" if crash is not None and w < crash else "0.6", lw=1, ls="--")
        axes[-1, 0].set_xlabel("step (red: crash step; orange dashed: warning; grey dashed: late crossing)", fontsize=7)
        fig.suptitle(f"{r.label} [{r.workload}]: {r.outcome}"
                     + (" (no crash step: its trace never settles at the crash level)" if crash is None else ""),
                     fontsize=8)
        fig.tight_layout()
        path = out / "forensics_runs" / f"{run_figure_stem(r, used)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def run_figure_stem(r: RunHistory, used: set[str]) -> str:
    """A per-run figure's file name (no suffix): workload, stabilizer, every other axis that varies
    (``r.axes``), LR and seed: ``gpt_none_depth4_warmup50_lr1_seed0``. Two runs of one config
    (a trial recorded twice) get the run id's start appended rather than one overwriting the other;
    ``used`` collects the names given so far."""
    stem = file_stem(f"{r.workload}_{axis_token('stabilizer', r.stabilizer)}",
                     {**r.axes, "lr": float(r.lr), "seed": r.seed})
    if stem in used:
        stem = f"{stem}_{r.run_id[:8]}"
    used.add(stem)
    return stem


def forensics(tracking_uri: str, experiment: str, sweep: str | None, out_dir: str | Path, crash=DEFAULT_CRASH,
              kappa: float = DEFAULT_KAPPA, log_to_mlflow: bool = True, with_figures: bool = False,
              table: pa.Table | None = None) -> tuple[Forensics, list[Path]]:
    """Read the runs, write the tables (and figures), log them to the sweeps' parent runs."""
    out = Path(out_dir)
    runs = load_histories(tracking_uri, experiment, sweep, crash, kappa, table=table)
    fx = analyse(runs)
    files = write_tables(fx, out, sweep or experiment, criterion_label(crash, kappa))
    if with_figures:
        files += figures(fx, out)
    if log_to_mlflow:
        sweeps = [sweep] if sweep else sorted({r.data.tags.get(TAG_SWEEP) for r in fetch_runs(tracking_uri, experiment)}
                                              - {None})
        tr, tables = Tracker(tracking_uri, experiment), [f for f in files if f.parent == out]
        for sw in sweeps:
            tr.log_sweep_artifacts(sw, tables, "forensics")
    return fx, files
