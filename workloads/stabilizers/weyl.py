"""Weyl smoothing: AdamW whose per-matrix step is bounded by the weight's own spectral norm
(Qi et al., "Taming Transformer Without Using Learning Rate Warmup", ICLR 2025; "AdamW^2").

For a weight matrix W, AdamW's step at learning rate ``a`` is ``dW_t = a D_t`` with the direction
``D_t = U_t + wd W_{t-1}`` (``U_t`` the bias-corrected ``m / (sqrt(v) + eps)``, ``wd`` the decoupled
weight decay: the decay is part of the step and inside the bound). Weyl's inequality gives
``sigma_1(W_{t-1} - dW_t) <= sigma_1(W_{t-1}) + a sigma_1(D_t)``, so the top singular value of W can
grow by at most the ratio ``r_t = a sigma_1(D_t) / sigma_1(W_{t-1})`` in one step. When ``r_t``
exceeds ``threshold`` the step's learning rate is bounded to

    a_t = tau * sigma_1(W_{t-1}) / sigma_1(D_t)            (so that r_t becomes tau)

Otherwise the step is AdamW's (equal to ``torch.optim.AdamW`` to float rounding). Everything that
is not a matrix takes the plain AdamW step.

What is a matrix: the rule of :mod:`workloads.matrices`, shared with weight decay (Linear and conv
weights, per-head factors; not embeddings, position bias tables, class tokens, norms, biases,
gains), read from ``p.param_kind`` by :func:`matrix_shape`, which also gives the matrices' shape:
``[out, in]``; a conv kernel ``[out, in, kh, kw]`` as the matrix ``[out, in * kh * kw]`` it applies
to each patch; a parameter with ``p.matrix_batch_dims = k`` as a batch of independent matrices over
its first ``k`` dims, each bounded on its own (MLRA's ``up`` ``[3H, r, d_h]`` is 3H matrices
``r x d_h``). A bare tensor without ``param_kind`` (an optimizer built outside ``workloads.trainer``)
is a matrix by its shape: >= 2 dims and, beyond 2, a leading dim > 1.

The cap holds by construction (issue 20). The realised ratio ``sigma_1(W_t - W_{t-1}) /
sigma_1(W_{t-1})`` equals ``a_t sigma_1(D_t) / sigma_1(W_{t-1})``; the bound uses an estimate of
sigma_1(D_t) from **above** and of sigma_1(W_{t-1}) from **below**, so the realised ratio is at most
tau up to float rounding, whatever the spectra:

* ``sigma_1(D) <= tr((D D^T)^k)^(1 / 2k)`` for any k (:func:`spectral_norm_upper`): the Gram matrix
  of D's smaller side, squared ``squarings`` times (each normalised by its trace, in log space), so
  ``k = 2^(squarings + 1)``, 16 by default. The bound exceeds sigma_1 by the factor
  ``(sum_i (s_i / s_1)^(2k))^(1 / 2k)``: nothing when the top singular value stands out, at most
  ``j^(1/32)`` (2.2 % for j = 2, 7.5 % for j = 10) when j of them tie. Where the bound fires the
  step is therefore a little below the cap, never above it.
* sigma_1(W) by block power iteration with two vectors and a Rayleigh-Ritz step
  (:func:`power_iteration`), batched over the matrices of a shape, with a basis kept in the
  optimizer state across steps (warm start): a Ritz value is a lower bound of sigma_1, so an
  underestimate only makes the bound stricter. ``weight_power_iters`` iterations per step (W moves
  slowly), ``init_power_iters`` at a matrix's first step.

Before issue 20 the update's sigma_1 came from warm-started power iteration too: a lower bound,
which missed a direction new at that step (a top singular value 1.2-1.3x the previous one that the
warm basis was nearly orthogonal to) and overshot the cap by up to 30 % against a full SVD; a
residual correction and a fresh sketch vector still overshot by 15-20 %, three more iterations by
6.5 % (``benchmarks/weyl_cap.py``).

The step makes no host-device synchronisation: the learning-rate scale of every matrix is computed
on the device as ``where(a s_d > threshold s_w, tau s_w / (a s_d), 1)``; the AdamW moments use
``torch._foreach_*`` kernels. Per shape the step costs one Gram product, ``squarings`` products of
``min(rows, cols)``-square matrices and the weight's iterations, each one batched call. Statistics
(fire rate, learning-rate scales) stay on the device and are converted to Python numbers only when
``last_stats`` / ``fired_total`` are read (probe steps).

The paper's public text does not state tau, the threshold or how sigma_1 is computed; the defaults
here (tau = threshold = 0.1; 3 squarings; 1 weight iteration, 8 at the first step) are this
project's choice and are options of the stabilizer.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer

_TINY = 1e-30


def matrix_shape(p: Tensor) -> tuple[int, int, int] | None:
    """``(count, rows, cols)`` of the matrices parameter ``p`` holds, or ``None`` for a non-matrix.

    See the module docstring and :mod:`workloads.matrices` for the rule."""
    kind = getattr(p, "param_kind", None)
    if p.dim() < 2 or (kind is not None and kind != "matrix"):
        return None
    k = int(getattr(p, "matrix_batch_dims", 0) or 0)
    if k:
        if p.dim() - k != 2:
            raise ValueError(f"matrix_batch_dims={k} on a tensor of shape {tuple(p.shape)}: "
                             "the remaining dims must form a matrix")
        return math.prod(p.shape[:k]), p.shape[-2], p.shape[-1]
    if p.dim() == 2:
        return 1, p.shape[0], p.shape[1]
    if p.shape[0] == 1:
        return None
    return 1, p.shape[0], math.prod(p.shape[1:])


@functools.lru_cache(maxsize=None)
def _refill_vector(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A fixed dense vector of length ``n`` (cached per length, device and dtype)."""
    return torch.cos(torch.arange(n, device=device, dtype=dtype) * 2.39996323)


