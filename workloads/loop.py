"""The run loop of one trial: ``run(config, reporter)`` trains with a ``workloads.trainer.Trainer``,
reads the training losses to the host in blocks, feeds them to the divergence detector, reports
metrics and events, stops on a stopping event and measures the end of the run (``TrialResult``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workloads.config import TrialConfig
from workloads.divergence import DivergenceDetector, DivergenceEvent
from workloads.outcome import paired_gap, trial_class
from workloads.probes import AttentionStats
from workloads.trainer import Trainer, host_cpu, lr_at

Reporter = Callable[[int, dict[str, float], list[DivergenceEvent]], None]


@dataclass
class TrialResult:
    initial_loss: float
    """l_0: validation loss of the untrained model."""
    final_loss: float
    """Validation loss at the end of the run (or where early stopping ended it); inf when the loss
    became non-finite."""
    best_loss: float
    """Lowest validation loss seen at any evaluation."""
    final_train_loss: float
    """Mean training loss of the last (up to) 10 steps run."""
    steps_run: int
    outcome: str
    """``stable`` / ``collapsed`` / ``diverged`` (``workloads.outcome.trial_class``: the final loss
    against ``eval_baseline`` with a margin of 2 ``final_loss_se``; ``degraded`` and the margin of a
    tenth of the reference gain are decided against the cell's reference runs,
    ``workloads.outcome.classify``)."""
    baseline_loss: float
    """The data's marginal baseline: unigram (text) or class-prior (images) cross-entropy of the
    whole validation split."""
    stop_reason: str | None
    """The early-stopping rule that ended the run (``nonfinite`` / ``above_initial``), or None."""
    first_event: DivergenceEvent | None
    """The event that stopped the run, if any."""
    events: list[DivergenceEvent]
    wall_time: float
    throughput: float
    """Tokens (gpt) or images (vit, swin) per second of training steps."""
    throughput_unit: str
    device: str
    """Where it trained: the CUDA device's name, or ``cpu``."""
    num_params: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    train_losses: list[float] = field(default_factory=list)
    """The training loss of every step run (for calibration and forensics)."""
    eval_baseline: float = math.nan
    """The marginal baseline measured on exactly the validation windows ``final_loss`` is measured
    on (``data.window_baselines``): the baseline the class compares with, window noise cancelled."""
    final_loss_se: float = math.nan
    """Standard error of ``final_loss - eval_baseline`` over the validation windows (the paired
    per-window differences); nan when the final loss is non-finite."""
    window_losses: list[float] = field(default_factory=list)
    """The final validation loss of each window (text: one sequence; images: one image)."""
    window_baselines: list[float] = field(default_factory=list)
    """The marginal baseline of each of those windows, in the same order."""
    threads: int = 0
    """torch's intra-op thread count the run trained with (``torch.get_num_threads()``): part of the
    result on a CPU (a reduction over 1 or 2 threads rounds differently), so recorded to re-run it
    exactly (``ablate trial --from-run``)."""
    cpu: str = ""
    """The host's CPU model (``workloads.trainer.host_cpu``): with ``device`` and ``threads``, the
    machine a bit-for-bit re-run needs."""

    @property
    def diverged(self) -> bool:
        return self.outcome == "diverged"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["first_event"] = self.first_event.to_dict() if self.first_event else None
        d["events"] = [e.to_dict() for e in self.events]
        d["diverged"] = self.diverged
        return d


def run(config: TrialConfig, reporter: Reporter | None = None) -> TrialResult:
    """Train one trial. Calls ``reporter(step, metrics, events)`` every ``probe_interval`` steps, at
    the last step and at an event. Stops early only on a stopping event (``workloads.divergence``:
    a non-finite loss, and a loss held above l_0 past the grace period where ``stop_on`` opts into
    it); the outcome class comes from the run's final state (``workloads.outcome.trial_class``).

    The training losses stay on the device and are read in blocks, one host transfer per
    ``sync_interval`` steps (and at probe, evaluation and last steps); the detector then sees each
    of them in step order, and events are reported at their own step. A stop therefore takes effect
    at the read after the stopping step: up to ``sync_interval - 1`` further steps have run (they
    are counted in ``steps_run`` and ``train_losses``), and ``final_loss`` is measured on the
    weights the run ended with."""
    loop = TrialLoop(config, reporter)
    loop.train()
    return loop.result()


