"""Stability probes: the quantities that move before a Transformer crashes.

All functions are pure (no module state) and run under ``torch.no_grad`` semantics: callers pass
detached tensors. They are computed every ``probe_interval`` steps only; see ``workloads.trainer``.

* ``attention_entropy``: Shannon entropy of attention rows (Zhai et al. 2023, "entropy collapse");
  ``attention_summary`` / ``qk_attention_summary`` reduce a layer's attention to its entropy and
  max logit in chunks of query rows, and ``AttentionStats`` collects them per layer on probe steps
  from every item of the batch (``PROBE_BATCH``; why: see ``AttentionStats``).
* ``spectral_concentration``: the share of spectral energy of ``W_q[h]^T W_k[h]`` in its top
  direction, the SEC index of Qi et al. (ICLR 2025) with s = 1; ``normalized_concentration`` puts
  it on a scale that does not depend on the rank of the factorisation (MLRA's r < d_h).
* ``token_embedding_variability``: TEV of Chung et al. (2024), Sec. 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn


PROBE_BATCH: int | None = None
"""Sequences (GPT) or images (ViT, Swin) of each probe batch whose attention is measured: ``None``,
every item of the batch (an int: the first that many). Not a subset by default: the minimum over
heads and the max logit of a subset are biased low against the batch's (issue 19; see
:class:`AttentionStats`)."""

PROBE_CHUNK = 1 << 24
"""At most this many attention logits (over all heads of the measured subset) exist at once while
the statistics are computed: 64 MiB in float32. Read at each call that is given no ``chunk``."""

SUMMARY_KEYS = ("entropy_min", "entropy_mean", "max_logit")
"""What :func:`attention_summary` returns, in order, and the keys of ``AttentionStats.layers``."""


def _row_entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of each row (last dim) of ``probs``, in float32; ``0 * log 0`` is taken as 0."""
    p = probs.float()
    return -torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), 0.0).sum(-1)


@torch.no_grad()
def attention_entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of each attention row, averaged over batch and query rows.

    ``probs``: ``[batch, heads, q, k]``; rows sum to 1 and masked entries are exactly 0
    (``0 * log 0`` is taken as 0). Returns ``[heads]``. The probes of a training run do not form
    ``probs`` whole: they go through :func:`attention_summary` (same maths, row chunks)."""
    if probs.dim() != 4:
        raise ValueError(f"probs must be [batch, heads, q, k], got shape {tuple(probs.shape)}")
    return _row_entropy(probs).mean(dim=(0, 2))


def _summarise(row_logits: Callable[[int, int], Tensor], shape: Sequence[int], chunk: int | None) -> Tensor:
    """``[entropy_min, entropy_mean, max_logit]`` of an attention whose float32 logits of query rows
    ``i:j`` (``[b, heads, j - i, keys]``, masked entries ``-inf``) ``row_logits(i, j)`` forms, for
    ``shape = (b, heads, q, keys)``, at most ``chunk`` logits at a time. Stays on the device.

    Per chunk: softmax over keys, row entropies summed over batch and rows per head, max logit over
    allowed positions (finite logit and probability > 0). Softmax is row-wise, so the chunks give
    the numbers one ``[b, heads, q, keys]`` map would, up to summation order."""
    b, heads, q, keys = shape
    rows = max(1, (chunk or PROBE_CHUNK) // max(1, b * heads * keys))
    ent_sum, top = None, None
    for i in range(0, q, rows):
        logits = row_logits(i, min(q, i + rows))
        p = logits.softmax(-1)
        ent = _row_entropy(p).sum(dim=(0, 2))
        m = torch.where(torch.isfinite(logits) & (p > 0), logits, float("-inf")).amax()
        ent_sum = ent if ent_sum is None else ent_sum + ent
        top = m if top is None else torch.maximum(top, m)
    ent = ent_sum / (b * q)
    return torch.stack((ent.min(), ent.mean(), top))


@torch.no_grad()
def attention_summary(logits: Tensor, chunk: int | None = None) -> Tensor:
    """``[entropy_min, entropy_mean, max_logit]`` (a float32 tensor on ``logits``' device) of
    ``softmax(logits)``, ``logits``: ``[batch, heads, q, k]`` pre-softmax, masked entries ``-inf``
    or very negative. Entropy per head averaged over batch and query rows (:func:`attention_entropy`),
    then min and mean over heads; max logit over allowed positions (probability > 0). Query rows
    go in chunks of at most ``chunk`` logits (default :data:`PROBE_CHUNK`), each upcast to float32
    on its own."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be [batch, heads, q, k], got shape {tuple(logits.shape)}")
    logits = logits.detach()
    return _summarise(lambda i, j: logits[..., i:j, :].float(), logits.shape, chunk)


