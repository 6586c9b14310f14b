"""Divergence events and early stopping.

A trial's outcome is decided by how the run ends (``workloads.outcome``). Early stopping only saves
compute: it may stop a trial only when its final class is already settled. By default only a
non-finite loss stops a run (``stop_on: [nonfinite]``): on 400 recorded full runs (at least two
seeds of every configuration) no loss rule of the searched grid stops only runs that end diverged; a GPT
with sigmaReparam at lr 1 held ~10 x l_0 for half of its 1000 steps and still ended below l_0
(``benchmarks/detector_calibration.py``, docs/classes.md "Early stopping"). Everything
else is recorded as an event and never stops a run.

Kinds (``STOP_KINDS`` may stop a trial; ``stop_on`` chooses which of them do):
  ``nonfinite``        the loss is NaN or Inf: the run cannot recover (its update has been applied:
                       the loop reads losses in blocks, ``TrialConfig.sync_interval``). Always stops.
  ``above_initial``    opt-in (``stop_on: [nonfinite, above_initial]``): past a grace period
                       (``stop_grace`` x the run's steps, and at least ``stop_window`` steps), the
                       median training loss of the last ``stop_window`` steps is >= ``stop_margin`` x
                       ``l_0`` (the validation loss before training): the loss is held there, not
                       spiking through (a median ignores short spikes). Its defaults (grace 40 %,
                       window 10, margin 4) stop 1 of the 400 recorded runs wrongly (that GPT, at
                       step 399) and save 23.6 % of the crashed trials' steps beyond non-finite
                       stopping; no rule of the grid stops none wrongly. The rule before it (grace
                       25 %, window 20, margin 3) stopped 6 of them.
  ``loss_ratio``       the loss rose above ``max_loss_ratio`` x ``l_0``. Recorded once per excursion.
  ``loss_spike``       the loss rose above ``spike_ratio`` x its exponential moving average (after
                       ``warmup_checks`` steps). Recorded once per excursion.
  ``entropy_collapse`` the minimum per-head attention entropy of a layer fell below
                       ``entropy_collapse`` nats (Zhai et al. 2023). Recorded once per layer.

Spikes in the first steps are common at high learning rates without warmup and many runs recover
from them (a byte-level GPT at lr 0.1 passes 1.5 x its first loss at step 3 and ends at 3.08 from
5.44); they are events, never a stop.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field

KINDS = ("nonfinite", "above_initial", "loss_ratio", "loss_spike", "entropy_collapse")
STOP_KINDS = ("nonfinite", "above_initial")


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
    """No spike check before this many steps."""
    entropy_collapse: float = 0.05
    stop_grace: float = 0.4
    """Fraction of the run's steps before ``above_initial`` may stop it (calibrated on held-out full
    runs, see ``benchmarks/detector_calibration.py`` and docs/classes.md "Early stopping")."""
    stop_window: int = 10
    """Steps whose median training loss is compared with ``stop_margin`` x l_0 (calibrated)."""
    stop_margin: float = 4.0
    """Multiple of l_0 the windowed median must reach (calibrated: a GPT at lr 1 held 3 x l_0 at 77 %
    of a 1000-step run and still ended below l_0, collapsed)."""
    stop_on: tuple[str, ...] = ("nonfinite",)
    """Which kinds stop a run. Default: a non-finite loss only (no loss rule is safe on the recorded
    full runs); ``("nonfinite", "above_initial")`` opts into the loss rule."""

    def __post_init__(self) -> None:
        bad = [k for k in self.stop_on if k not in STOP_KINDS]
        if bad:
            recorded = [k for k in bad if k in KINDS]
            why = (f" ({', '.join(recorded)} {'is' if len(recorded) == 1 else 'are'} recorded as events "
                   "but cannot stop a trial: runs recover from them; a crash is decided by the run's end)"
                   if recorded else "")
            raise ValueError(f"stop_on: kind(s) {bad} cannot stop a trial{why}; allowed: {list(STOP_KINDS)}")
        if "nonfinite" not in self.stop_on:
            raise ValueError(f"stop_on: {list(self.stop_on)} must include 'nonfinite': the trial loop reads "
                             "the loss in blocks without a per-step host sync, so a non-finite loss has "
                             "already reached the weights when it is seen and the run cannot go on")
        if self.max_loss_ratio <= 1 or self.spike_ratio <= 1:
            raise ValueError(f"max_loss_ratio ({self.max_loss_ratio}) and spike_ratio ({self.spike_ratio}) "
                             "must be > 1")
        if not 0 <= self.ema_beta < 1:
            raise ValueError("ema_beta must be in [0, 1)")
        if not 0 <= self.stop_grace <= 1:
            raise ValueError(f"stop_grace: {self.stop_grace} must be a fraction of the run in [0, 1]")
        if self.stop_window < 1:
            raise ValueError(f"stop_window: {self.stop_window} must be >= 1 step")
        if self.stop_margin < 1:
            raise ValueError(f"stop_margin: {self.stop_margin} must be >= 1 (x l_0)")


@dataclass
class DivergenceDetector:
    """Feed it every training loss (and the attention entropy on probe steps); it returns events.

    ``initial_loss`` is l_0, the validation loss before training, and ``total_steps`` the run's
    length (for the grace period). Without ``initial_loss`` only ``nonfinite``, spikes and entropy
    collapse are detected.
    """

    config: DivergenceConfig = field(default_factory=DivergenceConfig)
    initial_loss: float | None = None
    total_steps: int = 0
    ema: float | None = None
    _seen: int = 0
    _window: deque = field(default_factory=deque)
    _in_excursion: set[str] = field(default_factory=set)
    _collapsed_layers: set[int] = field(default_factory=set)

    @property
    def grace_steps(self) -> int:
        return max(self.config.stop_window, math.ceil(self.config.stop_grace * self.total_steps))

    def _excursion(self, kind: str, above: bool) -> bool:
        """True the first step of an excursion above a threshold (re-armed once back below)."""
        if not above:
            self._in_excursion.discard(kind)
            return False
        if kind in self._in_excursion:
            return False
        self._in_excursion.add(kind)
        return True

    def observe_loss(self, step: int, loss: float) -> list[DivergenceEvent]:
        c = self.config
        if not math.isfinite(loss):
            return [DivergenceEvent(step, "nonfinite", loss, "loss is not finite")]
        events = []
        self._seen += 1
        self._window.append(loss)
        if len(self._window) > c.stop_window:
            self._window.popleft()
        l0 = self.initial_loss
        if l0 is not None and self._excursion("loss_ratio", loss > c.max_loss_ratio * l0):
            events.append(DivergenceEvent(step, "loss_ratio", loss,
                                          f"loss {loss:.4g} > {c.max_loss_ratio:g} x l_0 {l0:.4g}"))
        if self.ema is not None and self._seen > c.warmup_checks:
            if self._excursion("loss_spike", loss > c.spike_ratio * self.ema):
                events.append(DivergenceEvent(step, "loss_spike", loss,
                                              f"loss {loss:.4g} > {c.spike_ratio:g} x running average {self.ema:.4g}"))
        self.ema = loss if self.ema is None else c.ema_beta * self.ema + (1 - c.ema_beta) * loss
        if l0 is not None and self._seen >= self.grace_steps and len(self._window) == c.stop_window:
            held = statistics.median(self._window)
            if held >= c.stop_margin * l0:
                events.append(DivergenceEvent(
                    step, "above_initial", held,
                    f"median loss of the last {c.stop_window} steps {held:.4g} >= {c.stop_margin:g} x l_0 "
                    f"{l0:.4g} after {self._seen} steps (grace {self.grace_steps})"))
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


def replay(losses: list[float], initial_loss: float, total_steps: int,
           config: DivergenceConfig | None = None) -> DivergenceEvent | None:
    """The first stopping event the live detector would raise on a recorded loss curve (the same
    code as the trial loop runs); None if it would let the run finish."""
    det = DivergenceDetector(config or DivergenceConfig(), initial_loss=initial_loss, total_steps=total_steps)
    for step, loss in enumerate(losses):
        for e in det.observe_loss(step, loss):
            if det.is_stop(e):
                return e
    return None
