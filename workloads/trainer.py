"""The trainer of one trial: building (device, model, optimizer, the learning-rate schedule, the data),
evaluation, the probe metrics and the training step (``Trainer``). The loop that runs the steps, reads
the losses and stops a run is ``workloads.loop``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workloads import data as data_mod
from workloads import matrices
from workloads import probes
from workloads import stabilizers as stab
from workloads.config import ConfigError, TrialConfig
from workloads.models import GPT, GPTConfig, build_swin, build_vit
from workloads.stabilizers.weyl import matrix_shape


# ------------------------------------------------------------------------------------ building
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for but torch sees no CUDA device")
    return torch.device(name)


@functools.cache
def host_cpu() -> str:
    """This machine's CPU model (``/proc/cpuinfo``'s model name, else ``platform.processor()``)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def trial_device(cfg: TrialConfig) -> torch.device:
    """Where the trial trains: ``cfg.device`` resolved, and bf16 autocast only on CUDA (``ConfigError``
    otherwise). The trainer's check, which the command line makes before it starts the trial."""
    device = resolve_device(cfg.device)
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ConfigError("precision: 'bf16' autocast needs a CUDA device; use 'fp32' on CPU")
    return device


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


class TrialData:
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
        self.marginal_cost = torch.as_tensor(nll, dtype=torch.float32, device=device)
        """-log p(target) under the training split's marginal, per target id: ``marginal_cost[y].mean()``
        is the baseline of a training batch, the loss a model ignoring its inputs gets on it."""


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


# ----------------------------------------------------------------------------------- evaluation
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


# ------------------------------------------------------------------------------------- the step
class Trainer:
    """The model, optimizer and data of one trial, and its training step (also used by benchmarks)."""

    def __init__(self, cfg: TrialConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = device = trial_device(cfg)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.data = TrialData(cfg, device)
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
        loss stays on the device until the loop reads a block of them at once (``workloads.loop``),
        and the update is applied whatever the loss (a non-finite loss gives non-finite gradients;
        the loop stops the run at its next read). With ``probe`` the attention statistics, gradient and
        weight probes come back as metrics (read to the host: probe steps synchronise), with
        ``loss_baseline``, the marginal baseline of the very batch whose loss ``loss`` is (its targets'
        cost under the training split's marginal): what that loss has gained over knowing nothing
        is ``loss_baseline - loss``, free of which windows the batch drew."""
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
            on_device.update(weight_probes(model), loss=loss, loss_baseline=self.data.marginal_cost[y].mean())
            metrics.update(probes.read(on_device), lr=lr)
            metrics.update(attention_metrics(stats))
            if isinstance(opt, stab.WeylAdamW):
                metrics.update(opt.last_stats)
                metrics["weyl/fire_rate_cum"] = opt.fired_total / max(1, opt.matrix_steps_total)
        return loss, metrics, stats
