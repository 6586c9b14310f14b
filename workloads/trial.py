"""One training trial: a model, a stabilizer set, a learning-rate schedule, probes and a divergence
detector. Pure PyTorch: no Ray, no MLflow. Run it from Python (``run(TrialConfig(...))``), from the
command line (``python -m workloads.trial --help``) or under any scheduler.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workloads import data as data_mod
from workloads import matrices
from workloads import probes
from workloads import stabilizers as stab
from workloads.divergence import DivergenceConfig, DivergenceDetector, DivergenceEvent
from workloads.models import WORKLOADS, GPT, GPTConfig, build_swin, build_vit
from workloads.outcome import paired_gap, trial_class
from workloads.stabilizers.weyl import matrix_shape

SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")
DEFAULT_DATA = {"gpt": "stdlib", "vit": "digits", "swin": "digits"}

_DIVERGENCE = DivergenceConfig()  # the divergence defaults, defined once (workloads.divergence)

Reporter = Callable[[int, dict[str, float], list[DivergenceEvent]], None]


class ConfigError(ValueError):
    """A TrialConfig field has a value outside what is allowed."""


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs. Validated on construction (``ConfigError`` names the field)."""

    workload: str = "gpt"
    depth: int = 4
    width: int = 128
    heads: int = 4
    seq_len: int = 128
    img_size: int = 32
    patch_size: int = 4
    window_size: int = 4
    mlp_ratio: float = 4.0
    bias: bool = False
    dropout: float = 0.0
    batch_size: int = 16
    steps: int = 300
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 0.0
    """Global gradient-norm clip; 0 = off (the default, so that instabilities are not masked)."""
    stabilizers: tuple[str, ...] = ()
    stabilizer_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""
    compile: bool = False
    """Run the model's loss (forward and backward, stabilizers included) under ``torch.compile``;
    probe steps stay eager (their capture hooks)."""
    probe_interval: int = 25
    sync_interval: int = 25
    """Steps between reads of the training loss to the host, where the divergence detector checks
    them (probe, evaluation and last steps read too). Steps in between make no host-device
    synchronisation; a stop takes effect at the read after its step. 1 reads every step."""
    eval_interval: int = 100
    eval_batches: int = 4
    max_loss_ratio: float = _DIVERGENCE.max_loss_ratio
    spike_ratio: float = _DIVERGENCE.spike_ratio
    entropy_collapse: float = _DIVERGENCE.entropy_collapse
    stop_grace: float = _DIVERGENCE.stop_grace
    stop_window: int = _DIVERGENCE.stop_window
    stop_margin: float = _DIVERGENCE.stop_margin
    stop_on: tuple[str, ...] = _DIVERGENCE.stop_on
    data: str = "auto"
    data_path: str | None = None
    vocab_size: int | None = None
    """Only for ``data: bin`` (token shards); byte-level text uses 256."""

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if isinstance(self.stabilizers, str):
            set_("stabilizers", tuple(n for n in self.stabilizers.replace(",", "+").split("+") if n))
        set_("stabilizers", tuple(self.stabilizers))
        set_("stop_on", tuple(self.stop_on))
        if self.workload not in WORKLOADS:
            raise ConfigError(f"workload: {self.workload!r} is not one of {list(WORKLOADS)}")
        if self.data == "auto":
            set_("data", DEFAULT_DATA[self.workload])
        allowed_data = data_mod.TEXT_SOURCES if self.workload == "gpt" else data_mod.IMAGE_SOURCES
        if self.data not in allowed_data:
            raise ConfigError(f"data: {self.data!r} is not a source for {self.workload}; allowed: {list(allowed_data)}")
        for name in ("depth", "width", "heads", "seq_len", "img_size", "patch_size", "window_size",
                     "batch_size", "steps", "probe_interval", "sync_interval", "eval_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: {v!r} must be an integer >= 1")
        for name in ("warmup_steps", "eval_interval", "threads", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}: {v!r} must be an integer >= 0")
        if self.width % self.heads:
            raise ConfigError(f"width: {self.width} must be divisible by heads ({self.heads})")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr: {self.lr!r} must be a finite number > 0")
        for name in ("weight_decay", "grad_clip", "dropout", "min_lr_ratio", "eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: {getattr(self, name)!r} must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1/beta2: ({self.beta1}, {self.beta2}) must be in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: {self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: {self.precision!r} is not one of {list(PRECISIONS)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: {self.device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
        try:
            self.divergence()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.workload == "swin" and self.depth < 2:
            raise ConfigError(f"depth: swin needs >= 2 (two stages), got {self.depth}")
        if self.workload != "gpt" and self.img_size % self.patch_size:
            raise ConfigError(f"img_size: {self.img_size} must be divisible by patch_size {self.patch_size}")
        try:
            stab.resolve(self.stabilizers, self.stabilizer_options)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def divergence(self) -> DivergenceConfig:
        return DivergenceConfig(max_loss_ratio=self.max_loss_ratio, spike_ratio=self.spike_ratio,
                                entropy_collapse=self.entropy_collapse, stop_grace=self.stop_grace,
                                stop_window=self.stop_window, stop_margin=self.stop_margin,
                                stop_on=self.stop_on)

    @property
    def stabilizer_label(self) -> str:
        return stab.label(self.stabilizers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stabilizers"] = list(self.stabilizers)
        d["stop_on"] = list(self.stop_on)
        d["stabilizer_options"] = {k: dict(v) for k, v in self.stabilizer_options.items()}
        return d

    def replace(self, **changes: Any) -> TrialConfig:
        return dataclasses.replace(self, **changes)


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
    against ``eval_baseline`` with a margin of 2 ``final_loss_se``; ``degraded`` and the tenth-of-the-
    best margin of ``collapsed`` are decided against the other runs, ``workloads.outcome.classify``)."""
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

    @property
    def diverged(self) -> bool:
        return self.outcome == "diverged"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["first_event"] = self.first_event.to_dict() if self.first_event else None
        d["events"] = [e.to_dict() for e in self.events]
        d["diverged"] = self.diverged
        return d


# ------------------------------------------------------------------------------------ building
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for but torch sees no CUDA device")
    return torch.device(name)


def build_model(cfg: TrialConfig, num_classes: int = 10, in_chans: int = 3, vocab_size: int = 256) -> nn.Module:
    active = stab.resolve(cfg.stabilizers, cfg.stabilizer_options)
    opts: dict[str, Any] = {}
    for s in active:
        if s.model_options:
            opts.update({k: v for k, v in s.model_options(cfg.stabilizer_options.get(s.name, {})).items()})
    if cfg.workload == "gpt":
        model = GPT(GPTConfig(vocab_size=vocab_size, seq_len=cfg.seq_len, depth=cfg.depth, width=cfg.width,
                              heads=cfg.heads, bias=cfg.bias, dropout=cfg.dropout, **opts))
    else:
        common = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=in_chans,
                      num_classes=num_classes, depth=cfg.depth, width=cfg.width, heads=cfg.heads,
                      mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, **opts)
        model = build_vit(**common) if cfg.workload == "vit" else build_swin(window_size=cfg.window_size, **common)
    for s in active:
        if s.transform:
            model = s.transform(model, cfg.stabilizer_options.get(s.name, {}))
    return model


def build_optimizer(cfg: TrialConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (or WeylAdamW) with weight decay on the matrices only: the rule of
    :mod:`workloads.matrices` (marked on the model here), which Weyl bounds by too. Embeddings,
    position bias tables, class tokens, norms, biases and sigmaReparam's gamma are not decayed."""
    matrices.mark(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if matrix_shape(p) is not None], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if matrix_shape(p) is None], "weight_decay": 0.0},
    ]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if "weyl" in cfg.stabilizers:
        return stab.WeylAdamW(groups, **kw, **dict(cfg.stabilizer_options.get("weyl", {})))
    return torch.optim.AdamW(groups, **kw, fused=device.type == "cuda")


