"""sigmaReparam (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
Collapse", Eq. 4):

    W_hat = gamma / sigma(W) * W

with ``sigma(W)`` the spectral norm of W estimated by one step of power iteration per training
step (fp32 vectors ``u``, ``v`` kept as buffers, not updated in eval; the power iteration and
sigma run in fp32 even under bf16 autocast, as in apple/ml-sigma-reparam) and ``gamma`` a learnable scalar
initialised to the spectral norm of the initial weight, so that the layer starts as the plain one.
Gradients flow through ``sigma(W)`` as in the paper (sigma = v^T W u with u, v held constant).

Batching (issue 12). Done per layer, the power step and the scale are ~15 small operators per
Linear forward, plus their backward: on a GPU a GPT of depth 12 then spends its step launching
kernels (~3,400 a step, 2.25x plain AdamW's step time on an H100). So :func:`apply_sigma_reparam`
installs a forward pre-hook on the model that, in a training forward with grad, runs the power
step once for all its ``SigmaReparamLinear`` layers of the same weight shape, dtype and device
(:func:`batched_power_step`): the group's weights, ``u``, ``v`` buffers and gammas are stacked
(``torch.stack``: gradients reach each weight and gamma), ``v = normalize(W u)`` and ``W^T v`` are
two ``torch.bmm`` (fp32, autocast off), the new ``u``, ``v`` are written back to every layer's own
buffers with one ``_foreach_copy_`` each, and ``W_hat = W * gamma / sigma`` is one multiply for the
group, of which each layer is handed its slice; the layer's forward is then ``F.linear(x, W_hat_i,
bias)``. Forward and backward of the reparametrisation thus take a number of operators that depends
on the number of weight shapes (4 in a GPT or ViT block), not of layers: the only per-layer cost
left is gamma's optimizer step (``tests/test_launch_count.py``). The price is memory: the stacked
weights are held from the forward to the backward (for gamma's gradient), a copy of the blocks'
weights that the per-layer path does not make. The maths, gradients included, are those
of the per-layer path (``tests/test_stabilizers.py`` compares losses, gradients and buffers over
training steps).

The per-layer path stays, and is the reference: a layer called outside a hooked training forward
(alone, in eval, without grad, ``effective_weight()`` read by the probes) runs its own power step.
A batched ``W_hat`` serves one layer call only (the call takes it); one still unused when the
model's forward ends (or raises) is dropped by a forward hook, and that layer's ``u``, ``v`` get back
their previous values, as if it had not run (its weight and gamma do get zero gradients, where
the per-layer path leaves them None: the stacked weights reach them). A layer called twice in one forward runs the
per-layer step at its second call, as it would unbatched. ``model.sigma_reparam_batched = False``
switches the batching off (every layer then runs its own step).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workloads.stabilizers import SCOPES


class _SigmaReparam:
    """What a reparametrised layer adds to its ``weight``: ``gamma``, the power-iteration buffers
    ``u``, ``v`` and ``W_hat = gamma / sigma(W) W``, sigma that of the weight as a matrix
    ``[out, rest]`` (a conv kernel ``[out, in, kh, kw]`` as ``[out, in * kh * kw]``)."""

    def extra_repr(self) -> str:  # the mixin comes first: super() is nn.Linear's / nn.Conv2d's
        return super().extra_repr() + ", sigma_reparam=True"

    def _init_sigma(self, device, dtype) -> None:
        out, rest = self.weight.shape[0], self.weight[0].numel()
        self.gamma = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        self.register_buffer("u", torch.zeros(rest, device=device, dtype=torch.float32))
        self.register_buffer("v", torch.zeros(out, device=device, dtype=torch.float32))
        self.reset_sigma()
        self._batched_weight: Tensor | None = None  # W_hat from the model's batched pre-hook, for one call

    def _adopt(self, layer: nn.Module) -> None:
        """Take ``layer``'s own weight and bias parameters (a tied weight stays tied), then reset."""
        self.weight = layer.weight
        self.bias = layer.bias
        self.reset_sigma()

    @torch.no_grad()
    def reset_sigma(self) -> None:
        """Exact top singular pair of the current weight (one SVD at construction); gamma = sigma."""
        w = self.weight.float().flatten(1)
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.u.copy_(vh[0])
        self.v.copy_(F.normalize(w @ vh[0], dim=0))
        self.gamma.fill_(float(s[0]))

    def sigma(self) -> Tensor:
        """Spectral-norm estimate, in fp32 even under autocast; one power-iteration step first
        when training with grad.

        The step is ``v = normalize(W u)``, ``u = normalize(W^T v)``, ``sigma = v^T W u`` (the
        official code's order). ``W^T v`` is computed once, with grad, and serves both the new
        ``u`` and ``sigma = (W^T v) . u`` (= ``||W^T v||``; gradient ``v u^T`` as in the paper)."""
        with torch.autocast(self.weight.device.type, enabled=False):
            w = self.weight.float().flatten(1)
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

    def _weight_for_call(self) -> Tensor:
        w_hat, self._batched_weight = self._batched_weight, None  # a batched W_hat serves this one call
        return self.effective_weight() if w_hat is None else w_hat


class SigmaReparamLinear(_SigmaReparam, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_sigma(device, dtype)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> SigmaReparamLinear:
        """The reparametrised ``lin``, computing the same function at the start; it keeps ``lin``'s
        weight and bias parameters (GPT's head stays tied to the token embedding)."""
        w = lin.weight
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
        new._adopt(lin)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._weight_for_call(), self.bias)


