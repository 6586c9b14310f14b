"""The spec's ``boundary:`` block, validated once at the edge: :class:`BoundaryConfig` (its keys, their
defaults per method, and the settings it takes from the rest of the spec) and :func:`boundary_config`
(a :class:`~orchestrator.spec.SweepSpec` -> its config, or a ``SpecError`` naming the key). The search
that uses it is :mod:`orchestrator.boundary`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.spec import SpecError, SweepSpec, validation_message
from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA

METHODS = ("psi", "bisect")
DEFAULTS = {"psi": {"resolution": 1.5, "max_trials_per_cell": 40},
            "bisect": {"resolution": 2 ** 0.25, "max_trials_per_cell": 12}}
"""Per method: ``resolution`` is the largest LR50 interval (high / low, 90 %) that stops a cell for
``psi``, the largest bracket (crash / stable) for ``bisect``."""


class BoundaryConfig(BaseModel):
    """The spec's ``boundary:`` block (``seed_offset``, ``crash`` and ``kappa`` come from the rest of
    the spec)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)
    lr_range: tuple[float, float]
    """[low, high], 0 < low < high: the learning rates searched, in log space (required)."""
    method: Literal["psi", "bisect"] = "psi"
    """psi: a Psi-method search of LR50 over every run of the cell, a fresh seed per trial; bisect:
    a quick one-seed bisection of the bracket, labelled as such in every table."""
    resolution: float | None = Field(None, gt=1)
    """psi: a cell has converged when LR50's 90 % interval (high / low) is at most this (default
    1.5); bisect: when its bracket (crash LR / stable LR) is (default 2^(1/4))."""
    max_trials_per_cell: int | None = Field(None, ge=2)
    """A cell's budget of trials, its reference trials included: its search stops there, converged or
    not (default psi 40, bisect 12). Trials cut off by an interruption do not count; failed ones do."""
    min_trials_per_cell: int = Field(8, ge=1)
    """psi: the interval may stop a cell only after this many finished trials (with fewer, a sharp
    transition and a wide one can look alike: see benchmarks/boundary_efficiency.py)."""
    seeds: int = Field(1, ge=1)
    """bisect only: the final bracket's ends are repeated with this many seeds."""
    reference_seeds: int = Field(3, ge=1)
    """Reference trials each cell runs first, at reference_lr, seeds from the cell's own sequence:
    the classes of the cell's runs are judged against their mean gain (workloads/outcome.py), and no
    other trial of the cell starts before they have finished. They count in the fit and the budget."""
    reference_lr: float | None = Field(None, gt=0)
    """The LR of the reference trials, inside lr_range (default: its low end)."""
    max_in_flight_per_cell: int = Field(1, ge=1)
    """A cell's trials running at once (psi places them by expected information, pending ones counted)."""
    seed_offset: int = 0
    """From the spec's ``fixed.seed``: every seed of the search is offset by it."""
    crash: tuple[str, ...] = DEFAULT_CRASH
    """From the spec's top-level ``crash:`` (not part of the boundary block)."""
    kappa: float = DEFAULT_KAPPA
    """From the spec's top-level ``degraded_kappa:``."""

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method", "psi") in DEFAULTS:
            data = {**data}
            for k, v in DEFAULTS[data.get("method", "psi")].items():
                if data.get(k) is None:
                    data[k] = v
        return data

    @property
    def ref_lr(self) -> float:
        """The LR of the cell's reference trials: ``reference_lr``, else the low end of ``lr_range``."""
        return self.reference_lr if self.reference_lr is not None else self.lr_range[0]

    def study_settings(self) -> dict[str, Any]:
        """The settings that give a cell's trials their meaning (a study remembers them: a resumed
        search refuses other ones; the budget and stopping settings may change)."""
        return {"lr_range": list(self.lr_range), "method": self.method, "seed_offset": self.seed_offset,
                "reference_seeds": self.reference_seeds, "reference_lr": self.ref_lr,
                "crash": list(self.crash), "kappa": self.kappa,
                **({"seeds": self.seeds} if self.method == "bisect" else {})}


def boundary_config(spec: SweepSpec) -> BoundaryConfig:
    if not spec.boundary:
        raise SpecError("boundary: missing; a boundary search needs boundary: {lr_range: [low, high]}")
    for old in ("degraded_ratio", "degraded_is_crash", "crash", "kappa"):
        if old in spec.boundary:
            raise SpecError(f"boundary.{old}: not a boundary setting; which outcome classes count as a crash "
                            "is the spec's top-level crash: [diverged, collapsed, degraded] and "
                            "degraded_kappa: (see workloads/outcome.py)")
    for axis in ("lr", "seed"):
        if axis in spec.axes or any(axis in c for c in spec.cells):
            where = "axes" if axis in spec.axes else "cells"
            raise SpecError(f"{where}.{axis}: not allowed in a boundary search: the search chooses every trial's "
                            + ("learning rate inside boundary.lr_range" if axis == "lr" else
                               "seed (a fresh one per trial, offset by fixed.seed)")
                            + "; remove it (a grid over it is ablate sweep's)")
    if spec.seeds > 1:
        raise SpecError(f"seeds: {spec.seeds}: not used by a boundary search; method psi gives every trial a "
                        "fresh seed, method bisect repeats its bracket's ends with boundary.seeds")
    if spec.boundary.get("method", "psi") == "psi" and spec.boundary.get("seeds", 1) != 1:
        raise SpecError(f"boundary.seeds: {spec.boundary['seeds']!r}: only for method: bisect; method psi "
                        "gives every trial a fresh seed (fixed.seed offsets them)")
    offset = spec.fixed.get("seed", 0)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise SpecError(f"fixed.seed: {offset!r}: a boundary search's seed offset must be an integer >= 0")
    try:
        cfg = BoundaryConfig(**spec.boundary, crash=spec.crash, kappa=spec.degraded_kappa, seed_offset=offset)
    except ValidationError as e:  # every number finite: lr_range: [1e-3, .inf] is refused here
        allowed = ", ".join(k for k in BoundaryConfig.model_fields if k not in ("crash", "kappa", "seed_offset"))
        keys = f" (keys: {allowed})" if e.errors()[0]["type"] == "extra_forbidden" else ""
        raise SpecError(validation_message(e, "boundary") + keys) from None
    lo, hi = cfg.lr_range
    if not 0 < lo < hi:
        raise SpecError(f"boundary.lr_range: {list(cfg.lr_range)} must satisfy 0 < low < high")
    if not lo <= cfg.ref_lr <= hi:
        raise SpecError(f"boundary.reference_lr: {cfg.reference_lr!r} must lie inside lr_range {list(cfg.lr_range)} "
                        "(default: its low end)")
    if cfg.max_trials_per_cell <= cfg.reference_seeds:
        raise SpecError(f"boundary.max_trials_per_cell: {cfg.max_trials_per_cell} must exceed reference_seeds "
                        f"({cfg.reference_seeds}): the reference trials come out of the cell's budget")
    return cfg
