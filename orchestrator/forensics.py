"""Divergence forensics: which stability probe warns of a crash first, how far ahead, how reliably.

Read from MLflow alone (``orchestrator.runs``, as ``export`` reads it): every finished trial run's
class (``workloads.outcome``, via ``runs.with_outcomes``: the run's end decides; forensics has no
crash rule of its own) and the histories of its probe metrics. Runs are grouped by (workload,
stabilizer, LR): the seeds of one group are replicates, so every split and every interval here is
over groups, never over runs.
Per workload and probe:

- **Predictive power.** The probe's value at a fraction of training (``FRACTIONS``) scores "ends
  crashed". The value is read at the run's first probe step *at or after* that fraction and after
  step 0 (``eval_step``: with probes every 20 of 200 steps, "5 %" is step 20; the tables' headers say
  which step); a run that ended before that step (stopped on a non-finite loss) scores as the most
  dangerous value. The ROC AUC (Mann-Whitney, ties count half) with a bootstrap 95 % interval over
  groups (groups resampled with all their runs), the counts of crashed and stable runs; and the AUC
  over only the crashed/stable pairs *within one group* (same stabilizer, same LR, different seeds):
  what the probe tells beyond the stabilizer and the LR, with its own interval over groups.
  Each probe has a fixed danger direction (``PROBES``: entropy low, everything else high), so an AUC
  below 0.5 means the probe points the wrong way.
- **Warnings.** A probe *crosses* at its first recorded step beyond a threshold. The threshold is
  chosen on the *train* groups (every other (stabilizer, LR) group of a workload, in stabilizer and
  LR order; all seeds of a group on the same side) as the least extreme value that no stable train
  run ever reached (the rule an early stop would need: no false crash). It is usable only if some
  crashed train run reached it with a finite value; otherwise the table says "none" and the probe
  warns of nothing. It is evaluated on the *test* groups: a crashed run is *warned* only if the probe
  crossed strictly before its crash step; a crossing at or after it is *late* (not a warning); false
  alarms are stable test runs that crossed. Rates carry bootstrap 95 % intervals over test groups.
- **Crash step and lead time.** A crashed run's crash step is the first probe step from which its
  training loss stays at or above the crash level (l_0 for diverged runs, the marginal baseline
  otherwise) to the end (non-finite counts as above); a crashed run whose training loss never
  settles there (its class came from the validation loss) has its crash at its last step. Lead time
  (steps, and fraction of the run) from the warning to the crash step, for warned runs only, so it
  is always positive. The loss itself is listed as a probe, so "no probe beats the loss" is visible
  in the same table.

Tables go out as Markdown, LaTeX and Parquet beside the ablation tables and are logged to the
sweeps' MLflow parent runs; ``figures`` draws the summary (AUC against fraction of training) and a
per-run figure for crashed runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
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
FRACTIONS = (0.05, 0.1, 0.25)
WITHIN_GROUP_FRACTION = 0.1
BOOTSTRAP = 1000

Group = tuple[str, str, float]
"""(workload, stabilizer, lr): the runs that differ only in their seed."""


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
    series: dict[str, list[tuple[int, float]]]   # metric -> [(step, value)] in step order
    split: str = ""                               # "train" | "test"
    steps_run: int | None = None                  # None: all ``steps``
    scores: dict = dataclasses.field(default_factory=dict, repr=False)  # (metric, fraction) -> _score's answer
    axes: dict = dataclasses.field(default_factory=dict)
    """The run's value of every other field that varies in the table (warmup_steps, depth, ...):
    its figure's file name carries them."""

    @property
    def group(self) -> Group:
        return (self.workload, self.stabilizer, self.lr)

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

    def settled_step(self) -> int | None:
        """The first probe step from which the training loss stays at or above the crash level
        (l_0 for diverged runs, the baseline for collapsed ones) until the run's end."""
        level = self.initial_loss if self.outcome == "diverged" else self.baseline
        loss = self.series.get("loss", [])
        if level is None or not loss:
            return None
        settled = None
        for s, v in loss:
            if not math.isfinite(v) or v >= level:
                settled = s if settled is None else settled
            else:
                settled = None
        return settled

    def crash_step(self) -> int | None:
        """A crashed run's crash step: :meth:`settled_step`, else its last step (None: not crashed)."""
        if not self.crashed:
            return None
        settled = self.settled_step()
        if settled is not None:
            return settled
        return (self.steps_run or self.steps) - 1


