"""Weyl smoothing: AdamW whose per-matrix step is bounded by the weight's own spectral norm
(Qi et al., "Taming Transformer Without Using Learning Rate Warmup", ICLR 2025; "AdamW^2").

For a weight matrix W with AdamW direction U_t (bias-corrected ``m / (sqrt(v) + eps)``), the step
at learning rate ``a`` is ``dW_t = a U_t``. Weyl's inequality gives
``sigma_1(W_{t-1} - dW_t) <= sigma_1(W_{t-1}) + a sigma_1(U_t)``, so the top singular value of W can
grow by at most the ratio ``r_t = a sigma_1(U_t) / sigma_1(W_{t-1})`` in one step. When ``r_t``
exceeds ``threshold`` the step's learning rate is bounded to

    a_t = tau * sigma_1(W_{t-1}) / sigma_1(U_t)            (so that r_t becomes tau)

and ``a_t`` is used for that matrix's step, weight decay included. Otherwise the step is exactly
torch's AdamW. Vectors and scalars (biases, norms, gamma) always take the plain AdamW step.

sigma_1 is estimated by power iteration whose vectors persist in the optimizer state across steps
(``power_iters`` for the update, which changes every step, and ``weight_power_iters`` for the
weight, which moves slowly): a few mat-vecs per matrix per step, never an SVD.

The paper's public text does not state tau, the threshold or the iteration counts; the defaults
here (tau = threshold = 0.1, two and one iterations) are this project's choice and are options of
the stabilizer. ``last_stats`` reports how often and how hard the bound fired at the last step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim import Optimizer


def _power_step(mat: Tensor, v: Tensor, iters: int) -> tuple[float, Tensor]:
    """``iters`` power-iteration steps on ``mat^T mat`` from ``v``; returns (sigma_1 estimate, v)."""
    u = mat @ v
    for _ in range(iters - 1):
        v = mat.t() @ u
        v = v / v.norm().clamp_min(1e-30)
        u = mat @ v
    sigma = u.norm()
    v = mat.t() @ (u / sigma.clamp_min(1e-30))
    v = v / v.norm().clamp_min(1e-30)
    return sigma, v


class WeylAdamW(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, tau: float = 0.1,
                 threshold: float | None = None, power_iters: int = 2, weight_power_iters: int = 1):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if power_iters < 1 or weight_power_iters < 1:
            raise ValueError("power_iters and weight_power_iters must be >= 1")
        threshold = tau if threshold is None else threshold
        if threshold < tau:
            raise ValueError(f"threshold ({threshold}) must be >= tau ({tau}) or the bound would raise the lr")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, tau=tau,
                        threshold=threshold, power_iters=power_iters, weight_power_iters=weight_power_iters)
        super().__init__(params, defaults)
        self.last_stats: dict[str, float] = {}
        self.fired_total = 0  # matrix-steps on which the bound fired, since construction
        self.matrix_steps_total = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices = fired = 0
        min_scale = 1.0
        scale_sum = 0.0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("WeylAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if p.dim() >= 2:
                        g = torch.Generator(device="cpu").manual_seed(p.numel() % (2**31))
                        n = p.shape[-1] if p.dim() == 2 else p[0].numel()
                        v0 = torch.randn(n, generator=g, dtype=torch.float32).to(p.device)
                        state["v_update"] = v0 / v0.norm()
                        state["v_weight"] = state["v_update"].clone()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = state["step"].item()

                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)

                step_lr = lr
                if p.dim() >= 2 and lr > 0:
                    matrices += 1
                    w2 = p.detach().flatten(1).float()
                    # U_t = m_hat / (sqrt(v_hat) + eps); sigma_1(U_t) = sigma_1(exp_avg/denom) / bc1
                    direction = (exp_avg / denom).flatten(1).float()
                    s_dir, state["v_update"] = _power_step(direction, state["v_update"], group["power_iters"])
                    s_w, state["v_weight"] = _power_step(w2, state["v_weight"], group["weight_power_iters"])
                    s_update = float(s_dir) / bias_correction1
                    s_weight = float(s_w)
                    if s_update > 0 and lr * s_update > group["threshold"] * s_weight:
                        step_lr = group["tau"] * s_weight / s_update
                        fired += 1
                    scale = step_lr / lr
                    scale_sum += scale
                    min_scale = min(min_scale, scale)

                if step_lr == lr:  # exactly torch.optim.AdamW (single-tensor path)
                    p.mul_(1 - lr * wd)
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                else:
                    p.mul_(1 - step_lr * wd)
                    p.addcdiv_(exp_avg, denom, value=-step_lr / bias_correction1)
        self.fired_total += fired
        self.matrix_steps_total += matrices
        self.last_stats = {
            "weyl/fire_rate": fired / matrices if matrices else 0.0,
            "weyl/min_lr_scale": min_scale,
            "weyl/mean_lr_scale": scale_sum / matrices if matrices else 1.0,
        }
        return loss
