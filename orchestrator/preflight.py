"""What is checked before a sweep or a boundary search writes anything (``ablate check SPEC``, and
the first thing ``ablate sweep`` / ``ablate boundary`` do): the spec (validated, its grid or its
cells counted before anything is built), the data sources, the GPUs it asks for, and what would run.

No workdir, lock, store, Ray or MLflow is touched here, and Ray, MLflow and torch are not even
imported (torch only to count the local GPUs of a spec that asks for some, or to time steps): a
refusal costs the spec's validation only, well under 2 s (``benchmarks/refusal_time.py``). On a cluster (``--address`` / ``RAY_ADDRESS``) the GPUs are those of
the cluster, checked when the driver joins it (``orchestrator.sweep.check_resources``); a data
source missing on the driver's machine is then a warning (the workers may have it).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.spec import SpecError, SweepSpec, load_spec, read_spec_file

log = logging.getLogger("ablate")


@dataclass
class Plan:
    """What a spec would run."""

    kind: str                       # "sweep" | "boundary"
    spec: SweepSpec
    raw: Any
    trials: int | None              # grid trials (sweep), or the search's budget (boundary)
    cells: int | None = None        # boundary: cells searched
    per_cell: int | None = None     # boundary: at most this many trials a cell
    reference: tuple[int, float] | None = None  # boundary: reference trials a cell runs first, and their LR
    embedded: bool = True
    local_gpus: int | None = None   # GPUs on this machine (embedded runs that ask for GPUs)
    warnings: list[str] = field(default_factory=list)
    step_seconds: dict[str, float] = field(default_factory=dict)   # timed config -> s/step
    trial_hours: float | None = None

    def lines(self) -> list[str]:
        s, r = self.spec, self.spec.resources
        out = [f"spec {s.name!r} ({s.workload}, {s.steps} steps a trial; MLflow experiment {s.experiment_name!r})"]
        if self.kind == "boundary":
            out.append(f"boundary search: {self.cells} cells" + (f", at most {self.per_cell} trials a cell "
                       f"(at most {self.trials} trials)" if self.per_cell else "")
                       + (f"; each cell first runs {self.reference[0]} reference trials at lr {self.reference[1]:g}"
                          if self.reference else ""))
        else:
            out.append(f"grid: {self.trials} trials ({_grid_text(s)})")
        where = ("this machine (embedded Ray)" if self.embedded else
                 f"the Ray cluster at {os.environ.get('RAY_ADDRESS') or 'the given --address'}")
        conc = f", at most {s.concurrency} at once" if s.concurrency else ""
        out.append(f"resources: {r.cpus:g} CPU / {r.gpus:g} GPU a trial{conc}, on {where}"
                   + (f" ({self.local_gpus} GPU(s) here)" if self.local_gpus is not None else ""))
        for name, sec in self.step_seconds.items():
            out.append(f"timed: {name}: {sec * 1000:.1f} ms a step")
        if self.trial_hours is not None:
            n = "at most " if self.kind == "boundary" else ""
            out.append(f"estimate: {n}{self.trial_hours:.3g} trial-hours of training steps "
                       "(one-step timings on this machine; probes and evaluation not included)")
        out += [f"warning: {w}" for w in self.warnings]
        return out


def _grid_text(s: SweepSpec) -> str:
    parts = ([f"cells: {len(s.cells)}"] if s.cells else []) + [f"{k}: {len(v)}" for k, v in s.axes.items()]
    if "seed" not in s.axes and s.seeds > 1:
        parts.append(f"seeds: {s.seeds}")
    return " x ".join(parts) or "one point"


def embedded_run(address: str | None) -> bool:
    return not (address or os.environ.get("RAY_ADDRESS"))


def check_data(spec: SweepSpec, trials, embedded: bool) -> list[str]:
    """Every distinct data source of the grid must load here before anything is launched. On a
    cluster the trials may read data that only the workers have: a missing source is a warning
    (returned, and logged)."""
    from workloads.sources import check_source

    seen, warnings = set(), []
    for t in trials:
        key = (t.data, t.data_path, t.vocab_size)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_source(*key)
        except (OSError, ValueError) as e:
            msg = str(e)
            where = ("axes" if "data_path" in spec.axes or "data" in spec.axes else "fixed") + ".data_path"
            if embedded:
                raise SpecError(f"{where}: {msg}") from None
            log.warning("%s: %s (on the driver's machine; the workers may have it)", where, msg)
            warnings.append(f"{where}: {msg} (on this machine; the cluster's workers may have it)")
    return warnings


def local_gpus() -> int:
    """GPUs this machine offers a process (CUDA_VISIBLE_DEVICES applies), without starting Ray."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(spec: SweepSpec, embedded: bool) -> int | None:
    """An embedded run that asks for GPUs needs them on this machine: refused now, before Ray
    starts. The number of local GPUs, or None when not asked (or on a cluster: checked on joining)."""
    want = spec.resources.gpus
    if want <= 0 or not embedded:
        return None
    have = local_gpus()
    if have == 0:
        raise SpecError(f"resources.gpus: {want:g} asked per trial, but this machine has no GPU (no CUDA device"
                        + (f"; CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
                           if "CUDA_VISIBLE_DEVICES" in os.environ else "")
                        + "); set resources.gpus: 0 to run on CPUs, or pass --address of a Ray cluster with GPUs")
    if want > have:
        raise SpecError(f"resources.gpus: {want:g} per trial > {have} GPU(s) on this machine")
    return have


