"""The probe interface around a timm classifier, shared by ViT and Swin.

timm's own modules are used unchanged. Stabilizers reach them as timm allows: ``qk_norm`` through
timm's constructor argument where it has one, MLRA and QK-norm elsewhere by replacing an attention
module's ``qkv`` projection (timm's layout ``[q | k | v]`` is kept), sigmaReparam by swapping the
``nn.Linear`` modules of the blocks. Attention statistics are read by forward hooks that exist only
inside :meth:`TimmClassifier.capture_attention`; they do not change what timm computes (ViT keeps
its fused kernel on probe steps too).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workloads.attention import LowRankQKV, qk_rank, split_qk
from workloads.probes import PROBE_BATCH, AttentionStats


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

    def qk_ranks(self) -> list[int]:
        return [qk_rank(a.qkv, a.num_heads) for a in self.attn_modules]

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
    def capture_attention(self, batch: int | None = PROBE_BATCH):
        """Yields an :class:`AttentionStats` that every forward inside fills, one record per
        attention module, from the first ``batch`` images (``None``: all), in chunks of query rows
        (see :class:`AttentionStats`). Hooks exist only inside the context:

        * ViT: forward hooks on timm's ``q_norm`` / ``k_norm`` (``nn.Identity`` without QK-norm)
          take the detached ``[B, heads, N, head_dim]`` queries and keys; timm's fused attention
          stays on and computes the output, as on any step.
        * Swin: a pre-hook on ``attn.softmax`` reads the logits timm forms anyway
          (``q k^T scale`` + relative position bias + shift mask, ``[B * windows, heads, N, N]``,
          image-major as timm's ``window_partition`` orders them), and measures the first
          ``batch * windows`` rows, i.e. the windows of the first ``batch`` images; ``windows`` is
          those rows over the images of the forward (read by a pre-hook on the network). That
          softmax runs only on timm's unfused path, which is timm's default for Swin (its fused
          window attention is experimental); where it was switched on, it is off inside the context.
        """
        stats = AttentionStats(batch)
        images = [0]

        def count_images(_m, args):
            images[0] = args[0].shape[0]

        handles = [self.net.register_forward_pre_hook(count_images)]
        unfused = []
        for a in self.attn_modules:
            if isinstance(getattr(a, "softmax", None), nn.Softmax):
                handles.append(a.softmax.register_forward_pre_hook(self._window_hook(stats, images)))
                if getattr(a, "fused_attn", False):
                    a.fused_attn = False
                    unfused.append(a)
            else:
                handles += self._qk_hooks(a, stats)
        try:
            yield stats
        finally:
            for h in handles:
                h.remove()
            for a in unfused:
                a.fused_attn = True

    @staticmethod
    def _window_hook(stats: AttentionStats, images: list[int]):
        """Swin: the pre-softmax input is the full logit of every window of every image."""
        def pre(_m, args):
            logits = args[0]
            windows, rest = divmod(logits.shape[0], images[0])
            if rest:
                raise RuntimeError(f"{logits.shape[0]} attention windows for {images[0]} images")
            stats.add_logits(logits, per_item=windows)
        return pre

    @staticmethod
    def _qk_hooks(attn: nn.Module, stats: AttentionStats) -> list:
        """ViT: q and k after timm's q_norm / k_norm; the unmasked scaled dot product."""
        captured: dict[str, Tensor] = {}

        def grab(key):
            def hook(_m, _args, out):
                captured[key] = out.detach()
                if "q" in captured and "k" in captured:
                    stats.add_qk(captured.pop("q"), captured.pop("k"), attn.scale)
            return hook
        return [attn.q_norm.register_forward_hook(grab("q")), attn.k_norm.register_forward_hook(grab("k"))]


@torch.no_grad()
def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