def _orth2(x: Tensor, refill: bool = False) -> Tensor:
    """Orthonormal basis (Gram-Schmidt) of the two rows of ``x: [B, 2, n]``. A second row that is
    (numerically) dependent on the first comes back as zeros, or with ``refill`` as a fixed vector
    orthogonal to the first, so that a warm-started basis never stays one-dimensional."""
    c1, c2 = x.unbind(1)
    n1 = torch.linalg.vector_norm(c1, dim=-1, keepdim=True)
    q1 = c1 / n1.clamp_min(_TINY)
    if refill:
        r = _refill_vector(x.shape[2], x.device, x.dtype)
        small = torch.linalg.vector_norm(c2 - (q1 * c2).sum(-1, keepdim=True) * q1, dim=-1, keepdim=True)
        c2 = torch.where(small > 1e-6 * n1, c2, r)
    c2 = c2 - (q1 * c2).sum(-1, keepdim=True) * q1
    n2 = torch.linalg.vector_norm(c2, dim=-1, keepdim=True)
    q2 = torch.where(n2 > 1e-6 * n1, c2 / n2.clamp_min(_TINY), 0.0)
    return torch.stack((q1, q2), dim=1)


def _top_eig2(g: Tensor) -> Tensor:
    """Largest eigenvalue of symmetric 2x2 matrices ``g: [B, 2, 2]`` (closed form)."""
    a, b, c = g[:, 0, 0], g[:, 0, 1], g[:, 1, 1]
    return (a + c) / 2 + torch.sqrt(((a - c) / 2) ** 2 + b * b)