def load_histories(tracking_uri: str, experiment: str, sweep: str | None, crash=DEFAULT_CRASH,
                   kappa: float = DEFAULT_KAPPA, probes=tuple(PROBES), table: pa.Table | None = None) -> list[RunHistory]:
    """The finished runs with their probe histories; ``table``: the trials table with outcomes
    (``runs.with_outcomes``) when the caller has read it already."""
    if table is None:
        runs = fetch_runs(tracking_uri, experiment, sweep)
        if not runs:
            raise ValueError(f"no trial runs in MLflow experiment {experiment!r}"
                             + (f" for sweep {sweep!r}" if sweep else "") + f" at {tracking_uri}")
        table = with_outcomes(runs_table(runs, experiment), crash, kappa)
    tr = Tracker(tracking_uri, experiment)
    out = []
    varying = [f for f in cell_fields_of(table) if f not in ("stabilizer", "workload")]  # for figure names
    for row in table.to_pylist():
        if row["status"] not in FINISHED or row["outcome"] is None:
            continue
        series = {LR: [(0, row["lr"])]} if LR in probes else {}
        for m in probes:
            if m == LR:
                continue
            hist = tr.metric_history(row["run_id"], m)
            if hist:
                series[m] = sorted((h.step, h.value) for h in hist)
        out.append(RunHistory(row["run_id"], row["label"] or row["run_id"], row["workload"], row["stabilizer"],
                              row["lr"], row["seed"] or 0, row["steps"], row["outcome"], bool(row["crashed"]),
                              row["initial_loss"], row["baseline_loss"], series, steps_run=row.get("steps_run"),
                              axes={f: row[f] for f in varying}))
    assign_split(out)
    return out


def assign_split(runs: list[RunHistory]) -> None:
    """Every other (stabilizer, LR) group of each workload, in stabilizer and LR order, is
    ``train``, the others ``test``: all seeds of a group fall on the same side (a test run is never
    a replicate of a train run), and both halves cover every stabilizer and the LR range."""
    for wl in {r.workload for r in runs}:
        groups = sorted({r.group for r in runs if r.workload == wl})
        side = {g: "train" if i % 2 == 0 else "test" for i, g in enumerate(groups)}
        for r in runs:
            if r.workload == wl:
                r.split = side[r.group]