def time_steps(spec: SweepSpec, trials, steps: int = 3, max_configs: int = 8) -> dict[str, float]:
    """Seconds per training step of each distinct trial shape (the grid's configs up to LR, seed,
    warmup and schedule), from ``steps`` timed steps after one warm-up step, on the device the trial
    would use here. At most ``max_configs`` shapes are timed; the rest take the slowest timing."""
    from workloads.trainer import Trainer

    ignore = {"lr", "seed", "warmup_steps", "schedule"}
    shapes: dict[str, Any] = {}
    for t in trials:
        key = " ".join(f"{k}={v}" for k, v in sorted(t.to_dict().items()) if k not in ignore)
        shapes.setdefault(key, t)
    out: dict[str, float] = {}
    for i, (key, cfg) in enumerate(shapes.items()):
        if i >= max_configs:
            break
        tr = Trainer(cfg)
        _sync(tr)
        tr.step(0, False)
        _sync(tr)
        t0 = time.perf_counter()
        for s in range(1, steps + 1):
            tr.step(s, False)
        _sync(tr)
        out[_shape_name(cfg, spec)] = (time.perf_counter() - t0) / steps
    return out


def _sync(tr) -> None:
    if tr.device.type == "cuda":
        import torch

        torch.cuda.synchronize(tr.device)


def _shape_name(cfg, spec: SweepSpec) -> str:
    swept = [k for k in spec.swept if k not in ("lr", "seed", "warmup_steps", "schedule")]
    parts = [f"{k}={cfg.stabilizer_label if k == 'stabilizers' else getattr(cfg, k)}" for k in swept]
    return " ".join(parts) or spec.workload


def estimate_trial_hours(spec: SweepSpec, trials, timings: dict[str, float], budget: int | None = None) -> float:
    """Trial-hours of training steps: each trial's steps times its shape's step time (the slowest
    timing for a shape not timed); for a boundary search, ``budget`` trials at the slowest shape."""
    slowest = max(timings.values())
    if budget is not None:  # a search: its budget of trials, at the slowest shape
        return budget * spec.steps * slowest / 3600
    total = sum(t.steps * timings.get(_shape_name(t, spec), slowest) for t in trials)
    return total / 3600


def plan(spec_path: str | Path, kind: str = "sweep", max_trials: int | None = None, address: str | None = None,
         time_steps_n: int = 0) -> Plan:
    """Everything ``ablate check`` checks, in order: the spec (one line and exit 2 when it is bad),
    the grid or the cells (counted before they are built), the data sources, the GPUs; then, with
    ``time_steps_n``, a one-step timing of each trial shape for an estimate of the trial-hours.
    Writes nothing and starts nothing."""
    raw = read_spec_file(spec_path)
    spec = load_spec(spec_path, max_trials=max_trials)
    embedded = embedded_run(address)
    cells = per_cell = None
    if kind == "boundary":
        from orchestrator.boundary_config import boundary_config

        if isinstance(spec.boundary, dict) and spec.boundary and "lr_range" not in spec.boundary:
            raise SpecError("boundary.lr_range: missing; a boundary search needs boundary: {lr_range: [low, high]}")
        cfg = boundary_config(spec)
        cells = len(spec.combos(skip=("seed", "lr")))
        per_cell = getattr(cfg, "max_trials_per_cell", None)
        n = cells * per_cell if per_cell else None
    else:
        n = spec.grid_size()
    trials = spec.trials()
    p = Plan(kind, spec, raw, n, cells=cells, per_cell=per_cell, embedded=embedded,
             reference=(cfg.reference_seeds, cfg.ref_lr) if kind == "boundary" else None)
    p.warnings += check_data(spec, trials, embedded)
    p.local_gpus = check_gpus(spec, embedded)
    if time_steps_n > 0:
        gpu_trial = spec.resources.gpus > 0 or any(t.device.startswith("cuda") for t in trials)
        if gpu_trial and local_gpus() == 0:
            p.warnings.append("no step timing: the trials run on a GPU and this machine has none")
        else:
            p.step_seconds = time_steps(spec, trials, time_steps_n)
            if kind != "boundary" or n:
                p.trial_hours = estimate_trial_hours(spec, trials, p.step_seconds,
                                                     budget=n if kind == "boundary" else None)
    return p
