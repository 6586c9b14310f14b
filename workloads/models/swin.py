"""Swin Transformer (Liu et al. 2021) from timm, sized for small images.

    z'_l = W-MSA(LN(z_{l-1})) + z_{l-1},    z_l = MLP(LN(z'_l)) + z'_l
    z'_{l+1} = SW-MSA(LN(z_l)) + z_l,       z_{l+1} = MLP(LN(z'_{l+1})) + z'_{l+1}     (Eq. 3)
    Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V                             (Eq. 4)

Built with ``timm.models.swin_transformer.SwinTransformer`` (no pretrained weights) with two stages:
``depth`` blocks in all, ``heads`` heads in stage 1 and twice that in stage 2 (width doubles at the
patch merging). timm's ``WindowAttention`` has no QK-norm of its own, so ``qk_norm`` wraps its
``qkv`` with :class:`workloads.attention.QKNormQKV`; MLRA replaces ``qkv``.
"""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer, WindowAttention

from workloads.attention import QKNormQKV, effective_weight
from workloads.models.timm_common import TimmClassifier


def build_swin(*, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
               depth: int = 4, width: int = 64, heads: int = 2, window_size: int = 4,
               mlp_ratio: float = 4.0, qkv_bias: bool = True, dropout: float = 0.0,
               qk_norm: bool = False, attention: str = "standard", mlra_rank: int | None = None
               ) -> TimmClassifier:
    if depth < 2:
        raise ValueError(f"swin needs depth >= 2 (two stages), got {depth}")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} not divisible by patch_size {patch_size}")
    depths = (depth // 2, depth - depth // 2)
    net = SwinTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=width, depths=depths, num_heads=(heads, 2 * heads), window_size=window_size,
        mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=dropout)
    model = TimmClassifier(net, net.layers, WindowAttention)
    if attention == "mlra":
        model.use_mlra(mlra_rank)
    elif attention != "standard":
        raise ValueError(f"attention: unknown {attention!r}; allowed: ['standard', 'mlra']")
    if qk_norm:
        for a in model.attn_modules:
            head_dim = effective_weight(a.qkv).shape[0] // 3 // a.num_heads
            a.qkv = QKNormQKV(a.qkv, a.num_heads, head_dim)
    return model