class SigmaReparamConv2d(_SigmaReparam, nn.Conv2d):
    """sigmaReparam of a convolution (Zhai et al. reparametrise the patch embedding too): sigma of the
    kernel as the matrix ``[out, in * kh * kw]`` it applies to each patch; one power step per
    training forward, run by the layer itself (not batched: a model has one patch embedding)."""

    def __init__(self, *args, device=None, dtype=None, **kwargs):
        super().__init__(*args, device=device, dtype=dtype, **kwargs)
        self._init_sigma(device, dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> SigmaReparamConv2d:
        w = conv.weight
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
        new._adopt(conv)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self._weight_for_call(), self.bias)


def batched_power_step(layers: list[SigmaReparamLinear]) -> tuple[Tensor, Tensor, Tensor]:
    """One power-iteration step for layers whose weights share shape, dtype and device, as
    :meth:`SigmaReparamLinear.sigma` does for one layer: ``v = normalize(W u)``, ``W^T v`` with
    grad, ``u = normalize(W^T v)``, ``sigma = (W^T v) . u``; fp32, autocast off. Writes the new
    ``u``, ``v`` to every layer's buffers and returns ``(W_hat [n, out, in], old u [n, in], old v
    [n, out])`` with ``W_hat_i = W_i * (gamma_i / sigma_i)`` (the gradient reaches each weight and
    gamma through it, as :meth:`SigmaReparamLinear.effective_weight`'s does)."""
    weight = layers[0].weight
    with torch.autocast(weight.device.type, enabled=False):
        ws = torch.stack([m.weight for m in layers])           # [n, out, in]
        w = ws.float()
        u_old = torch.stack([m.u for m in layers])            # [n, in]
        v_old = torch.stack([m.v for m in layers])            # [n, out]
        with torch.no_grad():
            v = F.normalize(torch.bmm(w, u_old.unsqueeze(2)).squeeze(2), dim=1)
        wt_v = torch.bmm(v.unsqueeze(1), w).squeeze(1)       # (W^T v)^T, with grad
        u = F.normalize(wt_v.detach(), dim=1)
        sigma = (wt_v * u).sum(1)
        scale = (torch.stack([m.gamma for m in layers]).float() / sigma).to(ws.dtype)
        w_hat = ws * scale.view(-1, 1, 1)
        with torch.no_grad():
            torch._foreach_copy_([m.u for m in layers], list(u.unbind(0)))
            torch._foreach_copy_([m.v for m in layers], list(v.unbind(0)))
    return w_hat, u_old, v_old


def pre_forward(model: nn.Module, args) -> None:
    """Forward pre-hook of a reparametrised model: the batched power step of its training layers,
    one per (shape, dtype, device) group, and each layer's effective weight for this forward."""
    if not (model.training and torch.is_grad_enabled() and getattr(model, "sigma_reparam_batched", True)):
        return
    groups: dict[tuple, list[SigmaReparamLinear]] = defaultdict(list)
    for m in model.modules():
        if isinstance(m, SigmaReparamLinear) and m.training:
            groups[(tuple(m.weight.shape), m.weight.dtype, m.weight.device)].append(m)
    pending = []
    for layers in groups.values():
        w_hat, u_old, v_old = batched_power_step(layers)
        for m, w in zip(layers, w_hat.unbind(0)):
            m._batched_weight = w
        pending.append((layers, u_old, v_old))
    model._sigma_reparam_pending = pending


def post_forward(model: nn.Module, args, output) -> None:
    """Forward hook (also on an exception): drop the effective weights this forward did not use and
    give the layers that did not run their previous ``u``, ``v``, so nothing leaks into the next
    forward."""
    pending = model.__dict__.pop("_sigma_reparam_pending", None) or []
    for layers, u_old, v_old in pending:
        for i, m in enumerate(layers):
            if m._batched_weight is not None:
                m._batched_weight = None
                with torch.no_grad():
                    m.u.copy_(u_old[i])
                    m.v.copy_(v_old[i])

# SCOPES (the registry's, workloads.stabilizers): ``blocks``: every ``nn.Linear`` of the Transformer
# blocks (the default); ``all``: every ``nn.Linear`` and ``nn.Conv2d`` of the model (the patch
# embedding, the classifier head, GPT's tied output head), the scope of Zhai et al.


def apply_sigma_reparam(model: nn.Module, scope: str = "blocks") -> nn.Module:
    """Replace ``nn.Linear`` (and, with ``scope="all"``, ``nn.Conv2d``) modules by their
    sigmaReparam versions, keeping their parameters (the reparametrised layer computes the same
    function at the start; a tied weight stays tied).

    ``scope="blocks"``: the Linears of ``model.transformer_blocks()`` when the model defines it
    (attention and MLP of every block, Swin's patch merging; embeddings, heads and the patch
    embedding stay as they are), else of the whole module. ``scope="all"``: every Linear and conv
    of the model, as in Zhai et al. (ViT / Swin: the patch embedding conv and the classifier head
    too; GPT: its output head, whose weight is the token embedding's: the lookup reads the raw
    embedding, the head its reparametrised version). Embedding tables are not Linear layers and stay.
    """
    if scope not in SCOPES:
        raise ValueError(f"stabilizer_options.sigma_reparam.scope: {scope!r} is not allowed; allowed: {list(SCOPES)}")
    root = model if scope == "all" or not hasattr(model, "transformer_blocks") else model.transformer_blocks()
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, SigmaReparamLinear.from_linear(child))
                count += 1
            elif scope == "all" and type(child) is nn.Conv2d:
                setattr(parent, name, SigmaReparamConv2d.from_conv(child))
                count += 1
    if count == 0:
        raise ValueError("apply_sigma_reparam: no nn.Linear found to reparametrise")
    if not getattr(model, "_sigma_reparam_hooked", False):
        model.register_forward_pre_hook(pre_forward)
        model.register_forward_hook(post_forward, always_call=True)
        model._sigma_reparam_hooked = True
    return model