def by_group(runs: list[RunHistory]) -> list[list[RunHistory]]:
    groups: dict[Group, list[RunHistory]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    return [groups[g] for g in sorted(groups)]


# ----------------------------------------------------------------------------- statistics
def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U / n m)."""
    if not pos or not neg:
        return None
    p, n = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def bootstrap_groups(groups: list[list[RunHistory]], stat: Callable[[list[list[RunHistory]]], float | None],
                     n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float] | None:
    """Percentile 95 % interval of ``stat`` over ``n`` resamples of ``groups`` (with replacement,
    each drawn group with all its runs); resamples where ``stat`` is undefined are skipped."""
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        v = stat([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        if v is not None:
            vals.append(v)
    if not vals:
        return None
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def _score(run: RunHistory, metric: str, fraction: float) -> tuple[float, int | None] | None:
    """(danger score, step read) of ``metric`` at ``fraction`` of training (:meth:`RunHistory.eval_step`);
    a run that ended before that point scores ``inf`` (step None); None: nothing to read. Memoised
    on the run (the bootstraps ask again and again)."""
    key = (metric, fraction)
    if key not in run.scores:
        run.scores[key] = _read_score(run, metric, fraction)
    return run.scores[key]


def _read_score(run: RunHistory, metric: str, fraction: float) -> tuple[float, int | None] | None:
    d = PROBES.get(metric, 1)
    if metric == LR:
        return d * run.lr, None
    step = run.eval_step(metric, fraction)
    if step is None:
        return (math.inf, None) if run.ended_before(fraction * run.steps) and run.series.get(metric) else None
    v = run.value_at(metric, step)
    if not math.isfinite(v):  # a non-finite probe value is as dangerous as it gets
        return math.inf, step
    return d * v, step


def pooled_auc(groups: list[list[RunHistory]], metric: str, fraction: float) -> float | None:
    pos, neg = [], []
    for g in groups:
        for r in g:
            s = _score(r, metric, fraction)
            if s is not None:
                (pos if r.crashed else neg).append(s[0])
    return auc(pos, neg)


def within_group_pairs(group: list[RunHistory], metric: str, fraction: float) -> tuple[float, int]:
    """(wins, pairs) over the (crashed, stable) pairs of one group, ties half."""
    scored = [(r.crashed, s[0]) for r in group if (s := _score(r, metric, fraction)) is not None]
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
    """The AUC over (crashed, stable) pairs of the same group (same stabilizer and LR, different
    seeds): what the probe tells beyond the stabilizer and the LR. Returns (AUC, number of pairs)."""
    wins, pairs = 0.0, 0
    for g in groups:
        w, p = within_group_pairs(g, metric, fraction)
        wins, pairs = wins + w, pairs + p
    return (wins / pairs if pairs else None), pairs


def threshold(runs: list[RunHistory], metric: str) -> float | None:
    """The least extreme danger score no stable run ever reached; None ("none" in the tables) when
    no stable run recorded the probe, or no crashed run reached that score with a finite value (a
    threshold at the edge of the probe's range, e.g. an entropy below a stable run's 0, warns of
    nothing)."""
    d = PROBES.get(metric, 1)
    reached = [d * v for r in runs if not r.crashed for _, v in r.series.get(metric, []) if math.isfinite(v)]
    if not reached:
        return None
    thr = float(np.nextafter(max(reached), math.inf))
    if not any(math.isfinite(v) and d * v >= thr for r in runs if r.crashed for _, v in r.series.get(metric, [])):
        return None
    return thr


def first_crossing(run: RunHistory, metric: str, thr: float | None) -> int | None:
    """The first step at which ``metric`` is beyond ``thr`` (a non-finite value counts)."""
    if thr is None:
        return None
    d = PROBES.get(metric, 1)
    for s, v in run.series.get(metric, []):
        if (not math.isfinite(v)) or d * v >= thr:
            return s
    return None


def _rate(groups: list[list[RunHistory]], hit: Callable[[RunHistory], bool], among: Callable[[RunHistory], bool]):
    n = [r for g in groups for r in g if among(r)]
    return sum(hit(r) for r in n) / len(n) if n else None


# ------------------------------------------------------------------------------------ tables
@dataclasses.dataclass
class Forensics:
    auc_rows: list[dict]
    warning_rows: list[dict]
    warnings: dict[tuple[str, str], int | None]   # (run_id, metric) -> first crossing (test and train)
    runs: list[RunHistory]


def _ci(ci: tuple[float, float] | None) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


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
                steps = sorted({s[1] for r in have if (s := _score(r, m, f)) is not None and s[1] is not None})
                row[f"steps@{f:g}"] = steps
            f = WITHIN_GROUP_FRACTION
            row["auc_within_group"], row["within_group_pairs"] = auc_within_group(groups, m, f)
            paired = [g for g in groups if within_group_pairs(g, m, f)[1]]
            row["groups_with_pairs"] = len(paired)
            row["ci_within_group"] = _ci(bootstrap_groups(paired, lambda gs: auc_within_group(gs, m, f)[0], n_boot))
            auc_rows.append(row)

            train = [r for r in have if r.split == "train"]
            test_groups = [g for g in groups if g[0].split == "test"]
            thr = threshold(train, m)
            for r in have:
                warnings[(r.run_id, m)] = first_crossing(r, m, thr)

            def warned(r, m=m):
                w = warnings[(r.run_id, m)]
                return w is not None and w < r.crash_step()

            def late(r, m=m):
                w = warnings[(r.run_id, m)]
                return w is not None and w >= r.crash_step()

            def alarm(r, m=m):
                return warnings[(r.run_id, m)] is not None

            test = [r for g in test_groups for r in g]
            crashed_test = [r for r in test if r.crashed]
            stable_test = [r for r in test if not r.crashed]
            leads = [r.crash_step() - warnings[(r.run_id, m)] for r in crashed_test if warned(r)]
            fracs = [(r.crash_step() - warnings[(r.run_id, m)]) / r.steps for r in crashed_test if warned(r)]
            is_crashed = lambda r: r.crashed  # noqa: E731
            is_stable = lambda r: not r.crashed  # noqa: E731
            warn_rows.append({
                "workload": wl, "probe": m,
                "threshold": None if thr is None else PROBES.get(m, 1) * thr,
                "test_crashed_warned": f"{sum(map(warned, crashed_test))}/{len(crashed_test)}",
                "ci_warned": _ci(bootstrap_groups(test_groups, lambda gs: _rate(gs, warned, is_crashed), n_boot)),
                "test_crashed_late": f"{sum(map(late, crashed_test))}/{len(crashed_test)}",
                "test_false_alarms": f"{sum(map(alarm, stable_test))}/{len(stable_test)}",
                "ci_false_alarms": _ci(bootstrap_groups(test_groups, lambda gs: _rate(gs, alarm, is_stable), n_boot)),
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


def write_tables(fx: Forensics, out: Path, name: str, crit: str, fractions=FRACTIONS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    steps = {f: _steps_text(fx.auc_rows, f) for f in fractions}
    runs_steps = sorted({r.steps for r in fx.runs})
    header = (["workload", "probe", "warns when"]
              + [f"AUC at {f:.0%}" + (f" ({steps[f]})" if steps[f] else "") + " [95% CI]" for f in fractions]
              + [f"AUC at {WITHIN_GROUP_FRACTION:.0%} within a group [95% CI] (pairs / groups)", "crashed / stable"])
    body = [[r["workload"], r["probe"], r["direction"]]
            + [f"{_auc_text(r[f'auc@{f:g}'])} {r[f'ci@{f:g}']}".strip() for f in fractions]
            + [f"{_auc_text(r['auc_within_group'])} {r['ci_within_group']} ({r['within_group_pairs']} / "
               f"{r['groups_with_pairs']})".replace("  ", " "),
               f"{r['crashed_runs']} / {r['stable_runs']}"]
            for r in fx.auc_rows]
    files += write_table(out, "forensics_auc", header, body,
                         f"Which probe predicts a crash, {name}: ROC AUC of 'ends crashed' from the probe's value at "
                         "the first probe step at or after a fraction of training and after step 0 (of "
                         + "/".join(map(str, runs_steps)) + " steps; the step read is in each header), with bootstrap "
                         "95% intervals over (stabilizer, LR) groups; 'within a group': over crashed/stable pairs of "
                         "seeds that ran the same stabilizer at the same LR (what the probe adds to both); "
                         f"{crit}")
    header = ["workload", "probe", "threshold", "crashed warned before the crash (test) [95% CI]",
              "late: crossed at/after the crash (test)", "false alarms (test) [95% CI]",
              "lead steps median [min, max]", "lead / run", "train / test groups"]
    body = []
    for r in fx.warning_rows:
        lead = ("–" if r["lead_steps_median"] is None else
                f"{fmt(r['lead_steps_median'])} [{r['lead_steps_min']}, {r['lead_steps_max']}]")
        body.append([r["workload"], r["probe"], "none" if r["threshold"] is None else fmt(r["threshold"]),
                     f"{r['test_crashed_warned']} {r['ci_warned']}".strip(), r["test_crashed_late"],
                     f"{r['test_false_alarms']} {r['ci_false_alarms']}".strip(), lead,
                     fmt(r["lead_fraction_median"]), r["train_test_groups"]])
    files += write_table(out, "forensics_warnings", header, body,
                         f"Probe warnings, {name}: threshold chosen on the train groups (every other (stabilizer, LR) "
                         "group, all seeds of a group on one side) as the least extreme value no stable train run "
                         "reached ('none': no crashed train run reached it either); evaluated on the test groups. "
                         "A crash is warned only if the probe crossed strictly before its crash step (the first probe "
                         "step from which the loss stays at the crash level: l_0 for diverged, the baseline for "
                         "collapsed runs); later crossings are 'late'. Lead: steps from the warning to the crash step. "
                         f"Intervals: bootstrap over test groups; {crit}")
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
            ax.axvline(crash, color="C3", lw=1)
            w = fx.warnings.get((r.run_id, m))
            if w is not None:  # a warning before the crash step; a late crossing in grey
                ax.axvline(w, color="C1" if w < crash else "0.6", lw=1, ls="--")
        axes[-1, 0].set_xlabel("step (red: crash step; orange dashed: warning; grey dashed: late crossing)", fontsize=7)
        fig.suptitle(f"{r.label} [{r.workload}]: {r.outcome}", fontsize=8)
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
