"""Sweep specs: YAML in, a validated ``SweepSpec`` out, or a ``SpecError`` that names the field, the
bad value and what is allowed. Everything is checked here, before Ray starts: every trial of the
grid is built as a ``TrialConfig`` once, so a bad combination fails now, not inside a worker.

    name: smoke                       # sweep name: MLflow parent run, Tune experiment folder
    experiment: ablate-smoke          # MLflow experiment (default: ablate-<name>)
    workload: gpt                     # gpt | vit | swin
    steps: 60                         # steps per trial
    fixed: {depth: 2, width: 64}      # any TrialConfig field, the same for every trial
    axes:                             # swept fields; the grid is their cartesian product
      lr: {log_range: [1.0e-4, 1.0e-1], num: 7}     # or a list [1e-3, 1e-2]
      warmup_steps: [0, 50]
      stabilizers: [none, weyl, sigma_reparam, mlra, qk_norm, weyl+qk_norm]
    cells:                            # optional: explicit combinations, each with every axis combination
      - {stabilizers: none, depth: 4}   # (fields the same in every cell; none in fixed or axes)
      - {stabilizers: weyl, depth: 2}
    seeds: 1                          # each grid point with seeds 0..seeds-1 (or axes.seed: [...])
    resources: {cpus: 1, gpus: 0}     # per trial; fractional gpus pack trials onto one GPU
    concurrency: 2                    # trials at once (default: as many as resources allow)
    max_failures: 1                   # retries of a crashed trial before it is recorded failed
    probe_interval: 10
    crash: [diverged, collapsed]      # which outcome classes count as a crash (workloads.outcome):
                                      # any of diverged, collapsed, degraded
    degraded_kappa: 0.5               # degraded: (g_R - g) / g_R > kappa, g the gain over the baseline, g_R the cell's reference's
    divergence: {max_loss_ratio: 1.5, spike_ratio: 2.0, entropy_collapse: 0.05,   # events (recorded)
                 stop_grace: 0.4, stop_window: 10, stop_margin: 4.0,              # the loss rule, if opted into
                 stop_on: [nonfinite]}                                            # default: non-finite only
    storage_path: null                # Tune storage (shared storage on a cluster); default workdir
    max_trials: 10000                 # refuse a grid larger than this (CLI: --max-trials)

Every key, its type, default, allowed values and meaning: ``docs/spec.md``, generated from these
models (attribute docstrings are the descriptions) by ``python docs/gen_spec_reference.py``.

Numbers: YAML 1.1 (PyYAML) reads ``1e-3`` as a string (it wants ``1.0e-3``); a numeric string is
accepted wherever a trial field is a float.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workloads.divergence import DivergenceConfig
from workloads.outcome import CLASSES, DEFAULT_CRASH, DEFAULT_KAPPA, criterion_label, validate_crash

# Validation imports no torch: the trial fields, the stabilizer registry, the data sources' names and
# their cheap checks come from workloads.config, workloads.stabilizers and workloads.sources, which
# import none (a refused spec returns in a fraction of a second; tests/test_spec.py checks that no
# torch is loaded). Set by the spec's own keys, not through fixed/axes:
RESERVED = {"workload", "steps", "threads"}
MAX_TRIALS = 10_000
WORKLOADS = ("gpt", "vit", "swin")  # workloads.models.WORKLOADS (checked equal in tests/test_spec.py)


def _trial():
    """``workloads.config``: ``TrialConfig`` (public as ``workloads.trial.TrialConfig``) and
    ``ConfigError``, without torch."""
    import workloads.config

    return workloads.config


def _trial_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(_trial().TrialConfig)}


def _float_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(_trial().TrialConfig) if str(f.type).split(" ")[0] == "float"}


def __getattr__(name: str):  # TRIAL_FIELDS, FLOAT_FIELDS, TrialConfig: lazily, as before
    if name == "TRIAL_FIELDS":
        return _trial_fields()
    if name == "FLOAT_FIELDS":
        return _float_fields()
    if name in ("TrialConfig", "ConfigError"):
        return getattr(_trial(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DIVERGENCE_FIELDS = ("max_loss_ratio", "spike_ratio", "entropy_collapse", "stop_grace", "stop_window",
                     "stop_margin", "stop_on")


class SpecError(ValueError):
    """A sweep spec is invalid. The message names the field, the value and what is allowed."""


class _Strict(BaseModel):
    # attribute docstrings are the fields' descriptions: docs/spec.md is generated from them;
    # every number finite (YAML reads .inf and .nan as floats)
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


class Resources(_Strict):
    cpus: float = Field(1.0, gt=0)
    """CPUs per trial (Ray's resource); also the trial's torch threads (whole CPUs, at least 1)."""
    gpus: float = Field(0.0, ge=0)
    """GPUs per trial; a fraction packs trials onto one GPU (0.25: four), more than 1 must be whole.
    0 trains on the CPU."""

    @field_validator("gpus")
    @classmethod
    def _gpu_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("more than one GPU per trial must be a whole number")
        return v


_DIV = DivergenceConfig()


class Divergence(_Strict):
    max_loss_ratio: float = Field(_DIV.max_loss_ratio, gt=1)
    spike_ratio: float = Field(_DIV.spike_ratio, gt=1)
    entropy_collapse: float = Field(_DIV.entropy_collapse, ge=0)
    stop_grace: float = Field(_DIV.stop_grace, ge=0, le=1)
    stop_window: int = Field(_DIV.stop_window, ge=1)
    stop_margin: float = Field(_DIV.stop_margin, ge=1)
    stop_on: tuple[str, ...] = _DIV.stop_on


class LogRange(_Strict):
    log_range: tuple[float, float]
    """[low, high], 0 < low < high: the axis's values are spaced evenly in log between them, ends included."""
    num: int = Field(ge=2)
    """How many values (rounded to 6 significant digits)."""


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    """The sweep's name: its MLflow parent run, its Tune experiment folder, its Optuna studies; the
    same name resumes an interrupted sweep."""
    experiment: str | None = None
    """MLflow experiment (default: ``ablate-<name>``)."""
    description: str = ""
    """Free text, recorded with the spec."""
    workload: str
    """The model and its data family: a byte-level GPT on text, or timm's ViT / Swin on images."""
    steps: int = Field(gt=0)
    """Optimizer steps per trial (the LR schedule's length)."""
    fixed: dict[str, Any] = {}
    """Trial fields with one value for every trial (see the trial fields below)."""
    axes: dict[str, list[Any]] = {}
    """Swept trial fields, each a list of values or ``{log_range: [low, high], num: N}``; the grid is
    their cartesian product (a boundary search chooses ``lr`` itself and ignores an ``lr`` axis)."""
    cells: list[dict[str, Any]] = []
    """Explicit combinations of trial fields, one mapping each (every mapping setting the same fields,
    none of them also in ``fixed`` or ``axes``): the grid is every cell combined with every
    combination of the axes, instead of a product over all fields. For a study that compares chosen
    cells (``none`` at two depths, each stabilizer at one) with enough trials each, where the full
    product would spread them too thin."""
    seeds: int = Field(1, ge=1)
    """Each grid point runs with seeds 0..seeds-1 (or give ``axes.seed: [...]`` instead)."""
    resources: Resources = Resources()
    """Per-trial resources (the ``resources:`` block below)."""
    concurrency: int | None = Field(None, ge=1)
    """Trials at once (default: as many as the cluster's resources allow)."""
    max_failures: int = Field(1, ge=0)
    """Retries of a trial that raised (an exception, a lost node) before it is recorded ``failed``."""
    probe_interval: int | None = Field(None, ge=1)
    """Steps between stability probes; shorthand for ``fixed.probe_interval`` (left out: the trial
    field's default)."""
    divergence: Divergence = Divergence()
    """Events and early stopping (the ``divergence:`` block below)."""
    crash: tuple[str, ...] = DEFAULT_CRASH
    """Outcome classes that count as a crash (``workloads.outcome``)."""
    degraded_kappa: float = Field(DEFAULT_KAPPA, gt=0)
    """A finished run is ``degraded`` when, above its cell's reference LR, (g_R - g) / g_R > kappa: g its
    gain over the marginal baseline, g_R the mean gain of the cell's reference runs (workloads.outcome)."""
    storage_path: str | None = None
    """Tune's storage (on a cluster: shared storage, e.g. ``s3://...``); default
    ``$ABLATE_STORAGE_PATH``, else ``<workdir>/ray_results``."""
    max_trials: int = Field(MAX_TRIALS, ge=1)
    """The largest grid (trials, seeds included) this spec may expand to; a bigger one is refused."""
    boundary: dict[str, Any] | None = None
    """Crash-boundary search settings (``ablate boundary``); kept as given here."""

    @property
    def crash_criterion(self) -> str:
        return criterion_label(self.crash, self.degraded_kappa)

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"ablate-{self.name}"

    def base_config(self) -> dict[str, Any]:
        base = dict(self.fixed)
        base.update(workload=self.workload, steps=self.steps,
                    threads=max(1, int(self.resources.cpus)))
        if self.probe_interval is not None:
            base["probe_interval"] = self.probe_interval
        base.update({k: getattr(self.divergence, k) for k in DIVERGENCE_FIELDS})
        if self.resources.gpus == 0 and "device" not in base:
            base["device"] = "cpu"
        return base

    @property
    def swept(self) -> list[str]:
        """The fields that vary over the grid: the cells' fields, then the axes'."""
        return list(self.cells[0] if self.cells else ()) + list(self.axes)

    def combos(self, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Every combination of swept values (each cell with every combination of the axes but
        ``skip``), as ``{field: value}`` in the order of :attr:`swept`."""
        axes = {k: v for k, v in self.axes.items() if k not in skip}
        names = list(axes)
        return [{**cell, **dict(zip(names, combo))} for cell in (self.cells or [{}])
                for combo in itertools.product(*(axes[n] for n in names))]

    def grid_size(self) -> int:
        """Trials in the grid (cells x product of axis lengths, times seeds), counted without building it."""
        return (max(1, len(self.cells)) * math.prod(len(v) for v in self.axes.values())
                * (1 if "seed" in self.axes else self.seeds))

    def check_grid_size(self) -> None:
        check_grid_size(_lengths(self.axes, self.cells), self.seeds, self.max_trials)

    def trials(self) -> list:
        """The grid: one validated TrialConfig per combination of swept values (and seed)."""
        seeds = [{}] if "seed" in self.axes else [{"seed": s} for s in range(self.seeds)]
        TrialConfig, ConfigError = _trial().TrialConfig, _trial().ConfigError
        cell_fields = set(self.cells[0]) if self.cells else set()
        out, seen = [], set()
        for combo in self.combos():
            for seed in seeds:
                cfg_dict = {**self.base_config(), **combo, **seed}
                try:
                    cfg = TrialConfig(**cfg_dict)
                except ConfigError as e:
                    field = str(e).split(":", 1)[0]
                    where = (f"axes.{field}" if field in self.axes else f"cells.{field}" if field in cell_fields
                             else f"fixed.{field}" if field in self.fixed else field)
                    raise SpecError(f"{where}: {str(e).split(':', 1)[-1].strip()}") from None
                key = repr(sorted(cfg.to_dict().items()))
                if key not in seen:
                    seen.add(key)
                    out.append(cfg)
        return out


def _lengths(axes: dict[str, Any], cells: list) -> dict[str, int]:
    """The grid's factors for :func:`check_grid_size`: the number of cells (if any) and each axis's length."""
    return ({"cells": len(cells)} if cells else {}) | {k: len(v) for k, v in axes.items()}


def check_grid_size(lengths: dict[str, int], seeds: int, max_trials: int) -> int:
    """The grid's trials from its axes' lengths (and seeds unless an axis is ``seed``), counted
    without building anything; a ``SpecError`` when it is above ``max_trials``."""
    n = math.prod(lengths.values()) * (1 if "seed" in lengths else seeds)
    if n > max_trials:
        sizes = [f"{k}: {v:,}" for k, v in lengths.items()]
        if "seed" not in lengths and seeds > 1:
            sizes.append(f"seeds: {seeds:,}")
        raise SpecError(f"axes: the grid has {n:,} trials ({' x '.join(sizes)}), above max_trials "
                        f"{max_trials:,}; shrink an axis, or raise the limit (max_trials: N in the spec, "
                        "or --max-trials N)")
    return n


def _axis_length(name: str, value: Any) -> int:
    """How many values an axis has, a ``log_range``'s ``num`` read without expanding it."""
    if isinstance(value, dict):
        return _log_range(name, value).num
    if not isinstance(value, list) or not value:
        raise SpecError(f"axes.{name}: {value!r} must be a non-empty list of values or a log_range")
    return len(value)


def _log_range(name: str, value: dict) -> LogRange:
    try:
        rng = LogRange(**value)
    except (ValidationError, TypeError) as e:
        why = _first_msg(e) if isinstance(e, ValidationError) else str(e)
        raise SpecError(f"axes.{name}: {value!r} is not a list or "
                        f"{{log_range: [low, high], num: N}} ({why})") from None
    lo, hi = rng.log_range
    if not (0 < lo < hi):
        raise SpecError(f"axes.{name}.log_range: {list(rng.log_range)} must satisfy 0 < low < high")
    return rng


def _allowed(keys) -> str:
    return ", ".join(sorted(keys))


def _expand_axis(name: str, value: Any) -> list[Any]:
    if isinstance(value, dict):
        import numpy as np

        rng = _log_range(name, value)
        lo, hi = rng.log_range
        return [float(f"{v:.6g}") for v in np.geomspace(lo, hi, rng.num)]
    if not isinstance(value, list) or not value:
        raise SpecError(f"axes.{name}: {value!r} must be a non-empty list of values or a log_range")
    return value


def _normalise_stabilizers(where: str, v: Any) -> tuple[str, ...]:
    names = v if isinstance(v, (list, tuple)) else [n for n in str(v).replace(",", "+").split("+") if n]
    from workloads.stabilizers import REGISTRY

    bad = [n for n in names if n not in REGISTRY]
    if bad:
        raise SpecError(f"{where}: unknown stabilizer(s) {bad} in {v!r}; allowed: {_allowed(REGISTRY)} "
                        "(combine with '+', e.g. weyl+qk_norm)")
    return () if list(names) == ["none"] else tuple(names)


def _first_msg(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{err['msg']}"


def validation_message(e: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one line: the field (``boundary.lr_range[1]``), the value and what is
    allowed (pydantic's own words, e.g. "Input should be a finite number")."""
    err = e.errors()[0]
    where = prefix
    for part in err["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    return f"{where}: {err.get('input')!r}: {err['msg']}"


def parse_spec(raw: Any, source: str = "<spec>") -> SweepSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec is a YAML mapping, got {type(raw).__name__}")
    top = set(SweepSpec.model_fields)
    unknown = set(raw) - top
    if unknown:
        raise SpecError(f"{sorted(unknown)[0]}: unknown key; allowed: {_allowed(top)}")
    for block, model in (("resources", Resources), ("divergence", Divergence)):
        if isinstance(raw.get(block), dict):
            extra = set(raw[block]) - set(model.model_fields)
            if extra:
                raise SpecError(f"{block}.{sorted(extra)[0]}: unknown key; allowed: {_allowed(model.model_fields)}")
    if raw.get("workload") not in WORKLOADS:
        raise SpecError(f"workload: {raw.get('workload')!r} is not one of {list(WORKLOADS)}")
    raw = dict(raw)
    for block in ("fixed", "axes"):
        if raw.get(block) is not None and not isinstance(raw[block], dict):
            raise SpecError(f"{block}: {raw[block]!r} must be a mapping of trial field: "
                            + ("value, e.g. {depth: 2, width: 64}" if block == "fixed" else
                               "values, e.g. {lr: [1.0e-3, 1.0e-2]}"))
    fixed = dict(raw.get("fixed") or {})
    axes_raw = dict(raw.get("axes") or {})
    # The grid counted before anything is built or imported (a log_range's num read, not expanded).
    cells_raw = raw.get("cells") or []
    if not isinstance(cells_raw, list) or not all(isinstance(c, dict) and c for c in cells_raw):
        raise SpecError(f"cells: {cells_raw!r} must be a list of mappings of trial field: value, e.g. "
                        "[{stabilizers: none, depth: 4}, {stabilizers: weyl, depth: 2}]")
    lengths = _lengths({k: range(_axis_length(k, v)) for k, v in axes_raw.items()}, cells_raw)
    seeds, limit = raw.get("seeds", 1), raw.get("max_trials", MAX_TRIALS)
    if all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (seeds, limit)):
        check_grid_size(lengths, seeds, limit)  # (a bad seeds / max_trials is named below)
    TRIAL_FIELDS, FLOAT_FIELDS = _trial_fields(), _float_fields()
    cell_keys = list(cells_raw[0]) if cells_raw else []
    for i, c in enumerate(cells_raw):
        if set(c) != set(cell_keys):
            raise SpecError(f"cells[{i}]: sets {sorted(c)}, cells[0] sets {sorted(cell_keys)}; every cell must set "
                            "the same fields (a field left out would take a default silently)")
    for where, keys in (("fixed", fixed), ("axes", axes_raw), ("cells", cell_keys)):
        for k in keys:
            if k in RESERVED or k in DIVERGENCE_FIELDS or k not in TRIAL_FIELDS:
                hint = (f"set it as the spec's top-level '{k}'" if k in RESERVED else
                        "set it under 'divergence:'" if k in DIVERGENCE_FIELDS else
                        f"allowed: {_allowed(TRIAL_FIELDS - RESERVED - set(DIVERGENCE_FIELDS))}")
                raise SpecError(f"{where}.{k}: unknown or reserved trial field; {hint}")
    overlap = set(fixed) & set(axes_raw)
    if overlap:
        raise SpecError(f"axes.{sorted(overlap)[0]}: also set in fixed; a field is either fixed or swept")
    for k in cell_keys:
        if k in fixed or k in axes_raw:
            raise SpecError(f"cells.{k}: also set in {'fixed' if k in fixed else 'axes'}; a field is set in one "
                            "place: fixed, axes or cells")
    axes = {k: _expand_axis(k, v) for k, v in axes_raw.items()}
    cells = []
    for i, c in enumerate(cells_raw):
        c = {k: _number(f"cells[{i}].{k}", v) if k in FLOAT_FIELDS else v for k, v in c.items()}
        if "stabilizers" in c:
            c["stabilizers"] = _normalise_stabilizers(f"cells[{i}].stabilizers", c["stabilizers"])
        if c in cells:
            raise SpecError(f"cells[{i}]: {cells_raw[i]!r} is the same cell as cells[{cells.index(c)}]")
        cells.append(c)
    for k in FLOAT_FIELDS & set(fixed):
        fixed[k] = _number(f"fixed.{k}", fixed[k])
    for k in FLOAT_FIELDS & set(axes):
        axes[k] = [_number(f"axes.{k}", v) for v in axes[k]]
    if "stabilizers" in axes:
        axes["stabilizers"] = [_normalise_stabilizers(f"axes.stabilizers[{i}]", v)
                               for i, v in enumerate(axes["stabilizers"])]
    if "stabilizers" in fixed:
        fixed["stabilizers"] = _normalise_stabilizers("fixed.stabilizers", fixed["stabilizers"])
    if "lr" in axes:
        for v in axes["lr"]:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise SpecError(f"axes.lr: {v!r} is not a learning rate; allowed: finite numbers > 0")
    if "seed" in axes and "seeds" in raw:
        raise SpecError("seeds: give either seeds: N or axes.seed: [...], not both")
    div = raw.get("divergence") or {}
    if isinstance(div, dict) and "stop_on" in div:
        try:
            DivergenceConfig(stop_on=tuple(div["stop_on"]))
        except ValueError as e:
            raise SpecError(f"divergence.{e}") from None
    if "crash" in raw:
        crash = raw["crash"]
        try:
            raw["crash"] = validate_crash([crash] if isinstance(crash, str) else crash or [])
        except (ValueError, TypeError):
            raise SpecError(f"crash: {crash!r}; allowed: a list of {[c for c in CLASSES if c != 'stable']}, "
                            f"e.g. {list(DEFAULT_CRASH)}") from None
    raw["fixed"], raw["axes"] = fixed, axes
    if cells_raw:
        raw["cells"] = cells
    try:
        spec = SweepSpec(**raw)
    except ValidationError as e:
        raise SpecError(validation_message(e)) from None
    spec.check_grid_size()  # before anything is built: a huge grid is refused in milliseconds
    trials = spec.trials()  # every combination must build
    _check_devices(spec, trials)
    return spec


def _number(where: str, v: Any) -> Any:
    """A numeric string (``1e-3``: YAML 1.1 reads a float without a dot as a string) as a float."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise SpecError(f"{where}: {v!r} is not a number (write numbers unquoted, e.g. 1.0e-3)") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise SpecError(f"{where}: {v!r} is not a finite number; allowed: finite numbers (not .inf, .nan)")
    return v


def _check_devices(spec: SweepSpec, trials: list) -> None:
    """A trial that needs CUDA gets none from Ray unless the spec asks for GPUs: refuse it now."""
    if spec.resources.gpus > 0:
        return
    for t in trials:
        if t.precision == "bf16":
            raise SpecError("precision: 'bf16' autocast needs a GPU, but resources.gpus is 0 (trials run on CPU); "
                            "set resources.gpus > 0, or precision: fp32")
        if t.device.startswith("cuda"):
            raise SpecError(f"device: {t.device!r} needs a GPU, but resources.gpus is 0 (Ray gives the trial no "
                            "GPU); set resources.gpus > 0, or device: cpu")


def read_spec_file(path: str | Path) -> Any:
    """The YAML document in ``path``; a one-line ``SpecError`` for anything that is not a readable
    text file of valid YAML (no such file, a folder, unreadable, binary, a YAML syntax error)."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"spec: no such file {str(p)!r}")
    if not p.is_file():
        raise SpecError(f"spec: {str(p)!r} is not a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise SpecError(f"spec: cannot read {str(p)!r} ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"spec: {str(p)!r} is not a text file (byte {data[e.start]:#04x} at offset {e.start} is "
                        "not UTF-8); a spec is YAML text") from None
    if "\x00" in text:
        raise SpecError(f"spec: {str(p)!r} is not a text file (it holds NUL bytes); a spec is YAML text")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"spec: {str(p)!r} is not valid YAML{where}: {what}") from None


def load_spec(path: str | Path, max_trials: int | None = None) -> SweepSpec:
    """Read and validate a sweep spec (YAML). Raises ``SpecError`` naming field, value, allowed.
    ``max_trials`` overrides the spec's own limit on the grid's size."""
    raw = read_spec_file(path)
    if max_trials is not None and isinstance(raw, dict):
        raw = {**raw, "max_trials": max_trials}
    return parse_spec(raw, str(path))
