"""Divergence forensics: which stability probe warns of a crash first, how far ahead, how reliably.

Read from MLflow alone (like ``export``): every finished trial run's class (``workloads.outcome``,
via ``export.with_outcomes``: the run's end decides) and the histories of its probe metrics. Per
workload and probe:

- **Predictive power.** The probe's value at fixed fractions of training (``FRACTIONS``: its last
  recorded value at or before that step) scores "ends crashed"; the ROC AUC (Mann-Whitney, ties
  count half) with a bootstrap 95 % interval over runs, and the counts of crashed and stable runs;
  and the AUC over only the crashed/stable pairs that ran at the same LR (what the probe tells
  beyond the LR).
  Each probe has a fixed danger direction (``PROBES``: entropy low, everything else high), so an
  AUC below 0.5 means the probe points the wrong way.
- **Warnings.** The probe *warns* at its first recorded step beyond a threshold. The threshold is
  chosen on one half of the runs (the *train* half: runs sorted by workload, stabilizer, LR and seed,
  every other one) as the least extreme value that no stable train run ever reached (the rule an
  early stop would need: no false crash), and evaluated on the other half (*test*): crashed runs
  warned, false alarms (stable test runs warned), and the lead time.
- **Lead time.** For a crashed run, steps (and fraction of the run) from the warning to the step at
  which its training loss settled into the crash: the first probe step from which the loss stays at
  or above l_0 (diverged runs) or the marginal baseline (collapsed runs) to the end. The loss itself
  is listed as a probe, so "no probe beats the loss" is visible in the same table.

Tables go out as Markdown, LaTeX and Parquet beside the ablation tables and are logged to the
sweeps' MLflow parent runs; ``figures`` draws the summary (AUC against fraction of training) and a
per-run figure for crashed runs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.export import (FINISHED, _fmt, _log_artifacts, _write, axis_token, cell_fields_of, fetch_runs,
                                 file_stem, runs_table, with_outcomes)
from orchestrator.tracking import TAG_SWEEP, Tracker
from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA, criterion_label

LR = "learning rate"
"""Not a probe: the run's configured LR as a constant series, the baseline every probe must beat (in
an LR sweep anything that grows with the LR predicts crashes)."""
PROBES: dict[str, int] = {
    # metric -> danger direction: +1 high values warn, -1 low values warn
    LR: +1,
    "loss": +1,
    "attn_entropy/min": -1,
    "attn_entropy/mean": -1,
    "max_logit": +1,
    "spectral_conc/max": +1,
    "qk_sigma1/max": +1,
    "tev/mean": +1,
    "tev/std": +1,
    "grad_norm": +1,
    "param_norm": +1,
}
FRACTIONS = (0.05, 0.1, 0.25)
WITHIN_LR_FRACTION = 0.1
BOOTSTRAP = 1000


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
    axes: dict = dataclasses.field(default_factory=dict)
    """The run's value of every other field that varies in the table (warmup_steps, depth, ...):
    its figure's file name carries them."""

    def value_at(self, metric: str, step: float) -> float | None:
        """The metric's last recorded value at or before ``step`` (None before its first)."""
        out = None
        for s, v in self.series.get(metric, []):
            if s > step:
                break
            out = v
        return out

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


def load_histories(tracking_uri: str, experiment: str, sweep: str | None, crash=DEFAULT_CRASH,
                   kappa: float = DEFAULT_KAPPA, probes=tuple(PROBES), table: pa.Table | None = None) -> list[RunHistory]:
    """The finished runs with their probe histories; ``table``: the trials table with outcomes
    (``export.with_outcomes``) when the caller has read it already."""
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
                              row["initial_loss"], row["baseline_loss"], series,
                              axes={f: row[f] for f in varying}))
    assign_split(out)
    return out


def assign_split(runs: list[RunHistory]) -> None:
    """Every other run, in (workload, stabilizer, lr, seed) order, is ``train``: both halves cover
    every stabilizer and the LR range."""
    for i, r in enumerate(sorted(runs, key=lambda r: (r.workload, r.stabilizer, r.lr, r.seed))):
        r.split = "train" if i % 2 == 0 else "test"