def lr_at(cfg: TrialConfig, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then constant / cosine / linear decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * t))
    return cfg.lr - (cfg.lr - floor) * t


class _Data:
    """Training and fixed validation batches for the workload."""

    def __init__(self, cfg: TrialConfig, device: torch.device):
        if cfg.workload == "gpt":
            td = data_mod.load_text(cfg.data, cfg.data_path, cfg.vocab_size)
            self.vocab_size, self.num_classes, self.in_chans = td.vocab_size, 0, 0
            self.baseline = data_mod.text_baseline(td)
            nll = data_mod.text_marginal_nll(td)
            self.train = data_mod.TokenBatches(td.train, cfg.batch_size, cfg.seq_len, cfg.seed, device)
            val = data_mod.TokenBatches(td.val, cfg.batch_size, cfg.seq_len, 10_000 + cfg.seed, device)
            self.items_per_batch, self.unit = cfg.batch_size * cfg.seq_len, "tokens/s"
        else:
            im = data_mod.load_images(cfg.data, cfg.img_size, cfg.data_path)
            self.vocab_size, self.num_classes, self.in_chans = 0, im.num_classes, im.in_chans
            self.baseline = data_mod.image_baseline(im)
            nll = data_mod.image_marginal_nll(im)
            self.train = data_mod.ImageBatches(im.train_x, im.train_y, cfg.batch_size, cfg.seed, device)
            val = data_mod.ImageBatches(im.val_x, im.val_y, cfg.batch_size, 10_000 + cfg.seed, device)
            self.items_per_batch, self.unit = cfg.batch_size, "images/s"
        self.val_batches = [val.next() for _ in range(cfg.eval_batches)]
        self.window_baselines = data_mod.window_baselines(nll, self.val_batches)
        """The marginal baseline of each validation window (the batches every evaluation uses)."""


