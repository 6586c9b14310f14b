"""The trial's configuration: ``TrialConfig``, a frozen dataclass validated on construction.

Each field carries its meaning (and its allowed values, where they are a fixed set) in its metadata:
one source for ``python -m workloads.trial --help`` (``workloads.cli``) and for the spec reference
``docs/spec.md`` (``orchestrator.spec_doc``), read through :func:`field_help` and :func:`field_choices`.

Imports no torch (the sources' names, the stabilizer registry and the workloads' names come from
modules that import none): a spec is validated, every trial of its grid built as a ``TrialConfig``,
without it (issue #32). ``workloads.trial`` re-exports ``TrialConfig``, its public name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workloads import sources
from workloads import stabilizers as stab
from workloads.divergence import DivergenceConfig
from workloads.models import WORKLOADS

SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")
DEFAULT_DATA = {"gpt": "stdlib", "vit": "digits", "swin": "digits"}

_DIVERGENCE = DivergenceConfig()  # the divergence defaults, defined once (workloads.divergence)


class ConfigError(ValueError):
    """A TrialConfig field has a value outside what is allowed."""


def _field(default: Any, help_: str, choices: Sequence[Any] | None = None) -> Any:
    """A TrialConfig field: its default, its help and, where the values are a fixed set, its choices."""
    metadata = {"help": help_} if choices is None else {"help": help_, "choices": list(choices)}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs. Validated on construction (``ConfigError`` names the field)."""

    workload: str = _field("gpt", "model: a nanoGPT-style decoder (text) or timm's ViT / Swin (images)", WORKLOADS)
    depth: int = _field(4, "Transformer blocks (Swin: blocks over its stages, >= 2)")
    width: int = _field(128, "embedding width (divisible by --heads)")
    heads: int = _field(4, "attention heads")
    seq_len: int = _field(128, "tokens per sequence (gpt)")
    img_size: int = _field(32, "image side in pixels after resizing (vit, swin)")
    patch_size: int = _field(4, "patch side in pixels (vit, swin; divides --img-size)")
    window_size: int = _field(4, "attention window in patches (swin)")
    mlp_ratio: float = _field(4.0, "MLP hidden width / width (vit, swin)")
    bias: bool = _field(False, "biases in the linear layers (gpt)")
    dropout: float = _field(0.0, "dropout probability")
    batch_size: int = _field(16, "sequences or images per step")
    steps: int = _field(300, "optimizer steps")
    lr: float = _field(1e-3, "peak learning rate")
    warmup_steps: int = _field(0, "linear warmup steps (0: none)")
    schedule: str = _field("cosine", "decay after warmup", SCHEDULES)
    min_lr_ratio: float = _field(0.1, "cosine / linear decay ends at this x --lr")
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    eps: float = _field(1e-8, "AdamW epsilon")
    grad_clip: float = _field(0.0, "global gradient-norm clip; 0 = off, so that instabilities are not masked")
    stabilizers: tuple[str, ...] = _field(
        (), "stabilizers, '+'-separated: none, weyl, sigma_reparam, mlra, qk_norm")
    stabilizer_options: Mapping[str, Mapping[str, Any]] = field(
        default_factory=dict, metadata={"help": "per-stabilizer options as JSON"})
    seed: int = _field(0, "seed of the initialisation and the batches")
    device: str = _field("auto", "where to train: auto (CUDA if torch sees one), cpu, cuda, cuda:N")
    precision: str = _field("fp32", "fp32, or bf16 autocast (CUDA only)", PRECISIONS)
    threads: int = _field(0, "torch intra-op threads; 0 leaves torch's default")
    compile: bool = _field(False, "run the loss (forward and backward) under torch.compile on non-probe steps")
    """The compiled loss includes the stabilizers; probe steps stay eager (their capture hooks)."""
    probe_interval: int = _field(25, "steps between stability probes (attention entropy, spectra, gradient norms)")
    sync_interval: int = _field(25, "steps between host reads of the training loss (the divergence detector's "
                                    "checks); steps in between never synchronise with the GPU; 1 = every step")
    """Probe, evaluation and last steps read too; a stop takes effect at the read after its step."""
    eval_interval: int = _field(100, "steps between validation losses (0: first and last only)")
    eval_batches: int = _field(4, "batches per validation loss")
    max_loss_ratio: float = _field(_DIVERGENCE.max_loss_ratio,
                                   "event loss_ratio: loss above this x the initial loss (recorded)")
    spike_ratio: float = _field(_DIVERGENCE.spike_ratio,
                                "event loss_spike: loss above this x its moving average (recorded)")
    entropy_collapse: float = _field(_DIVERGENCE.entropy_collapse, "event entropy_collapse: a layer's min attention "
                                                                   "entropy below this, nats (recorded)")
    stop_grace: float = _field(_DIVERGENCE.stop_grace,
                               "above_initial may stop the run only after this fraction of --steps")
    stop_window: int = _field(_DIVERGENCE.stop_window, "above_initial: median training loss over this many steps")
    stop_margin: float = _field(_DIVERGENCE.stop_margin,
                                "above_initial: stop when that median >= this x the initial loss")
    stop_on: tuple[str, ...] = _field(_DIVERGENCE.stop_on, "event kinds that stop the run, '+'-separated: nonfinite "
                                                           "(default), above_initial (opt-in loss rule)")
    data: str = _field("auto", "data source: stdlib, text, bin (gpt); digits, imagefolder, cifar10, synthetic (vit, "
                               "swin); auto: stdlib for gpt, digits for images",
                       ["auto", *sources.TEXT_SOURCES, *sources.IMAGE_SOURCES])
    data_path: str | None = _field(None, "file or folder of the data (data text, bin, imagefolder, cifar10)")
    vocab_size: int | None = _field(None, "vocabulary of --data bin token shards (default 50304); byte-level text "
                                          "uses 256")

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
        allowed_data = sources.TEXT_SOURCES if self.workload == "gpt" else sources.IMAGE_SOURCES
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
        for f in dataclasses.fields(self):  # every number: finite (YAML's .inf / .nan are floats)
            v = getattr(self, f.name)
            if str(f.type).split(" ")[0] == "float" and not (
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ConfigError(f"{f.name}: {v!r} must be a finite number")
        if not self.lr > 0:
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


def field_help() -> dict[str, str]:
    """Each TrialConfig field's meaning, one line, in field order (the ``--help`` of each option)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrialConfig) if "help" in f.metadata}


def field_choices() -> dict[str, list[Any]]:
    """The allowed values of the TrialConfig fields that have a fixed set (the others are not keys)."""
    return {f.name: list(f.metadata["choices"]) for f in dataclasses.fields(TrialConfig) if "choices" in f.metadata}