class TrialLoop:
    """One trial's run (``run``): the trainer, the divergence detector and what the loop keeps
    between steps: the losses not yet read, the events, the best validation loss, the training time."""

    def __init__(self, config: TrialConfig, reporter: Reporter | None = None):
        self.cfg = config
        self.reporter = reporter
        self.t_start = time.perf_counter()
        self.trainer = Trainer(config)
        self.initial_val = self.trainer.evaluate()
        self.detector = DivergenceDetector(config.divergence(), initial_loss=self.initial_val,
                                           total_steps=config.steps)
        self.events: list[DivergenceEvent] = []
        self.first_stop: DivergenceEvent | None = None
        self.losses: list[float] = []
        self.pending: list[torch.Tensor] = []  # losses of the steps since the last read, on the device
        self.last_metrics: dict[str, float] = {}
        self.best_val = math.inf
        self.train_time = 0.0  # training steps, probes and loss reads; evaluation excluded
        self.step = self.steps_run = 0

    def report(self, at: int, metrics: dict[str, float], step_events: list[DivergenceEvent], loss: float) -> None:
        metrics.setdefault("loss", loss)
        metrics.setdefault("lr", lr_at(self.cfg, at))
        metrics["throughput"] = self.throughput()
        self.last_metrics.update(metrics)
        if self.reporter is not None:
            self.reporter(at, metrics, step_events)

    def throughput(self) -> float:
        return self.steps_run * self.trainer.data.items_per_batch / max(self.train_time, 1e-9)

    def train(self) -> None:
        """The steps, up to ``cfg.steps`` or the read that sees a stopping event. A step that is
        neither a probe, an evaluation nor a ``sync_interval`` multiple leaves its loss on the device."""
        cfg = self.cfg
        for step in range(cfg.steps):
            self.step = step
            t0 = time.perf_counter()
            is_probe = step % cfg.probe_interval == 0 or step == cfg.steps - 1
            is_eval = bool(cfg.eval_interval) and 0 < step < cfg.steps - 1 and step % cfg.eval_interval == 0
            loss, metrics, stats = self.trainer.step(step, is_probe)
            self.pending.append(loss)
            self.steps_run = step + 1
            if not (is_probe or is_eval or step % cfg.sync_interval == 0):
                self.train_time += time.perf_counter() - t0
                continue
            values = torch.stack(self.pending).tolist()  # the one host read of this block
            self.pending.clear()
            self.train_time += time.perf_counter() - t0
            self.losses.extend(values)
            self.observe(step, values, metrics, stats, is_eval)
            if self.first_stop is not None:
                break

    def observe(self, step: int, values: list[float], metrics: dict[str, float], stats: AttentionStats | None,
                is_eval: bool) -> None:
        """The detector sees the block's losses (ending at ``step``) in step order; events are reported
        at their own step, ``step`` with its metrics (and validation loss). Stops at a stopping event."""
        detector = self.detector
        for at, value in enumerate(values, start=step - len(values) + 1):
            step_events = detector.observe_loss(at, value)
            if at == step and stats is not None:
                step_events += detector.observe_entropy(at, [r["entropy_min"] for r in stats.layers])
            self.events += step_events
            stopping = [e for e in step_events if detector.is_stop(e)]
            if stopping:
                self.first_stop = stopping[0]
            if at < step and step_events:
                self.report(at, {}, step_events, value)
            elif at == step:
                if step == 0:
                    metrics["val_loss"] = self.initial_val
                elif is_eval and not stopping:
                    metrics["val_loss"] = self.trainer.evaluate()
                    self.best_val = min(self.best_val, metrics["val_loss"])
                if metrics or step_events:
                    self.report(at, metrics, step_events, value)
            if self.first_stop is not None:
                return

    def result(self) -> TrialResult:
        """The run's end measured (unless the weights are non-finite) and classed."""
        tr = self.trainer
        stop_reason = self.first_stop.kind if self.first_stop is not None else None
        final_val = math.inf
        base_w = tr.data.window_baselines
        eval_base, window_losses = float(np.mean(base_w)), []
        if stop_reason != "nonfinite":  # the weights are finite: the run's end is measured
            window_losses = tr.evaluate_windows().tolist()
            final_val = float(np.mean(window_losses))
            if not math.isfinite(final_val):
                stop_reason = stop_reason or "nonfinite"
                final_val, window_losses = math.inf, []
            else:
                self.best_val = min(self.best_val, final_val)
                self.last_metrics["val_loss"] = final_val
                if self.reporter is not None:
                    self.reporter(self.step, {"val_loss": final_val}, [])
        recent = self.losses[-10:]
        se = paired_gap(window_losses, base_w.tolist())[1] if math.isfinite(final_val) else math.nan
        return TrialResult(
            initial_loss=self.initial_val,
            final_loss=final_val,
            best_loss=self.best_val,
            final_train_loss=float(np.mean(recent)) if recent else math.nan,
            steps_run=self.steps_run,
            outcome=trial_class(final_val, self.initial_val, eval_base, stop_reason, se=se),
            baseline_loss=tr.data.baseline,
            stop_reason=stop_reason,
            first_event=self.first_stop,
            events=self.events,
            wall_time=time.perf_counter() - self.t_start,
            throughput=self.throughput(),
            throughput_unit=tr.data.unit,
            device=torch.cuda.get_device_name(tr.device) if tr.device.type == "cuda" else "cpu",
            num_params=tr.num_params,
            final_metrics=self.last_metrics,
            train_losses=self.losses,
            eval_baseline=eval_base,
            final_loss_se=se,
            window_losses=window_losses,
            window_baselines=base_w.tolist(),
            threads=torch.get_num_threads(),
            cpu=host_cpu(),
        )
