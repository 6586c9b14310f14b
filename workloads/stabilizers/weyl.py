"""Weyl smoothing: AdamW whose per-matrix step is bounded by the weight's own spectral norm
(Qi et al., "Taming Transformer Without Using Learning Rate Warmup", ICLR 2025; "AdamW^2").

For a weight matrix W with AdamW direction U_t (bias-corrected ``m / (sqrt(v) + eps)``), the step
at learning rate ``a`` is ``dW_t = a U_t``. Weyl's inequality gives
``sigma_1(W_{t-1} - dW_t) <= sigma_1(W_{t-1}) + a sigma_1(U_t)``, so the top singular value of W can
grow by at most the ratio ``r_t = a sigma_1(U_t) / sigma_1(W_{t-1})`` in one step. When ``r_t``
exceeds ``threshold`` the step's learning rate is bounded to

    a_t = tau * sigma_1(W_{t-1}) / sigma_1(U_t)            (so that r_t becomes tau)

and ``a_t`` is used for that matrix's step, weight decay included. Otherwise the step is AdamW's
(equal to ``torch.optim.AdamW`` to float rounding). Everything that is not a matrix takes the plain
AdamW step.

What is a matrix (decided per tensor by :func:`matrix_shape`):
  * a 2-D parameter: ``nn.Linear`` weights ``[out, in]`` and embedding tables ``[vocab, d]`` (a
    lookup is the linear map of a one-hot input);
  * a parameter with ``p.matrix_batch_dims = k`` set by its module: a batch of independent matrices
    over its first ``k`` dims, each bounded on its own (MLRA's per-head ``up`` factor
    ``[3H, r, d_h]`` is 3H matrices ``r x d_h``, see :class:`workloads.attention.LowRankQKV`);
  * another parameter of >= 3 dims whose first dim is > 1: a convolution kernel
    ``[out, in, kh, kw]``, taken as the matrix ``[out, in * kh * kw]`` it applies to each patch;
  * not matrices: vectors and scalars (biases, norms, gamma), and tensors of >= 3 dims with a
    leading dim of 1, which are added to activations rather than multiplied (timm's ``cls_token``
    ``[1, 1, D]`` and ``pos_embed`` ``[1, N, D]``).

sigma_1 is estimated by block power iteration with two vectors and a Rayleigh-Ritz step
(:func:`power_iteration`), batched over all matrices of the same shape (``torch.bmm`` on stacked
matrices; the updates and the weights of a shape share one batch for the iterations both take,
:func:`power_iteration_split`), with a basis that persists in the optimizer state across steps
(warm start). The estimate is a lower bound of sigma_1; the second vector keeps it tight when the
top two singular values are close or swap between steps, which a single warm-started vector misses
(it overshot the cap by up to 74 % on a GPT at two iterations). ``power_iters``
iterations are spent on the update direction, which changes every step, ``weight_power_iters`` on
the weight, which moves slowly (an underestimate of sigma_1(W) only makes the bound stricter), and
at least ``init_power_iters`` on both at a matrix's first step, where no warm vector exists yet. With the
defaults the realised ``sigma_1(a_t U_t) / sigma_1(W_{t-1})`` stays within a few percent of tau
against a full SVD (``tests/test_stabilizers.py``).

The step makes no host-device synchronisation: the learning-rate scale of every matrix is computed
on the device as ``where(a s_u > threshold s_w, tau s_w / (a s_u), 1)``; the AdamW moments use
``torch._foreach_*`` kernels. Statistics (fire rate, learning-rate scales) stay on the device and
are converted to Python numbers only when ``last_stats`` / ``fired_total`` are read (probe steps).

The paper's public text does not state tau, the threshold or the iteration counts; the defaults
here (tau = threshold = 0.1; 3, 1 and 8 iterations) are this project's choice and are options of
the stabilizer.
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

    See the module docstring for the rule."""
    if p.dim() < 2:
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
    return power_iteration_split(a, v, a.shape[0], iters, iters)


