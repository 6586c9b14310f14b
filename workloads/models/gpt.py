"""A nanoGPT-style decoder-only Transformer (Radford et al. 2019; karpathy/nanoGPT's model.py).

Pre-LayerNorm blocks, for l = 1..L:
    x = x + Attn(LN_1(x))          (causal multi-head self-attention, or MLRA)
    x = x + MLP(LN_2(x))           (GELU, 4x width)
logits = LN_f(x) W_e^T               (output head tied to the token embedding W_e)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workloads.attention import MLRA, CausalSelfAttention, qk_rank
from workloads.probes import PROBE_BATCH, AttentionStats


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 128
    depth: int = 4
    width: int = 128
    heads: int = 4
    bias: bool = False
    dropout: float = 0.0
    qk_norm: bool = False
    attention: str = "standard"  # or "mlra"
    mlra_rank: int | None = None


class MLP(nn.Module):
    def __init__(self, width: int, bias: bool, dropout: float):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width, bias=bias)
        self.proj = nn.Linear(4 * width, width, bias=bias)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, bias=cfg.bias)
        if cfg.attention == "mlra":
            self.attn = MLRA(cfg.width, cfg.heads, rank=cfg.mlra_rank, bias=cfg.bias,
                             qk_norm=cfg.qk_norm, dropout=cfg.dropout)
        elif cfg.attention == "standard":
            self.attn = CausalSelfAttention(cfg.width, cfg.heads, bias=cfg.bias,
                                            qk_norm=cfg.qk_norm, dropout=cfg.dropout)
        else:
            raise ValueError(f"attention: unknown {cfg.attention!r}; allowed: ['standard', 'mlra']")
        self.ln_2 = nn.LayerNorm(cfg.width, bias=cfg.bias)
        self.mlp = MLP(cfg.width, cfg.bias, cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.depth))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of length {T} > seq_len {self.cfg.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    # ---- probe interface (see workloads.models) ----
    def transformer_blocks(self) -> nn.ModuleList:
        return self.blocks

    def layers(self) -> list[nn.Module]:
        return list(self.blocks)

    def qk_weights(self) -> list[tuple[Tensor, Tensor, int]]:
        return [(*b.attn.qk_weights(), b.attn.num_heads) for b in self.blocks]

    def qk_ranks(self) -> list[int]:
        return [qk_rank(b.attn.qkv, b.attn.num_heads) for b in self.blocks]

    def token_embedding(self) -> Tensor | None:
        return self.wte.weight

    @contextlib.contextmanager
    def capture_attention(self, batch: int | None = PROBE_BATCH):
        """Yields an :class:`AttentionStats` that every forward inside fills, one record per block,
        from the first ``batch`` sequences (``None``: all), in chunks of query rows; the forward
        itself is unchanged (see :class:`AttentionStats` for the subset and the chunking)."""
        stats = AttentionStats(batch)
        for b in self.blocks:
            b.attn.stats = stats
        try:
            yield stats
        finally:
            for b in self.blocks:
                b.attn.stats = None
