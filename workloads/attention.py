"""Attention blocks: standard causal self-attention and MLRA, plus the QKV projections they share.

The query/key/value projection of every attention module is a module with the output layout of a
fused ``nn.Linear(d, 3 * d)`` (``[q | k | v]``, heads contiguous inside each). That is timm's layout
too, so the projections below drop into timm's ``Attention`` and ``WindowAttention`` as their
``qkv`` without touching timm's code. Each one can tell its effective ``[3d, d]`` weight, which is
what the probes read for ``W_q`` and ``W_k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workloads.probes import AttentionStats


def effective_weight(module: nn.Module) -> Tensor:
    """The ``[out, in]`` matrix a projection applies (after reparametrisation / factorisation)."""
    fn = getattr(module, "effective_weight", None)
    return fn() if fn is not None else module.weight


def split_qk(qkv: nn.Module) -> tuple[Tensor, Tensor]:
    """``(W_q, W_k)`` of a fused qkv projection, each ``[attn_dim, in]``."""
    w = effective_weight(qkv)
    d = w.shape[0] // 3
    return w[:d], w[d:2 * d]


def qk_rank(qkv: nn.Module, num_heads: int) -> int:
    """The rank of the factorisation of ``W_q[h]^T W_k[h]`` for a qkv projection: ``d_h`` for a
    dense one, ``min(r, d_h)`` for MLRA's :class:`LowRankQKV` (the floor of SEC is ``1/rank``, see
    :func:`workloads.probes.normalized_concentration`). Read from the modules, not the weights."""
    inner = qkv.qkv if isinstance(qkv, QKNormQKV) else qkv
    if isinstance(inner, LowRankQKV):
        return min(inner.rank, inner.head_dim)
    out = getattr(inner, "out_features", None) or inner.weight.shape[0]
    return out // 3 // num_heads


class LowRankQKV(nn.Module):
    """Multi-head low-rank Q/K/V projection (the projection of MLRA).

    Each head h of each of q, k, v projects through a rank-``r`` bottleneck:
        q_h = (x A_q) B_{q,h},   A_q in R^{d x (H r)} split per head, B_{q,h} in R^{r x d_h}
    so ``W_q[h] = A_{q,h} B_{q,h}`` has rank <= r. At initialisation the product of two
    N(0, sigma^2) factors has variance d r sigma^4 instead of d sigma^2 per output, which is the
    paper's argument for lower token-embedding variability (Chung et al. 2024, Sec. 3.2).
    """

    def __init__(self, dim: int, num_heads: int, rank: int, bias: bool = False, init_std: float = 0.02):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        if rank < 1:
            raise ValueError(f"mlra rank must be >= 1, got {rank}")
        self.dim, self.num_heads, self.rank = dim, num_heads, rank
        self.head_dim = dim // num_heads
        self.down = nn.Linear(dim, 3 * num_heads * rank, bias=False)
        self.up = nn.Parameter(torch.empty(3 * num_heads, rank, self.head_dim))
        self.up.matrix_batch_dims = 1  # 3H separate r x d_h matrices (read by WeylAdamW)
        self.bias = nn.Parameter(torch.zeros(3 * dim)) if bias else None
        # Both factors start at the model's init std, so the composed weight starts much smaller
        # than a dense projection would (the effect the paper relies on).
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.normal_(self.up, std=init_std)

    def forward(self, x: Tensor) -> Tensor:
        z = self.down(x)  # [..., 3 H r]
        z = z.unflatten(-1, (3 * self.num_heads, self.rank))
        y = torch.einsum("...gr,grd->...gd", z, self.up).flatten(-2)  # [..., 3 H d_h] = [..., 3 d]
        return y + self.bias if self.bias is not None else y

    def effective_weight(self) -> Tensor:
        a = effective_weight(self.down).reshape(3 * self.num_heads, self.rank, self.dim)
        return torch.einsum("grn,grd->gdn", a, self.up).reshape(3 * self.dim, self.dim)

    @staticmethod
    def dense_param_count(dim: int, bias: bool = False) -> int:
        return 3 * dim * dim + (3 * dim if bias else 0)


class QKNormQKV(nn.Module):
    """Wraps a fused qkv projection and LayerNorms the queries and keys of every head.

    QK-layernorm (Dehghani et al. 2023; Wortsman et al. 2023) for attention modules that have no
    ``q_norm`` / ``k_norm`` of their own (timm's Swin ``WindowAttention``).
    """

    def __init__(self, qkv: nn.Module, num_heads: int, head_dim: int):
        super().__init__()
        self.qkv, self.num_heads, self.head_dim = qkv, num_heads, head_dim
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = y.unbind(-3)
        return torch.stack((self.q_norm(q), self.k_norm(k), v), dim=-3).flatten(-3)

    def effective_weight(self) -> Tensor:
        return effective_weight(self.qkv)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, nanoGPT-style, with optional QK-layernorm.

        A_h = softmax(q_h k_h^T / sqrt(d_h) + M_causal),   y = concat_h(A_h v_h) W_o

    Every step uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels), probe
    steps too, so a probe step trains exactly like any other. While ``self.stats`` is set (probe
    steps only) the detached queries and keys also go to :meth:`AttentionStats.add_qk`, which
    measures entropy per head and max logit on a subset of the batch, in chunks.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = False, qk_norm: bool = False,
                 dropout: float = 0.0, qkv: nn.Module | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} not divisible by heads {num_heads}")
        self.num_heads, self.head_dim, self.dropout = num_heads, dim // num_heads, dropout
        self.qkv = qkv if qkv is not None else nn.Linear(dim, 3 * dim, bias=bias)
        self.q_norm = nn.LayerNorm(self.head_dim, bias=bias) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, bias=bias) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.stats: AttentionStats | None = None

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        # [B, T, H, D] views; QK-norm runs on them, over contiguous rows, before the transpose
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        if self.stats is not None:  # a side computation on detached q, k: y is as on any step
            self.stats.add_qk(q, k, self.head_dim ** -0.5, causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def qk_weights(self) -> tuple[Tensor, Tensor]:
        return split_qk(self.qkv)


class MLRA(CausalSelfAttention):
    """Multi-head low-rank attention (Chung et al. 2024, "Stable Language Model Pre-training by
    Reducing Embedding Variability", Sec. 3): causal self-attention whose Q, K and V projections are
    factorised per head through a rank-``rank`` bottleneck (:class:`LowRankQKV`). A drop-in for
    :class:`CausalSelfAttention`; the output projection stays dense.
    """

    def __init__(self, dim: int, num_heads: int, rank: int | None = None, bias: bool = False,
                 qk_norm: bool = False, dropout: float = 0.0, init_std: float = 0.02):
        rank = rank or max(1, (dim // num_heads) // 2)
        super().__init__(dim, num_heads, bias=bias, qk_norm=qk_norm, dropout=dropout,
                         qkv=LowRankQKV(dim, num_heads, rank, bias=bias, init_std=init_std))
        self.rank = rank