# ------------------------------------------------------------------------------------- probing
@torch.no_grad()
def weight_probes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Spectral probes of W_q/W_k per layer, TEV, parameter norm, as 0-d device tensors (read them
    with ``probes.read``, one transfer). ``spectral_conc`` is SEC (max over heads), and
    ``spectral_conc_norm`` the same normalised by its floor 1/r (``probes.normalized_concentration``,
    r from ``model.qk_ranks()``), comparable across MLRA's ranks and dense heads; a layer of rank one
    has no normalised value."""
    m: dict[str, torch.Tensor] = {}
    ranks = model.qk_ranks()
    for i, s in enumerate(probes.layer_head_singular_values(model.qk_weights())):  # batched over layers
        m[f"spectral_conc/layer{i}"] = probes.concentration(s).max()
        if ranks[i] >= 2:
            m[f"spectral_conc_norm/layer{i}"] = probes.normalized_concentration(m[f"spectral_conc/layer{i}"], ranks[i])
        m[f"qk_sigma1/layer{i}"] = s[:, 0].max()
    for name in ("spectral_conc", "spectral_conc_norm", "qk_sigma1"):
        layers = [v for k, v in m.items() if k.startswith(f"{name}/layer")]
        if layers:
            m[f"{name}/max"] = torch.stack(layers).max()
    emb = model.token_embedding()
    if emb is not None:
        m["tev/mean"], m["tev/std"] = probes.token_embedding_variability_t(emb.detach()).unbind()
    m["param_norm"] = probes.param_norm(model.parameters())
    return m


def attention_metrics(stats: probes.AttentionStats) -> dict[str, float]:
    m: dict[str, float] = {}
    for i, rec in enumerate(stats.layers):
        m[f"attn_entropy_min/layer{i}"] = rec["entropy_min"]
        m[f"attn_entropy_mean/layer{i}"] = rec["entropy_mean"]
        if "max_logit" in rec:
            m[f"max_logit/layer{i}"] = rec["max_logit"]
    if stats.layers:
        m["attn_entropy/min"] = min(r["entropy_min"] for r in stats.layers)
        m["attn_entropy/mean"] = float(np.mean([r["entropy_mean"] for r in stats.layers]))
        logits = [r["max_logit"] for r in stats.layers if "max_logit" in r]
        if logits:
            m["max_logit"] = max(logits)
    return m


@torch.no_grad()
def evaluate(model: nn.Module, batches, autocast) -> float:
    was = model.training
    model.eval()
    with autocast():
        losses = [float(model.loss(x, y)) for x, y in batches]
    model.train(was)
    return float(np.mean(losses))


@torch.no_grad()
def evaluate_windows(model: nn.Module, batches, autocast) -> np.ndarray:
    """The validation loss of each item of ``batches`` (a text window: the mean cross-entropy of
    its targets; an image: its cross-entropy), in batch order; their mean is :func:`evaluate`'s
    loss (equal-sized batches). One host read per batch, as :func:`evaluate`."""
    was = model.training
    model.eval()
    out = []
    with autocast():
        for x, y in batches:
            logits = model(x).float()
            ce = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none")
            out.append(ce.view(y.shape[0], -1).mean(dim=1).double().cpu().numpy())
    model.train(was)
    return np.concatenate(out)


# ------------------------------------------------------------------------------------- the loop
class Trainer:
    """The model, optimizer and data of one trial, and its training step (also used by benchmarks)."""

    def __init__(self, cfg: TrialConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = device = resolve_device(cfg.device)
        if cfg.precision == "bf16" and device.type != "cuda":
            raise ConfigError("precision: 'bf16' autocast needs a CUDA device; use 'fp32' on CPU")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.data = _Data(cfg, device)
        torch.manual_seed(cfg.seed)  # the init does not depend on how data loading used the RNG
        self.model = build_model(cfg, num_classes=self.data.num_classes or 10, in_chans=self.data.in_chans or 3,
                                 vocab_size=self.data.vocab_size or 256).to(device)
        self.model.train()
        self.opt = build_optimizer(cfg, self.model, device)
        self.loss_fn = torch.compile(self.model.loss) if cfg.compile else self.model.loss
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.layer_params = [(f"grad_norm/layer{i}", list(layer.parameters()))
                             for i, layer in enumerate(self.model.layers())]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def evaluate(self) -> float:
        return evaluate(self.model, self.data.val_batches, self.autocast)

    def evaluate_windows(self) -> np.ndarray:
        return evaluate_windows(self.model, self.data.val_batches, self.autocast)

    def step(self, step: int, probe: bool) -> tuple[torch.Tensor, dict[str, float], probes.AttentionStats | None]:
        """One optimizer step at ``lr_at(step)``; returns the training loss as a detached 0-d tensor
        on the device, the probe metrics and the attention statistics.

        A non-probe step makes no host-device synchronisation (``tests/test_launch_count.py``): the
        loss stays on the device until the loop reads a block of them at once (``run``), and the
        update is applied whatever the loss (a non-finite loss gives non-finite gradients; the loop
        stops the run at its next read). With ``probe`` the attention statistics, gradient and
        weight probes come back as metrics (read to the host: probe steps synchronise)."""
        cfg, model, opt = self.cfg, self.model, self.opt
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = self.data.train.next()
        stats = None
        if probe:
            with model.capture_attention() as stats, self.autocast():
                loss = model.loss(x, y)
        else:
            with self.autocast():
                loss = self.loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        on_device: dict[str, torch.Tensor] = {}  # probe values, read to the host together
        if cfg.grad_clip > 0:
            on_device["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        elif probe:
            on_device["grad_norm"] = probes.grad_norms([("all", model.parameters())])["all"]
        if probe:
            on_device.update(probes.grad_norms(self.layer_params))
        opt.step()
        loss = loss.detach()
        metrics: dict[str, float] = {}
        if probe:
            on_device.update(weight_probes(model), loss=loss)
            metrics.update(probes.read(on_device), lr=lr)
            metrics.update(attention_metrics(stats))
            if isinstance(opt, stab.WeylAdamW):
                metrics.update(opt.last_stats)
                metrics["weyl/fire_rate_cum"] = opt.fired_total / max(1, opt.matrix_steps_total)
        return loss, metrics, stats


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
    cfg = config
    t_start = time.perf_counter()
    tr = Trainer(cfg)
    initial_val = tr.evaluate()
    detector = DivergenceDetector(cfg.divergence(), initial_loss=initial_val, total_steps=cfg.steps)
    events: list[DivergenceEvent] = []
    first_stop: DivergenceEvent | None = None
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses of the steps since the last read, on the device
    last_metrics: dict[str, float] = {}
    best_val = math.inf
    train_time = 0.0  # training steps, probes and loss reads; evaluation excluded
    step = steps_run = 0

    def report(at: int, metrics: dict[str, float], step_events: list[DivergenceEvent], loss: float) -> None:
        metrics.setdefault("loss", loss)
        metrics.setdefault("lr", lr_at(cfg, at))
        metrics["throughput"] = steps_run * tr.data.items_per_batch / max(train_time, 1e-9)
        last_metrics.update(metrics)
        if reporter is not None:
            reporter(at, metrics, step_events)

    for step in range(cfg.steps):
        t0 = time.perf_counter()
        is_probe = step % cfg.probe_interval == 0 or step == cfg.steps - 1
        is_eval = bool(cfg.eval_interval) and 0 < step < cfg.steps - 1 and step % cfg.eval_interval == 0
        loss, metrics, stats = tr.step(step, is_probe)
        pending.append(loss)
        steps_run = step + 1
        if not (is_probe or is_eval or step % cfg.sync_interval == 0):
            train_time += time.perf_counter() - t0
            continue
        values = torch.stack(pending).tolist()  # the one host read of this block
        pending.clear()
        train_time += time.perf_counter() - t0
        losses.extend(values)
        for at, value in enumerate(values, start=step - len(values) + 1):
            step_events = detector.observe_loss(at, value)
            if at == step and stats is not None:
                step_events += detector.observe_entropy(at, [r["entropy_min"] for r in stats.layers])
            events += step_events
            stopping = [e for e in step_events if detector.is_stop(e)]
            if stopping:
                first_stop = stopping[0]
            if at < step and step_events:
                report(at, {}, step_events, value)
            elif at == step:
                if step == 0:
                    metrics["val_loss"] = initial_val
                elif is_eval and not stopping:
                    metrics["val_loss"] = tr.evaluate()
                    best_val = min(best_val, metrics["val_loss"])
                if metrics or step_events:
                    report(at, metrics, step_events, value)
            if first_stop is not None:
                break
        if first_stop is not None:
            break

    stop_reason = first_stop.kind if first_stop is not None else None
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
            best_val = min(best_val, final_val)
            last_metrics["val_loss"] = final_val
            if reporter is not None:
                reporter(step, {"val_loss": final_val}, [])
    recent = losses[-10:]
    se = paired_gap(window_losses, base_w.tolist())[1] if math.isfinite(final_val) else math.nan
    return TrialResult(
        initial_loss=initial_val,
        final_loss=final_val,
        best_loss=best_val,
        final_train_loss=float(np.mean(recent)) if recent else math.nan,
        steps_run=steps_run,
        outcome=trial_class(final_val, initial_val, eval_base, stop_reason, se=se),
        baseline_loss=tr.data.baseline,
        stop_reason=stop_reason,
        first_event=first_stop,
        events=events,
        wall_time=time.perf_counter() - t_start,
        throughput=steps_run * tr.data.items_per_batch / max(train_time, 1e-9),
        throughput_unit=tr.data.unit,
        device=torch.cuda.get_device_name(tr.device) if tr.device.type == "cuda" else "cpu",
        num_params=tr.num_params,
        final_metrics=last_metrics,
        train_losses=losses,
        eval_baseline=eval_base,
        final_loss_se=se,
        window_losses=window_losses,
        window_baselines=base_w.tolist(),
    )


# ---------------------------------------------------------------------------------------- CLI
_HELP = {
    "workload": "model: a nanoGPT-style decoder (text) or timm's ViT / Swin (images)",
    "depth": "Transformer blocks (Swin: blocks over its stages, >= 2)",
    "width": "embedding width (divisible by --heads)",
    "heads": "attention heads",
    "seq_len": "tokens per sequence (gpt)",
    "img_size": "image side in pixels after resizing (vit, swin)",
    "patch_size": "patch side in pixels (vit, swin; divides --img-size)",
    "window_size": "attention window in patches (swin)",
    "mlp_ratio": "MLP hidden width / width (vit, swin)",
    "bias": "biases in the linear layers (gpt)",
    "dropout": "dropout probability",
    "batch_size": "sequences or images per step",
    "steps": "optimizer steps",
    "lr": "peak learning rate",
    "warmup_steps": "linear warmup steps (0: none)",
    "schedule": "decay after warmup",
    "min_lr_ratio": "cosine / linear decay ends at this x --lr",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "eps": "AdamW epsilon",
    "grad_clip": "global gradient-norm clip; 0 = off, so that instabilities are not masked",
    "stabilizers": "stabilizers, '+'-separated: none, weyl, sigma_reparam, mlra, qk_norm",
    "stabilizer_options": "per-stabilizer options as JSON",
    "seed": "seed of the initialisation and the batches",
    "device": "where to train: auto (CUDA if torch sees one), cpu, cuda, cuda:N",
    "precision": "fp32, or bf16 autocast (CUDA only)",
    "threads": "torch intra-op threads; 0 leaves torch's default",
    "compile": "run the loss (forward and backward) under torch.compile on non-probe steps",
    "probe_interval": "steps between stability probes (attention entropy, spectra, gradient norms)",
    "sync_interval": "steps between host reads of the training loss (the divergence detector's checks); "
                     "steps in between never synchronise with the GPU; 1 = every step",
    "eval_interval": "steps between validation losses (0: first and last only)",
    "eval_batches": "batches per validation loss",
    "max_loss_ratio": "event loss_ratio: loss above this x the initial loss (recorded)",
    "spike_ratio": "event loss_spike: loss above this x its moving average (recorded)",
    "entropy_collapse": "event entropy_collapse: a layer's min attention entropy below this, nats (recorded)",
    "stop_grace": "above_initial may stop the run only after this fraction of --steps",
    "stop_window": "above_initial: median training loss over this many steps",
    "stop_margin": "above_initial: stop when that median >= this x the initial loss",
    "stop_on": "event kinds that stop the run, '+'-separated: nonfinite (default), above_initial (opt-in loss rule)",
    "data": "data source: stdlib, text, bin (gpt); digits, imagefolder, cifar10, synthetic (vit, swin); "
            "auto: stdlib for gpt, digits for images",
    "data_path": "file or folder of the data (data text, bin, imagefolder, cifar10)",
    "vocab_size": "vocabulary of --data bin token shards (default 50304); byte-level text uses 256",
}
_CHOICES = {"workload": list(WORKLOADS), "schedule": list(SCHEDULES), "precision": list(PRECISIONS),
            "data": ["auto", *data_mod.TEXT_SOURCES, *data_mod.IMAGE_SOURCES]}
FIELD_HELP, FIELD_CHOICES = _HELP, _CHOICES  # public: the spec reference (docs/spec.md) is generated from them


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m workloads.trial",
        description="Run one ablate training trial in this process (no Ray, no MLflow) and print its "
                    "result as JSON; progress goes to stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrialConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = _HELP.get(f.name, f.name.replace("_", " "))
        if f.name == "stabilizer_options":
            p.add_argument(flag, type=json.loads, default={}, metavar="JSON",
                           help=help_ + ', e.g. \'{"weyl": {"tau": 0.05}, "mlra": {"rank": 4}}\'')
        elif f.name in ("stabilizers", "stop_on"):
            p.add_argument(flag, type=lambda s: tuple(x for x in s.replace(",", "+").split("+") if x and x != "none"),
                           default=default, metavar="A+B", help=help_)
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif f.name == "device":
            p.add_argument(flag, default=default, metavar="{auto,cpu,cuda,cuda:N}", help=help_)
        else:
            typ = {int: int, float: float}.get(type(default), str)
            if f.name == "vocab_size":
                typ = int
            p.add_argument(flag, type=typ, default=default, choices=_CHOICES.get(f.name), help=help_)
    p.add_argument("--quiet", action="store_true", help="print only the final JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    quiet = args.pop("quiet")
    try:
        cfg = TrialConfig(**args)
        data_mod.check_source(cfg.data, cfg.data_path, cfg.vocab_size)
        resolve_device(cfg.device)
        if cfg.precision == "bf16" and resolve_device(cfg.device).type != "cuda":
            raise ConfigError("precision: 'bf16' autocast needs a CUDA device; use 'fp32' on CPU")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    def progress(step: int, metrics: dict[str, float], events: list[DivergenceEvent]) -> None:
        if quiet:
            return
        parts = [f"step {step:>5}"] + [f"{k} {metrics[k]:.4g}" for k in
                                       ("loss", "val_loss", "lr", "grad_norm", "attn_entropy/min",
                                        "spectral_conc/max", "max_logit") if k in metrics]
        print("  ".join(parts), file=sys.stderr)
        for e in events:
            print(f"  event: {e.kind} at step {e.step}: {e.detail}", file=sys.stderr)

    result = run(cfg, progress)
    out = result.to_dict()
    out.pop("final_metrics")
    out.pop("train_losses")
    out.pop("window_losses")
    out.pop("window_baselines")
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
