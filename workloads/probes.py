"""Stability probes: the quantities that move before a Transformer crashes.

All functions are pure (no module state) and run under ``torch.no_grad`` semantics: callers pass
detached tensors. They are computed every ``probe_interval`` steps only; see ``workloads.trial``.

* ``attention_entropy``: Shannon entropy of attention rows (Zhai et al. 2023, "entropy collapse").
* ``spectral_concentration``: the share of spectral energy of ``W_q[h]^T W_k[h]`` in its top
  direction, the SEC index of Qi et al. (ICLR 2025) with s = 1.
* ``token_embedding_variability``: TEV of Chung et al. (2024), Sec. 3.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def attention_entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of each attention row, averaged over batch and query rows.

    ``probs``: ``[batch, heads, q, k]``; rows sum to 1 and masked entries are exactly 0
    (``0 * log 0`` is taken as 0). Returns ``[heads]``.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [batch, heads, q, k], got shape {tuple(probs.shape)}")
    p = probs.float()
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), 0.0)
    return -plogp.sum(-1).mean(dim=(0, 2))


@torch.no_grad()
def head_singular_values(w_q: Tensor, w_k: Tensor, num_heads: int) -> Tensor:
    """Singular values of ``W_q[h]^T W_k[h]`` for every head, ``[heads, head_dim]`` descending.

    ``w_q``, ``w_k``: ``[out, in]`` (``nn.Linear`` layout), ``out = heads * head_dim``. The
    ``[in, in]`` product has rank <= head_dim, so instead of an SVD of it we use thin QR of the
    factors: ``A^T B = Q_a (R_a R_b^T) Q_b^T`` has the singular values of the small
    ``R_a R_b^T`` (head_dim x head_dim).
    """
    out, d_in = w_q.shape
    if w_k.shape != w_q.shape:
        raise ValueError(f"w_q {tuple(w_q.shape)} and w_k {tuple(w_k.shape)} differ in shape")
    if out % num_heads:
        raise ValueError(f"out features {out} not divisible by num_heads {num_heads}")
    hd = out // num_heads
    a = w_q.double().reshape(num_heads, hd, d_in).transpose(1, 2)  # [h, in, hd] = W_q[h]^T
    b = w_k.double().reshape(num_heads, hd, d_in).transpose(1, 2)
    if hd <= d_in:
        _, r_a = torch.linalg.qr(a)  # [h, hd, hd]
        _, r_b = torch.linalg.qr(b)
        core = r_a @ r_b.transpose(1, 2)
    else:  # degenerate (head_dim > in): fall back to the full product
        core = a @ b.transpose(1, 2)
    return torch.linalg.svdvals(core).float()


@torch.no_grad()
def spectral_concentration(w_q: Tensor, w_k: Tensor, num_heads: int) -> Tensor:
    """``s[0]**2 / sum(s**2)`` of ``W_q[h]^T W_k[h]`` per head, in (0, 1]. Returns ``[heads]``."""
    return concentration(head_singular_values(w_q, w_k, num_heads))


def concentration(s: Tensor) -> Tensor:
    """``s[..., 0]**2 / sum(s**2)`` for singular values ``s`` sorted descending along the last dim."""
    s2 = s.double() ** 2
    return (s2[..., 0] / s2.sum(-1).clamp_min(1e-300)).float()


@torch.no_grad()
def token_embedding_variability(weight: Tensor) -> tuple[float, float]:
    """TEV: std of each embedding row (over the hidden dimension), then mean and std over vocab."""
    per_token = weight.float().std(dim=1)
    return float(per_token.mean()), float(per_token.std())


@torch.no_grad()
def grad_norms(named_groups: Iterable[tuple[str, Iterable[nn.Parameter]]]) -> dict[str, float]:
    """L2 norm of the gradients of each named group of parameters."""
    out = {}
    for name, params in named_groups:
        sq = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
        out[name] = math.sqrt(float(torch.stack(sq).sum())) if sq else 0.0
    return out


@torch.no_grad()
def param_norm(params: Iterable[nn.Parameter]) -> float:
    sq = [p.detach().float().pow(2).sum() for p in params]
    return math.sqrt(float(torch.stack(sq).sum())) if sq else 0.0


class AttentionStats:
    """Accumulates per-layer attention statistics captured during one probe forward pass.

    Attention modules call :meth:`add` with their probabilities and pre-softmax logits while a
    capture is active; each call reduces the tensors to a few scalars at once, so no attention
    map outlives the layer that made it. Masked logits must be ``-inf`` (or very negative) so that
    the max logit is over allowed positions only; pass ``logit_mask`` where they are not.
    """

    def __init__(self) -> None:
        self.layers: list[dict[str, float]] = []

    @torch.no_grad()
    def add(self, probs: Tensor, logits: Tensor | None = None) -> None:
        ent = attention_entropy(probs)
        rec = {"entropy_min": float(ent.min()), "entropy_mean": float(ent.mean())}
        if logits is not None:
            finite = logits.float()
            finite = torch.where(torch.isfinite(finite), finite, float("-inf"))
            # logits of allowed positions only: masked entries have probability exactly 0
            finite = torch.where(probs > 0, finite, float("-inf"))
            rec["max_logit"] = float(finite.max())
        self.layers.append(rec)
