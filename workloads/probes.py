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


def _gram_pairs(w_q: Tensor, w_k: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Per-head Gram matrices ``G_q = W_q[h] W_q[h]^T`` and ``G_k`` (float64, ``[heads, d_h, d_h]``)."""
    out, d_in = w_q.shape
    if w_k.shape != w_q.shape:
        raise ValueError(f"w_q {tuple(w_q.shape)} and w_k {tuple(w_k.shape)} differ in shape")
    if out % num_heads:
        raise ValueError(f"out features {out} not divisible by num_heads {num_heads}")
    hd = out // num_heads
    a = w_q.detach().double().reshape(num_heads, hd, d_in)  # W_q[h]: [hd, in]
    b = w_k.detach().double().reshape(num_heads, hd, d_in)
    return a @ a.transpose(1, 2), b @ b.transpose(1, 2)


def _squared_singular_values(g_q: Tensor, g_k: Tensor) -> Tensor:
    """Eigenvalues (descending, clamped >= 0) of ``L^T G_k L`` with ``L L^T = G_q``, batched.

    ``L`` is the Cholesky factor where ``G_q`` is positive definite; for a rank-deficient ``G_q``
    (MLRA's rank-r heads) it is ``Q diag(sqrt(lambda))`` from ``eigh``, which any ``L L^T = G_q``
    may be: the nonzero eigenvalues of ``L^T G_k L`` are those of ``G_q G_k`` either way."""
    lower, info = torch.linalg.cholesky_ex(g_q)
    bad = info != 0
    if bool(bad.any()):  # probe steps only: one host sync is fine here
        lam, q = torch.linalg.eigh(g_q[bad])
        lower = lower.clone()
        lower[bad] = q * lam.clamp_min(0).sqrt().unsqueeze(-2)
    core = lower.transpose(-2, -1) @ g_k @ lower
    return torch.linalg.eigvalsh((core + core.transpose(-2, -1)) / 2).flip(-1).clamp_min(0)


@torch.no_grad()
def head_singular_values(w_q: Tensor, w_k: Tensor, num_heads: int) -> Tensor:
    """Singular values of ``W_q[h]^T W_k[h]`` for every head, ``[heads, head_dim]`` descending.

    ``w_q``, ``w_k``: ``[out, in]`` (``nn.Linear`` layout), ``out = heads * head_dim``. No SVD of
    the ``[in, in]`` product: with ``G_q = W_q[h] W_q[h]^T`` and ``G_k`` (``d_h x d_h``), the
    squared singular values are the eigenvalues of ``L^T G_k L``, ``L = chol(G_q)``, and their sum
    is ``<G_q, G_k>_F``. Computed in float64."""
    return _squared_singular_values(*_gram_pairs(w_q, w_k, num_heads)).sqrt().float()


@torch.no_grad()
def layer_head_singular_values(qk: list[tuple[Tensor, Tensor, int]]) -> list[Tensor]:
    """:func:`head_singular_values` of many layers, ``[(W_q, W_k, heads), ...]`` (a model's
    ``qk_weights()``); layers of the same shape share one batched Cholesky and eigensolve."""
    grams = [_gram_pairs(wq, wk, h) for wq, wk, h in qk]
    out: list[Tensor | None] = [None] * len(qk)
    by_shape: dict[tuple, list[int]] = {}
    for i, (g_q, _) in enumerate(grams):
        by_shape.setdefault(tuple(g_q.shape), []).append(i)
    for idx in by_shape.values():
        s2 = _squared_singular_values(torch.cat([grams[i][0] for i in idx]), torch.cat([grams[i][1] for i in idx]))
        for i, part in zip(idx, s2.sqrt().float().split([grams[i][0].shape[0] for i in idx])):
            out[i] = part
    return out  # type: ignore[return-value]


@torch.no_grad()
def spectral_concentration(w_q: Tensor, w_k: Tensor, num_heads: int) -> Tensor:
    """``s[0]**2 / sum(s**2)`` of ``W_q[h]^T W_k[h]`` per head, in (0, 1]. Returns ``[heads]``.

    ``s[0]**2`` is the top eigenvalue of ``L^T G_k L`` and ``sum(s**2) = <G_q, G_k>_F`` (see
    :func:`head_singular_values`)."""
    g_q, g_k = _gram_pairs(w_q, w_k, num_heads)
    top = _squared_singular_values(g_q, g_k)[:, 0]
    total = (g_q * g_k).sum(dim=(1, 2))
    return (top / total.clamp_min(1e-300)).float()


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