# ----------------------------------------------------------------------------- statistics
def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U / n m)."""
    if not pos or not neg:
        return None
    p, n = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def auc_within_lr(runs: list[RunHistory], metric: str, fraction: float) -> tuple[float | None, int]:
    """The AUC over (crashed, stable) pairs that ran at the same learning rate: what the probe tells
    beyond the LR itself. Returns (AUC, number of pairs)."""
    wins, pairs = 0.0, 0
    for c in (r for r in runs if r.crashed):
        sc = _score(c, metric, fraction)
        for s in (r for r in runs if not r.crashed and r.lr == c.lr):
            ss = _score(s, metric, fraction)
            if sc is None or ss is None:
                continue
            pairs += 1
            wins += 1.0 if sc > ss else 0.5 if sc == ss else 0.0
    return (wins / pairs if pairs else None), pairs


def bootstrap_auc(pos: list[float], neg: list[float], n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float] | None:
    if not pos or not neg:
        return None
    rng = np.random.default_rng(seed)
    pos_a, neg_a = np.asarray(pos, float), np.asarray(neg, float)
    vals = [auc(list(rng.choice(pos_a, pos_a.size)), list(rng.choice(neg_a, neg_a.size))) for _ in range(n)]
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def _score(run: RunHistory, metric: str, fraction: float) -> float | None:
    v = run.value_at(metric, fraction * run.steps)
    if v is None:
        return None
    if not math.isfinite(v):  # a non-finite probe value is as dangerous as it gets
        return math.inf
    return PROBES.get(metric, 1) * v


def threshold(runs: list[RunHistory], metric: str) -> float | None:
    """The least extreme danger score no stable run ever reached (None: no stable run has it)."""
    d = PROBES.get(metric, 1)
    reached = [d * v for r in runs if not r.crashed for _, v in r.series.get(metric, []) if math.isfinite(v)]
    if not reached:
        return None
    return float(np.nextafter(max(reached), math.inf))


def first_warning(run: RunHistory, metric: str, thr: float | None) -> int | None:
    if thr is None:
        return None
    d = PROBES.get(metric, 1)
    for s, v in run.series.get(metric, []):
        if (not math.isfinite(v)) or d * v >= thr:
            return s
    return None


# ------------------------------------------------------------------------------------ tables
@dataclasses.dataclass
class Forensics:
    auc_rows: list[dict]
    warning_rows: list[dict]
    warnings: dict[tuple[str, str], int | None]   # (run_id, metric) -> warning step (test and train)
    runs: list[RunHistory]


def analyse(runs: list[RunHistory], probes=tuple(PROBES), fractions=FRACTIONS) -> Forensics:
    auc_rows, warn_rows, warnings = [], [], {}
    for wl in sorted({r.workload for r in runs}):
        mine = [r for r in runs if r.workload == wl]
        for m in probes:
            have = [r for r in mine if r.series.get(m)]
            if not have:
                continue
            row = {"workload": wl, "probe": m, "direction": "high" if PROBES.get(m, 1) > 0 else "low",
                   "crashed_runs": sum(r.crashed for r in have), "stable_runs": sum(not r.crashed for r in have)}
            for f in fractions:
                pos = [s for r in have if r.crashed and (s := _score(r, m, f)) is not None]
                neg = [s for r in have if not r.crashed and (s := _score(r, m, f)) is not None]
                row[f"auc@{f:g}"] = auc(pos, neg)
                ci = bootstrap_auc(pos, neg)
                row[f"ci@{f:g}"] = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            row["auc_within_lr"], row["within_lr_pairs"] = auc_within_lr(have, m, WITHIN_LR_FRACTION)
            auc_rows.append(row)

            train = [r for r in have if r.split == "train"]
            test = [r for r in have if r.split == "test"]
            thr = threshold(train, m)
            leads, fracs = [], []
            for r in have:
                warnings[(r.run_id, m)] = first_warning(r, m, thr)
            for r in test:
                w, settled = warnings[(r.run_id, m)], r.settled_step()
                if r.crashed and w is not None and settled is not None:
                    leads.append(settled - w)
                    fracs.append((settled - w) / r.steps)
            crashed_test = [r for r in test if r.crashed]
            stable_test = [r for r in test if not r.crashed]
            warn_rows.append({
                "workload": wl, "probe": m,
                "threshold": None if thr is None else PROBES.get(m, 1) * thr,
                "test_crashed_warned": f"{sum(warnings[(r.run_id, m)] is not None for r in crashed_test)}"
                                       f"/{len(crashed_test)}",
                "test_false_alarms": f"{sum(warnings[(r.run_id, m)] is not None for r in stable_test)}"
                                     f"/{len(stable_test)}",
                "train_false_alarms": 0 if thr is not None else None,
                "lead_steps_median": float(np.median(leads)) if leads else None,
                "lead_steps_min": min(leads) if leads else None, "lead_steps_max": max(leads) if leads else None,
                "lead_fraction_median": float(np.median(fracs)) if fracs else None,
            })
    return Forensics(auc_rows, warn_rows, warnings, runs)


def _auc_text(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def write_tables(fx: Forensics, out: Path, name: str, crit: str, fractions=FRACTIONS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    header = (["workload", "probe", "warns when"] + [f"AUC at {f:.0%} [95% CI]" for f in fractions]
              + [f"AUC at {WITHIN_LR_FRACTION:.0%} within an LR (pairs)", "crashed / stable"])
    body = [[r["workload"], r["probe"], r["direction"]]
            + [f"{_auc_text(r[f'auc@{f:g}'])} {r[f'ci@{f:g}']}".strip() for f in fractions]
            + [f"{_auc_text(r['auc_within_lr'])} ({r['within_lr_pairs']})", f"{r['crashed_runs']} / {r['stable_runs']}"]
            for r in fx.auc_rows]
    files += _write(out, "forensics_auc", header, body,
                    f"Which probe predicts a crash, {name}: ROC AUC of 'ends crashed' from the probe's value at a "
                    "fraction of training (bootstrap 95% interval over runs), and over crashed/stable pairs that ran "
                    f"at the same LR (what the probe adds to the LR); {crit}")
    header = ["workload", "probe", "threshold", "crashed warned (test)", "false alarms (test)",
              "lead steps median [min, max]", "lead / run"]
    body = []
    for r in fx.warning_rows:
        lead = ("–" if r["lead_steps_median"] is None else
                f"{_fmt(r['lead_steps_median'])} [{r['lead_steps_min']}, {r['lead_steps_max']}]")
        body.append([r["workload"], r["probe"], _fmt(r["threshold"]), r["test_crashed_warned"],
                     r["test_false_alarms"], lead, _fmt(r["lead_fraction_median"])])
    files += _write(out, "forensics_warnings", header, body,
                    f"Probe warnings, {name}: threshold chosen on the train half (every other run in workload, "
                    "stabilizer, LR order) as the least extreme value no stable train run reached; evaluated on the "
                    "test half. Lead: steps from the warning to the step from which the loss stays at the crash "
                    f"level (l_0 for diverged, the baseline for collapsed runs); {crit}")
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

    crashed = [r for r in fx.runs if r.crashed][:max_runs]
    used: set[str] = set()
    if crashed:
        (out / "forensics_runs").mkdir(exist_ok=True)
    for r in crashed:
        metrics = [m for m in PROBES if m != LR and r.series.get(m)]
        fig, axes = plt.subplots(len(metrics), 1, figsize=(6, 1.25 * len(metrics) + 0.8), sharex=True, squeeze=False)
        settled = r.settled_step()
        for ax, m in zip(axes[:, 0], metrics):
            xs, ys = zip(*r.series[m])
            ax.plot(xs, ys, lw=1)
            if m in ("loss", "max_logit", "qk_sigma1/max", "grad_norm") and min(ys) > 0:
                ax.set_yscale("log")
            ax.set_ylabel(m, fontsize=7, rotation=0, ha="right")
            ax.tick_params(which="both", labelsize=6)
            if settled is not None:
                ax.axvline(settled, color="C3", lw=1)
            w = fx.warnings.get((r.run_id, m))
            if w is not None:
                ax.axvline(w, color="C1", lw=1, ls="--")
        axes[-1, 0].set_xlabel("step (red: loss settled into the crash; orange dashed: the probe's warning)", fontsize=7)
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
        for sw in sweeps:
            _log_artifacts(tracking_uri, experiment, sw, [f for f in files if f.parent == out], "forensics")
    return fx, files
