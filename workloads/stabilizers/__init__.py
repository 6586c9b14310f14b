"""Stabilizers, switched on by name and combinable.

| name            | what it changes                         | options (``stabilizer_options[name]``)      |
| --------------- | --------------------------------------- | ------------------------------------------- |
| ``none``        | nothing: AdamW, the baseline            |                                             |
| ``weyl``        | the optimizer: :class:`WeylAdamW`       | tau, threshold, squarings, weight_power_iters, init_power_iters |
| ``sigma_reparam`` | every Linear of the blocks, or of the model and its patch-embedding conv: :class:`SigmaReparamLinear` | scope (``blocks`` default, ``all``) |
| ``mlra``        | the attention's Q/K/V: :class:`workloads.attention.MLRA` | rank                       |
| ``qk_norm``     | LayerNorm on queries and keys           |                                             |

Learning-rate warmup and the decay schedule are separate axes of ``TrialConfig``, not stabilizers.
A stabilizer acts at one of three points: model options (the architecture is built with it),
a module transform after construction, or the optimizer.

The registry (names, options, :func:`resolve`, :func:`label`) imports no torch: a spec is validated
without it (``orchestrator.spec``). The implementations (:class:`WeylAdamW`,
:class:`SigmaReparamLinear`, :func:`apply_sigma_reparam`, ...) are imported on first use, from
``workloads.stabilizers.weyl`` and ``workloads.stabilizers.sigma_reparam``, and stay reachable here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SCOPES = ("blocks", "all")
"""sigmaReparam's scopes: the Linears of the blocks, or every Linear and the patch-embedding conv."""


@dataclass(frozen=True)
class Stabilizer:
    name: str
    description: str
    options: Mapping[str, type | tuple[str, ...]] = field(default_factory=dict)
    """Allowed option names and their types, or the tuple of their allowed values."""
    model_options: Callable[[Mapping[str, Any]], dict] | None = None
    transform: Callable[[Any, Mapping[str, Any]], Any] | None = None
    """``transform(model, options)``: the model with the stabilizer applied."""
    optimizer: str | None = None
    """The name of its optimizer class in this package (e.g. ``"WeylAdamW"``), imported on first use."""


def _sigma_reparam(model, options: Mapping[str, Any]):
    from workloads.stabilizers.sigma_reparam import apply_sigma_reparam

    return apply_sigma_reparam(model, options.get("scope") or "blocks")


REGISTRY: dict[str, Stabilizer] = {
    s.name: s
    for s in (
        Stabilizer("none", "plain AdamW, the baseline"),
        Stabilizer("weyl", "WeylAdamW: AdamW with Weyl smoothing of each matrix's step (Qi et al. 2025)",
                   options={"tau": float, "threshold": float, "squarings": int, "weight_power_iters": int,
                            "init_power_iters": int},
                   optimizer="WeylAdamW"),
        Stabilizer("sigma_reparam", "sigmaReparam on every Linear of the blocks, or (scope: all) on every "
                   "Linear and the patch-embedding conv (Zhai et al. 2023)",
                   options={"scope": SCOPES},
                   transform=_sigma_reparam),
        Stabilizer("mlra", "multi-head low-rank attention (Chung et al. 2024)",
                   options={"rank": int},
                   model_options=lambda o: {"attention": "mlra", "mlra_rank": o.get("rank")}),
        Stabilizer("qk_norm", "LayerNorm on queries and keys (Dehghani et al. 2023)",
                   model_options=lambda o: {"qk_norm": True}),
    )
}


def resolve(names: tuple[str, ...] | list[str] | str, options: Mapping[str, Mapping[str, Any]] | None = None
            ) -> list[Stabilizer]:
    """Validate stabilizer names and options; returns the active stabilizers (``none`` dropped)."""
    if isinstance(names, str):
        names = [n for n in names.replace(",", "+").split("+") if n]
    options = options or {}
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"stabilizers: unknown {unknown}; allowed: {sorted(REGISTRY)}")
    if len(set(names)) != len(names):
        raise ValueError(f"stabilizers: {list(names)} names one twice")
    if "none" in names and len(names) > 1:
        raise ValueError(f"stabilizers: 'none' cannot be combined with others, got {list(names)}")
    for key, opts in options.items():
        if key not in REGISTRY:
            raise ValueError(f"stabilizer_options: unknown stabilizer {key!r}; allowed: {sorted(REGISTRY)}")
        allowed = REGISTRY[key].options
        for k, v in opts.items():
            if k not in allowed:
                raise ValueError(f"stabilizer_options.{key}: unknown option {k!r}; allowed: {sorted(allowed)}")
            if isinstance(allowed[k], tuple):
                if v is not None and v not in allowed[k]:
                    raise ValueError(f"stabilizer_options.{key}.{k}: {v!r} is not allowed; allowed: {list(allowed[k])}")
                continue
            if v is not None and not isinstance(v, (int, float) if allowed[k] is float else allowed[k]):
                raise ValueError(f"stabilizer_options.{key}.{k}: {v!r} is not a {allowed[k].__name__}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"stabilizer_options.{key}.{k}: {v!r} must be a finite number")
    return [REGISTRY[n] for n in names if n != "none"]


def label(names: tuple[str, ...]) -> str:
    """Canonical name of a combination, e.g. ``'qk_norm+weyl'`` (``'none'`` for the baseline)."""
    active = sorted(n for n in names if n != "none")
    return "+".join(active) if active else "none"


def __getattr__(name: str):
    """The implementations, imported (with torch) on first use."""
    if name in ("SigmaReparamConv2d", "SigmaReparamLinear", "apply_sigma_reparam"):
        from workloads.stabilizers import sigma_reparam

        return getattr(sigma_reparam, name)
    if name == "WeylAdamW":
        from workloads.stabilizers.weyl import WeylAdamW

        return WeylAdamW
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["REGISTRY", "SCOPES", "SigmaReparamConv2d", "SigmaReparamLinear", "Stabilizer", "WeylAdamW",
           "apply_sigma_reparam", "label", "resolve"]