def _iterate(a: Tensor, at: Tensor, v: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """``iters`` block power iterations from the orthonormal rows ``v``; returns the last ``Y^T``
    and the new basis."""
    yt = v
    for _ in range(iters):
        yt = torch.bmm(v, at)        # [B, 2, m]
        v = _orth2(torch.bmm(yt, a))  # [B, 2, n]
    return yt, v


def _ritz(yt: Tensor) -> Tensor:
    """``sqrt(lambda_max(Y^T Y))``: the Ritz estimate of sigma_1 from the last iteration's ``Y^T``."""
    return _top_eig2(torch.bmm(yt, yt.transpose(1, 2))).clamp_min(0).sqrt()


def power_iteration(a: Tensor, v: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Block power iteration (two vectors, Rayleigh-Ritz) on ``a^T a`` for a batch of matrices
    ``a: [B, m, n]`` from a basis held as rows, ``v: [B, 2, n]`` (``V^T``).

    Each iteration: ``Y^T = V^T a^T``, ``Z^T = Y^T a``, ``V^T = orth(Z^T)``: both products put the
    two-row factor first and read ``a`` once each (on the CPU this order runs 3-4x faster than
    ``a V`` and ``a^T Y``; on the GPU it is the same cuBLAS call). Returns ``(sigma [B], V^T)`` with
    ``sigma = sqrt(lambda_max(Y^T Y))`` of the last iteration, the Ritz value of ``a^T a`` on
    span(V): a lower bound of sigma_1 that is exact when span(V) holds the top right singular
    vector. Two vectors instead of one cost the same matrix reads and keep the estimate good when
    the top two singular values are close or swap between steps (a single warm-started vector
    then points at the old top direction and converges at the rate (s_2/s_1)^2 per iteration)."""
    v = _orth2(v, refill=True)
    yt, v = _iterate(a, a.transpose(1, 2), v, iters)
    return _ritz(yt), v


def spectral_norm_upper(a: Tensor, squarings: int = 3) -> Tensor:
    """An upper bound of sigma_1 of each matrix of ``a: [B, m, n]``: ``tr(C^k)^(1 / 2k)`` with
    ``C = a a^T`` (or ``a^T a``, the smaller) and ``k = 2^(squarings + 1)``.

    ``tr(C^k) = sum_i s_i^(2k) >= s_1^(2k)``, so the bound holds for any matrix; it exceeds s_1 by
    ``(sum_i (s_i / s_1)^(2k))^(1 / 2k)`` (at most ``rank^(1 / 2k)``). Computed without overflow:
    ``M_0 = C / tr(C)``, ``M_{j+1} = M_j^2 / tr(M_j^2)``, and ``log tr(C^(2^(j+1))) =
    2 log tr(C^(2^j)) + log tr(M_j^2)`` with ``tr(M_j^2) = ||M_j||_F^2`` (M_j symmetric): one
    batched Gram product and ``squarings`` products of ``min(m, n)``-square matrices."""
    if a.shape[1] > a.shape[2]:
        a = a.transpose(1, 2)
    c = torch.bmm(a, a.transpose(1, 2))
    trace = c.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(_TINY)
    log_tr = trace.log()
    m = c / trace.view(-1, 1, 1)
    k = 1
    for j in range(squarings + 1):
        if j:
            m = torch.bmm(m, m) / f.view(-1, 1, 1)  # noqa: F821 (f of the previous pass)
        f = torch.linalg.vector_norm(m, dim=(1, 2)).square().clamp_min(_TINY)  # tr(M_j^2)
        log_tr = 2 * log_tr + f.log()
        k *= 2
    return torch.exp(log_tr / (2 * k))


def init_vector(count: int, cols: int, seed: int, device) -> Tensor:
    """The power iteration's start for ``count`` matrices of ``cols`` columns: ``[count, 2, cols]``,
    two orthonormal random rows per matrix, from a CPU generator seeded with ``seed`` (the same
    start on every device)."""
    g = torch.Generator(device="cpu").manual_seed(seed % (2**31))
    start = torch.randn(count, cols, 2, generator=g, dtype=torch.float32).transpose(1, 2).contiguous()
    return _orth2(start).to(device)


class WeylAdamW(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, tau: float = 0.1,
                 threshold: float | None = None, squarings: int = 3, weight_power_iters: int = 1,
                 init_power_iters: int = 8):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if squarings < 0 or weight_power_iters < 1 or init_power_iters < 1:
            raise ValueError("squarings must be >= 0, weight_power_iters and init_power_iters >= 1")
        threshold = tau if threshold is None else threshold
        if threshold < tau:
            raise ValueError(f"threshold ({threshold}) must be >= tau ({tau}) or the bound would raise the lr")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, tau=tau,
                        threshold=threshold, squarings=squarings, weight_power_iters=weight_power_iters,
                        init_power_iters=init_power_iters)
        super().__init__(params, defaults)
        self.matrix_steps_total = 0  # matrix-steps since construction (host count, no sync)
        self._fired_total: Tensor | None = None  # device counter of matrix-steps where the bound fired
        self._last: dict[str, Tensor] = {}
        self._last_matrices = 0

    # ---- statistics: device tensors, converted only when read -----------------------------------
    @property
    def fired_total(self) -> int:
        """Matrix-steps on which the bound fired since construction (reading it syncs the device)."""
        return 0 if self._fired_total is None else int(self._fired_total)

    @property
    def last_stats(self) -> dict[str, float]:
        """Fire rate and min / mean learning-rate scale over the matrices of the last step."""
        if not self._last_matrices:
            return {"weyl/fire_rate": 0.0, "weyl/min_lr_scale": 1.0, "weyl/mean_lr_scale": 1.0}
        vals = torch.stack([self._last["fired"].float(), self._last["min"].float(),
                            self._last["sum"].float()]).tolist()  # one transfer
        n = self._last_matrices
        return {"weyl/fire_rate": vals[0] / n, "weyl/min_lr_scale": vals[1], "weyl/mean_lr_scale": vals[2] / n}

    # ---- the step ---------------------------------------------------------------------------------
    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)  # on the CPU, as torch's AdamW: reading it is no device sync
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            shape = matrix_shape(p)
            if shape is not None:
                count, _, cols = shape
                state["v_weight"] = init_vector(count, cols, p.numel(), p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fired: list[Tensor] = []
        mins: list[Tensor] = []
        sums: list[Tensor] = []
        matrices = 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("WeylAdamW does not support sparse gradients")
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            states = [self._init_state(p) for p in params]
            grads = [p.grad for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            steps_t = [s["step"] for s in states]
            torch._foreach_add_(steps_t, 1.0)
            steps = [float(s) for s in steps_t]  # CPU tensors: no device sync

            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            bc1 = [1 - beta1 ** s for s in steps]
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denoms, [math.sqrt(1 - beta2 ** s) for s in steps])
            torch._foreach_add_(denoms, eps)

            plain = [i for i, p in enumerate(params) if lr == 0 or matrix_shape(p) is None]
            if plain:
                pp = [params[i] for i in plain]
                if lr * wd != 0:
                    torch._foreach_mul_(pp, 1 - lr * wd)
                torch._foreach_addcdiv_(pp, [exp_avgs[i] for i in plain], [denoms[i] for i in plain],
                                        [-lr / bc1[i] for i in plain])
            if lr == 0:
                continue

            # matrices: bucket by (rows, cols, dtype, device, step) and bound each bucket in one go
            buckets: dict[tuple, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                shape = matrix_shape(p)
                if shape is not None:
                    buckets[(shape[1], shape[2], p.dtype, p.device, steps[i])].append(i)
            for (rows, cols, _, _, step), idx in buckets.items():
                counts = [matrix_shape(params[i])[0] for i in idx]
                first = step == 1
                f, mn, sm = self._bound_bucket(
                    [params[i] for i in idx], [exp_avgs[i] for i in idx], [denoms[i] for i in idx],
                    [states[i] for i in idx], counts, rows, cols, group, bc1[idx[0]], first)
                fired.append(f)
                mins.append(mn)
                sums.append(sm)
                matrices += sum(counts)
        self.matrix_steps_total += matrices
        self._last_matrices = matrices
        if matrices:
            f = torch.stack(fired).sum()
            self._last = {"fired": f, "min": torch.stack(mins).min(), "sum": torch.stack(sums).sum()}
            self._fired_total = f if self._fired_total is None else self._fired_total + f
        return loss

    def _bound_bucket(self, params, exp_avgs, denoms, states, counts, rows, cols, group, bc1, first):
        """Bounded AdamW step of same-shape matrices; returns (fired count, min scale, scale sum)."""
        lr, wd, tau, thr = group["lr"], group["weight_decay"], group["tau"], group["threshold"]

        # the step directions D = U_t bc1 + wd bc1 W (the whole step is -(a_t / bc1) D) and the
        # weights, each shape's matrices stacked in one batch
        d = torch.cat([t.reshape(c, rows, cols) for t, c in zip(torch._foreach_div(exp_avgs, denoms), counts)]).float()
        w = torch.cat([p.detach().reshape(c, rows, cols) for p, c in zip(params, counts)]).float()
        if wd != 0:
            d.add_(w, alpha=wd * bc1)
        s_d = spectral_norm_upper(d, group["squarings"])  # >= sigma_1(D)
        iters = group["weight_power_iters"]
        if first:  # no warm basis yet
            iters = max(iters, group["init_power_iters"])
        s_w, v = power_iteration(w, torch.cat([s["v_weight"] for s in states]), iters)  # <= sigma_1(W)
        torch._foreach_copy_([s["v_weight"] for s in states], list(v.split(counts)))

        # a s_d > threshold s_w  ->  scale = tau s_w / (a s_d), else 1
        s_u = s_d * (lr / bc1)  # sigma_1 of the step at the scheduled lr, from above
        hit = s_u > thr * s_w
        scale = torch.where(hit, tau * s_w / s_u.clamp_min(_TINY), torch.ones_like(s_u))
        # p <- p - (a_t / bc1) D = p (1 - a_t wd) - (a_t / bc1) m / denom: one add per bucket
        step = (-(lr / bc1) * scale).view(-1, 1, 1)
        delta = torch.mul(d, step).to(params[0].dtype)
        torch._foreach_add_(params, [t.view_as(p) for t, p in zip(delta.split(counts), params)])
        return hit.sum(), scale.min(), scale.sum()