@torch.no_grad()
def qk_attention_summary(q: Tensor, k: Tensor, scale: float, causal: bool = False,
                         chunk: int | None = None) -> Tensor:
    """:func:`attention_summary` of ``softmax(scale * q k^T)`` (with the causal mask: query i sees
    keys <= i), without forming more than ``chunk`` logits at a time. ``q``, ``k``:
    ``[batch, heads, tokens, head_dim]``, detached and upcast to float32 here; the products run
    with autocast off (float32 logits under bf16 training too). Causal chunks multiply only the keys
    some row of the chunk can see."""
    q, k = q.detach().float(), k.detach().float()

    def row_logits(i: int, j: int) -> Tensor:
        keys = k[..., :j, :] if causal else k
        logits = (q[..., i:j, :] @ keys.transpose(-2, -1)) * scale
        if causal:
            future = torch.arange(j, device=q.device) > torch.arange(i, j, device=q.device)[:, None]
            logits = logits.masked_fill(future, float("-inf"))
        return logits

    with torch.autocast(q.device.type, enabled=False):
        return _summarise(row_logits, (*q.shape[:3], k.shape[-2]), chunk)


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
    may be: the nonzero eigenvalues of ``L^T G_k L`` are those of ``G_q G_k`` either way.

    A pair with a non-finite entry (a run whose weights have diverged: the loop reads the loss in
    blocks, so a probe step can see such weights before the run stops) gets NaN values; the other
    pairs of the batch are computed as usual."""
    finite = (torch.isfinite(g_q).all(dim=(-2, -1)) & torch.isfinite(g_k).all(dim=(-2, -1)))[:, None, None]
    if not bool(finite.all()):  # probe steps only: one host sync is fine here
        eye = torch.eye(g_q.shape[-1], dtype=g_q.dtype, device=g_q.device)
        s2 = _squared_singular_values(torch.where(finite, g_q, eye), torch.where(finite, g_k, eye))
        return torch.where(finite[:, :, 0], s2, float("nan"))
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


def normalized_concentration(sec: Tensor, rank: int) -> Tensor:
    """SEC over its floor: ``(sec - 1/r) / (1 - 1/r)``, r the rank of ``W_q[h]^T W_k[h]``'s
    factorisation (``d_h`` for dense attention, MLRA's rank r). SEC lies in ``[1/r, 1]``: ``1/r``
    when the r singular values are equal, 1 for rank one; a rank-r head can never read below 1/r,
    so raw SEC reads higher for MLRA (r = d_h / 2) than for dense heads with the same shape of
    spectrum. The normalised value is in [0, 1] for every r: 0 = spread evenly, 1 = one direction.
    Needs ``rank >= 2`` (a rank-one head's SEC is 1 by construction and carries no information)."""
    if rank < 2:
        raise ValueError(f"rank must be >= 2, got {rank}")
    return (sec - 1.0 / rank) / (1.0 - 1.0 / rank)


def concentration(s: Tensor) -> Tensor:
    """``s[..., 0]**2 / sum(s**2)`` for singular values ``s`` sorted descending along the last dim."""
    s2 = s.double() ** 2
    return (s2[..., 0] / s2.sum(-1).clamp_min(1e-300)).float()


@torch.no_grad()
def token_embedding_variability(weight: Tensor) -> tuple[float, float]:
    """TEV: std of each embedding row (over the hidden dimension), then mean and std over vocab."""
    mean, std = token_embedding_variability_t(weight).tolist()
    return mean, std


@torch.no_grad()
def token_embedding_variability_t(weight: Tensor) -> Tensor:
    """:func:`token_embedding_variability` as a ``[mean, std]`` tensor on the weight's device (the
    probe step reads it with the other probes, :func:`read`)."""
    per_token = weight.float().std(dim=1)
    return torch.stack((per_token.mean(), per_token.std()))


@torch.no_grad()
def grad_norms(named_groups: Iterable[tuple[str, Iterable[nn.Parameter]]]) -> dict[str, Tensor]:
    """L2 norm of the gradients of each named group of parameters (0-d tensors on the device; a
    group without gradients gets 0)."""
    out = {}
    for name, params in named_groups:
        sq = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
        out[name] = torch.stack(sq).sum().sqrt() if sq else torch.zeros(())
    return out


@torch.no_grad()
def param_norm(params: Iterable[nn.Parameter]) -> Tensor:
    """L2 norm of all ``params`` together (a 0-d tensor on their device)."""
    sq = [p.detach().float().pow(2).sum() for p in params]
    return torch.stack(sq).sum().sqrt() if sq else torch.zeros(())


def read(named: dict[str, Tensor]) -> dict[str, float]:
    """Python floats of many 0-d tensors in one device-to-host transfer (a probe step reads its
    gradient and weight probes together, not one synchronisation per value)."""
    if not named:
        return {}
    device = next(iter(named.values())).device
    values = torch.stack([t.detach().float().reshape(()).to(device) for t in named.values()]).tolist()
    return dict(zip(named, values))


class AttentionStats:
    """Per-layer attention statistics of one probe forward pass, read as ``layers``: one dict per
    attention layer in forward order, ``{"entropy_min", "entropy_mean", "max_logit"}`` (floats):
    the entropy (nats) of each head's attention rows averaged over the measured sequences and query
    rows, its min and mean over heads, and the largest pre-softmax logit at an allowed position.

    What is measured, and why (issue 12: a probe step cost 15x a normal step on an H100, in part
    for a float32 ``[B, heads, T, T]`` map per layer and three host syncs per layer here). The
    model's output never depends on the probe: attention modules compute it as on any step (fused
    kernels) and hand this object detached queries and keys (:meth:`add_qk`) or the logits they
    formed anyway (:meth:`add_logits`).

    * Items: every sequence / image of the forward's batch (default :data:`PROBE_BATCH` =
      ``None``), or the first ``batch`` of them when given an int (all of a smaller batch). Why not a
      subset (issue 19): each head's mean entropy on a subset is an unbiased estimate of the
      batch's, but the *minimum over heads* of noisy estimates is biased low, and the max logit of a
      subset is at most the batch's. Measured on trained smoke-size models (GPT 2 x 64, 2 heads,
      seq 64; ViT 2 x 64 on 16 x 16 digits; 150 steps at lr 0.01-1, batches of 64 / 32): the first
      4 items gave a minimum entropy between 3 % high and 57 % low on average over batches and
      layers, up to 100 % off in one batch (heads near collapse have heavy-tailed per-item
      entropies), and a max logit 3-20 % low; even the first 32 of 64 sequences were 37 % low on
      average at lr 1. So the whole batch is measured, and
      ``tests/test_models.py`` checks the default against it on a trained model.
      Residual bias (what remains, against the data rather than the batch): the batch is itself a
      sample. Against 16 batches pooled (256 sequences / 512 images) of the same trained smoke
      models, one batch's minimum entropy was within 1.5 % on average in 6 of the 8 (model, lr)
      cases (mean -1.3 % to +0.0 %, per-batch sd 6-146 %), but 15 % (lr 0.3) and 46 % (lr 1,
      pooled minimum 0.02 nats) low for the GPT near collapse; the batch's max logit was 1-11 % below
      the pooled max (an extreme value: it grows with the number of items). Compare these
      statistics only between runs of the same batch size; the 0.05-nat ``entropy_collapse`` event
      reads this batch-level minimum.
      Swin's window attention sees ``images x windows`` rows, image-major (timm's
      ``window_partition``): the first ``batch * windows`` of them are the first images'.
    * Chunks: query rows in chunks of at most ``chunk`` logits over the measured items' heads (default
      :data:`PROBE_CHUNK`, 2^24, 64 MiB in float32; one row where a row alone has more),
      accumulated on the device, so memory is bounded at any sequence length.
    * No host syncs while the forward runs: each layer leaves a 3-element device tensor; the first
      read of ``layers`` copies all of them to the host in one transfer (a stack and ``tolist``).

    The numbers equal those of the full ``[batch, heads, T, T]`` softmax of the measured items
    (up to float summation order; the statistics are computed in float32, autocast off).
    """

    def __init__(self, batch: int | None = PROBE_BATCH, chunk: int | None = None) -> None:
        if batch is not None and batch < 1:
            raise ValueError(f"batch must be >= 1 or None (all), got {batch}")
        self.batch, self.chunk = batch, chunk
        self._pending: list[Tensor] = []
        self._layers: list[dict[str, float]] = []

    def _rows(self, per_item: int = 1) -> slice:
        return slice(None if self.batch is None else self.batch * per_item)

    def add_qk(self, q: Tensor, k: Tensor, scale: float, causal: bool = False) -> None:
        """One layer from its queries and keys, ``[B, heads, tokens, head_dim]`` (the whole batch;
        the subset is taken here): :func:`qk_attention_summary`."""
        rows = self._rows()
        self._pending.append(qk_attention_summary(q[rows], k[rows], scale, causal, self.chunk))

    def add_logits(self, logits: Tensor, per_item: int = 1) -> None:
        """One layer from its pre-softmax logits ``[B * per_item, heads, q, k]`` whose rows are
        item-major (``per_item`` consecutive rows per sequence / image, e.g. Swin's windows):
        :func:`attention_summary` of the subset's rows."""
        self._pending.append(attention_summary(logits[self._rows(per_item)], self.chunk))

    @property
    def layers(self) -> list[dict[str, float]]:
        if self._pending:
            values = torch.stack(self._pending).tolist()  # the one host transfer
            self._pending.clear()
            self._layers += [dict(zip(SUMMARY_KEYS, v)) for v in values]
        return self._layers
