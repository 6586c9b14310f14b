"""Divergence detection: turn a loss curve (and attention entropy) into divergence events.

A diverged trial is a result, not an error: the detector emits a :class:`DivergenceEvent` and the
trial loop stops at the first event whose kind is in ``DivergenceConfig.stop_on``, so a learning
rate that crashes costs a few steps, not a full run.

Kinds:
  ``nonfinite``        loss is NaN or Inf.
  ``loss_ratio``       loss > ``max_loss_ratio`` x the initial loss (mean of the first steps).
  ``loss_spike``       loss > ``spike_ratio`` x its exponential moving average (after warm-up).
  ``entropy_collapse`` the minimum per-head attention entropy of some layer fell below
                       ``entropy_collapse`` nats (Zhai et al. 2023). Recorded, not a stop by default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

KINDS = ("nonfinite", "loss_ratio", "loss_spike", "entropy_collapse")


@dataclass(frozen=True)
class DivergenceEvent:
    step: int
    kind: str
    value: float
    detail: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        if not math.isfinite(d["value"]):
            d["value"] = str(d["value"])  # JSON has no NaN/Inf
        return d


@dataclass(frozen=True)
class DivergenceConfig:
    max_loss_ratio: float = 1.5
    spike_ratio: float = 2.0
    ema_beta: float = 0.9
    warmup_checks: int = 10
    """Steps whose losses form the initial loss; no spike check before this many steps."""
    entropy_collapse: float = 0.05
    stop_on: tuple[str, ...] = ("nonfinite", "loss_ratio", "loss_spike")

    def __post_init__(self) -> None:
        bad = [k for k in self.stop_on if k not in KINDS]
        if bad:
            raise ValueError(f"stop_on: unknown kind(s) {bad}; allowed: {list(KINDS)}")
        if self.max_loss_ratio <= 1 or self.spike_ratio <= 1:
            raise ValueError(f"max_loss_ratio ({self.max_loss_ratio}) and spike_ratio ({self.spike_ratio}) "
                             "must be > 1")
        if not 0 <= self.ema_beta < 1:
            raise ValueError("ema_beta must be in [0, 1)")


@dataclass
class DivergenceDetector:
    config: DivergenceConfig = field(default_factory=DivergenceConfig)
    initial_loss: float | None = None
    ema: float | None = None
    _first: list[float] = field(default_factory=list)
    _collapsed_layers: set[int] = field(default_factory=set)

    def observe_loss(self, step: int, loss: float) -> list[DivergenceEvent]:
        c = self.config
        if not math.isfinite(loss):
            return [DivergenceEvent(step, "nonfinite", loss, "loss is not finite")]
        events = []
        if self.initial_loss is None:
            self._first.append(loss)
            if len(self._first) >= c.warmup_checks:
                self.initial_loss = sum(self._first) / len(self._first)
        ref = self.initial_loss if self.initial_loss is not None else self._first[0]
        if loss > c.max_loss_ratio * ref:
            events.append(DivergenceEvent(
                step, "loss_ratio", loss,
                f"loss {loss:.4g} > {c.max_loss_ratio:g} x initial loss {ref:.4g}"))
        if self.ema is not None and self.initial_loss is not None and loss > c.spike_ratio * self.ema:
            events.append(DivergenceEvent(
                step, "loss_spike", loss,
                f"loss {loss:.4g} > {c.spike_ratio:g} x running average {self.ema:.4g}"))
        self.ema = loss if self.ema is None else c.ema_beta * self.ema + (1 - c.ema_beta) * loss
        return events

    def observe_entropy(self, step: int, per_layer_min: list[float]) -> list[DivergenceEvent]:
        """One event per layer, the first time its minimum head entropy falls below the floor."""
        events = []
        for i, h in enumerate(per_layer_min):
            if h < self.config.entropy_collapse and i not in self._collapsed_layers:
                self._collapsed_layers.add(i)
                events.append(DivergenceEvent(
                    step, "entropy_collapse", h,
                    f"layer {i}: min head entropy {h:.4g} < {self.config.entropy_collapse:g} nats"))
        return events

    def is_stop(self, event: DivergenceEvent) -> bool:
        return event.kind in self.config.stop_on