def power_iteration_split(a: Tensor, v: Tensor, n: int, iters_head: int, iters_tail: int) -> tuple[Tensor, Tensor]:
    """:func:`power_iteration` with ``iters_head`` iterations on the matrices ``a[:n]`` and
    ``iters_tail`` on ``a[n:]``: the iterations both parts take run as one batched call, the rest on
    the part that needs them. Same numbers as two calls of :func:`power_iteration`, with fewer
    operators (WeylAdamW runs its update and weight iterations this way)."""
    v = _orth2(v, refill=True)
    at = a.transpose(1, 2)
    joint = min(iters_head, iters_tail)
    yt, v = _iterate(a, at, v, joint)
    if iters_head != iters_tail:
        more = abs(iters_head - iters_tail)
        if iters_head > iters_tail:
            yt_more, v_more = _iterate(a[:n], at[:n], v[:n], more)
            yt, v = torch.cat((yt_more, yt[n:])), torch.cat((v_more, v[n:]))
        else:
            yt_more, v_more = _iterate(a[n:], at[n:], v[n:], more)
            yt, v = torch.cat((yt[:n], yt_more)), torch.cat((v[:n], v_more))
    return _ritz(yt), v


def _init_vector(count: int, cols: int, seed: int, device) -> Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed % (2**31))
    start = torch.randn(count, cols, 2, generator=g, dtype=torch.float32).transpose(1, 2).contiguous()
    return _orth2(start).to(device)


class WeylAdamW(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, tau: float = 0.1,
                 threshold: float | None = None, power_iters: int = 3, weight_power_iters: int = 1,
                 init_power_iters: int = 8):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if power_iters < 1 or weight_power_iters < 1 or init_power_iters < 1:
            raise ValueError("power_iters, weight_power_iters and init_power_iters must be >= 1")
        threshold = tau if threshold is None else threshold
        if threshold < tau:
            raise ValueError(f"threshold ({threshold}) must be >= tau ({tau}) or the bound would raise the lr")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, tau=tau,
                        threshold=threshold, power_iters=power_iters, weight_power_iters=weight_power_iters,
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
                state["v_update"] = _init_vector(count, cols, p.numel(), p.device)
                state["v_weight"] = state["v_update"].clone()
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

        direction = torch._foreach_div(exp_avgs, denoms)  # bias-corrected U_t = this / bc1
        # the updates' and the weights' matrices stacked in one batch: [d; w]
        n = sum(counts)
        a = torch.cat([t.reshape(c, rows, cols) for t, c in zip(direction, counts)]
                      + [p.detach().reshape(c, rows, cols) for p, c in zip(params, counts)]).float()
        d, w = a[:n], a[n:]
        v = torch.cat([s["v_update"] for s in states] + [s["v_weight"] for s in states])
        it_u, it_w = group["power_iters"], group["weight_power_iters"]
        if first:  # no warm basis yet
            it_u, it_w = max(it_u, group["init_power_iters"]), max(it_w, group["init_power_iters"])
        sigma, v = power_iteration_split(a, v, n, it_u, it_w)
        s_dir, s_w = sigma[:n], sigma[n:]
        torch._foreach_copy_([s["v_update"] for s in states] + [s["v_weight"] for s in states],
                             list(v.split(counts + counts)))

        # a s_u > threshold s_w  ->  scale = tau s_w / (a s_u), else 1 (computed in float64)
        s_u = s_dir.double() * (lr / bc1)  # a * sigma_1(U_t)
        s_w = s_w.double()
        hit = s_u > thr * s_w
        scale = torch.where(hit, tau * s_w / s_u.clamp_min(_TINY), torch.ones_like(s_u))
        # p <- p (1 - a_t wd) - (a_t / bc1) m / denom, as one add per bucket on the stacked matrices
        decay = (-lr * wd * scale).to(d.dtype).view(-1, 1, 1)
        step = (-(lr / bc1) * scale).to(d.dtype).view(-1, 1, 1)
        delta = torch.mul(d, step)
        if wd != 0:
            delta.addcmul_(w, decay)
        delta = delta.to(params[0].dtype)
        torch._foreach_add_(params, [t.view_as(p) for t, p in zip(delta.split(counts), params)])
        return hit.sum(), scale.min(), scale.sum()
