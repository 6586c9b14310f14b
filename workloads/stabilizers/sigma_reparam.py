"""sigmaReparam (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
Collapse", Eq. 4):

    W_hat = gamma / sigma(W) * W

with ``sigma(W)`` the spectral norm of W estimated by one step of power iteration per training
step (fp32 vectors ``u``, ``v`` kept as buffers, not updated in eval; the power iteration and
sigma run in fp32 even under bf16 autocast, as in apple/ml-sigma-reparam) and ``gamma`` a learnable scalar
initialised to the spectral norm of the initial weight, so that the layer starts as the plain one.
Gradients flow through ``sigma(W)`` as in the paper (sigma = v^T W u with u, v held constant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SigmaReparamLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.gamma = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        self.register_buffer("u", torch.zeros(in_features, device=device, dtype=torch.float32))
        self.register_buffer("v", torch.zeros(out_features, device=device, dtype=torch.float32))
        self.reset_sigma()

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> SigmaReparamLinear:
        w = lin.weight
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        new.reset_sigma()
        return new

    @torch.no_grad()
    def reset_sigma(self) -> None:
        """Exact top singular pair of the current weight (one SVD at construction); gamma = sigma."""
        _, s, vh = torch.linalg.svd(self.weight.float(), full_matrices=False)
        self.u.copy_(vh[0])
        self.v.copy_(F.normalize(self.weight.float() @ vh[0], dim=0))
        self.gamma.fill_(float(s[0]))

    def sigma(self) -> Tensor:
        """Spectral-norm estimate, in fp32 even under autocast; one power-iteration step first
        when training with grad.

        The step is ``v = normalize(W u)``, ``u = normalize(W^T v)``, ``sigma = v^T W u`` (the
        official code's order). ``W^T v`` is computed once, with grad, and serves both the new
        ``u`` and ``sigma = (W^T v) . u`` (= ``||W^T v||``; gradient ``v u^T`` as in the paper)."""
        with torch.autocast(self.weight.device.type, enabled=False):
            w = self.weight.float()
            if self.training and torch.is_grad_enabled():
                with torch.no_grad():
                    v = F.normalize(torch.mv(w, self.u), dim=0)
                wt_v = torch.mv(w.t(), v)  # with grad
                u = F.normalize(wt_v.detach(), dim=0)
                with torch.no_grad():
                    self.u.copy_(u)
                    self.v.copy_(v)
                return torch.dot(wt_v, u)
            return torch.dot(self.v, torch.mv(w, self.u))

    def effective_weight(self) -> Tensor:
        """``gamma / sigma * W``: the scale is computed in fp32 and applied to the weight (the
        activation-sized alternative, scaling the layer's output, measured no faster on the CPU
        with tokens > in_features); autocast casts the result as it casts a plain weight."""
        return self.weight * (self.gamma.float() / self.sigma()).to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", sigma_reparam=True"


def apply_sigma_reparam(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of the model's Transformer blocks by a ``SigmaReparamLinear``.

    The scope is ``model.transformer_blocks()`` when the model defines it (attention and MLP of
    every block; embeddings, tied heads and classifier heads stay as they are), else the whole
    module. Weights are kept: the reparametrised layer computes the same function at the start.
    """
    scope = model.transformer_blocks() if hasattr(model, "transformer_blocks") else model
    count = 0
    for parent in list(scope.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, SigmaReparamLinear.from_linear(child))
                count += 1
    if count == 0:
        raise ValueError("apply_sigma_reparam: no nn.Linear found to reparametrise")
    return model
