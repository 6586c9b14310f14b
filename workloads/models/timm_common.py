"""The probe interface around a timm classifier, shared by ViT and Swin.

timm's own modules are used unchanged. Stabilizers reach them as timm allows: ``qk_norm`` through
timm's constructor argument where it has one, MLRA and QK-norm elsewhere by replacing an attention
module's ``qkv`` projection (timm's layout ``[q | k | v]`` is kept), sigmaReparam by swapping the
``nn.Linear`` modules of the blocks. Attention statistics are read by forward hooks that exist only
inside :meth:`TimmClassifier.capture_attention`, so ordinary steps run timm's fused kernels.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workloads.attention import LowRankQKV, split_qk
from workloads.probes import AttentionStats


class TimmClassifier(nn.Module):
    def __init__(self, net: nn.Module, blocks: nn.Module, attn_type: type):
        super().__init__()
        self.net = net
        self._blocks = [blocks]  # not registered twice
        self.attn_modules = [m for m in net.modules() if isinstance(m, attn_type)]
        if not self.attn_modules:
            raise ValueError(f"no {attn_type.__name__} modules found in {type(net).__name__}")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self(x).float(), y)

    def transformer_blocks(self) -> nn.Module:
        return self._blocks[0]

    def qk_weights(self) -> list[tuple[Tensor, Tensor, int]]:
        return [(*split_qk(a.qkv), a.num_heads) for a in self.attn_modules]

    def layers(self) -> list[nn.Module]:
        """One module per attention layer (the block that holds it), in forward order."""
        return [m for m in self.net.modules() if getattr(m, "attn", None) in self.attn_modules]

    def token_embedding(self) -> Tensor | None:
        return None  # images have no token vocabulary

    def use_mlra(self, rank: int | None) -> None:
        for a in self.attn_modules:
            old = a.qkv
            dim, heads = old.in_features, a.num_heads
            r = rank or max(1, (dim // heads) // 2)
            a.qkv = LowRankQKV(dim, heads, r, bias=old.bias is not None).to(old.weight.device)

    @contextlib.contextmanager
    def capture_attention(self):
        stats = AttentionStats()
        handles = []
        saved = []
        for a in self.attn_modules:
            saved.append(getattr(a, "fused_attn", None))
            if saved[-1] is not None:
                a.fused_attn = False
            handles += self._attention_hooks(a, stats)
        try:
            yield stats
        finally:
            for h in handles:
                h.remove()
            for a, f in zip(self.attn_modules, saved):
                if f is not None:
                    a.fused_attn = f

    def _attention_hooks(self, attn: nn.Module, stats: AttentionStats) -> list:
        """Hooks that feed ``stats`` with (probs, logits) of one attention module."""
        if isinstance(getattr(attn, "softmax", None), nn.Softmax):
            # Swin: the pre-softmax input is the full logit (q k^T scale + rel. pos. bias + mask).
            def pre(_m, args):
                logits = args[0].detach()
                stats.add(logits.float().softmax(-1), logits)
            return [attn.softmax.register_forward_pre_hook(pre)]

        # ViT: q and k after timm's q_norm / k_norm, then the unmasked scaled dot product.
        captured: dict[str, Tensor] = {}

        def grab(key):
            def hook(_m, _args, out):
                captured[key] = out.detach()
                if "q" in captured and "k" in captured:
                    q, k = captured.pop("q"), captured.pop("k")
                    logits = (q.float() @ k.float().transpose(-2, -1)) * attn.scale
                    stats.add(logits.softmax(-1), logits)
            return hook
        return [attn.q_norm.register_forward_hook(grab("q")), attn.k_norm.register_forward_hook(grab("k"))]


@torch.no_grad()
def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
