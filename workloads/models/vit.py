"""Vision Transformer (Dosovitskiy et al. 2021) from timm, sized for small images.

    z_0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos                          (Eq. 1)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1},  z_l = MLP(LN(z'_l)) + z'_l          (Eqs. 2-3)
    y = LN(z_L^0) W_head                                                   (Eq. 4)

Built with ``timm.models.vision_transformer.VisionTransformer`` (no pretrained weights); QK-norm
is timm's own ``qk_norm`` argument, MLRA replaces each block's ``attn.qkv``.
"""

from __future__ import annotations

from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from workloads.models.timm_common import TimmClassifier


def build_vit(*, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
              depth: int = 4, width: int = 128, heads: int = 4, mlp_ratio: float = 4.0,
              qkv_bias: bool = True, dropout: float = 0.0, qk_norm: bool = False,
              attention: str = "standard", mlra_rank: int | None = None) -> TimmClassifier:
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} not divisible by patch_size {patch_size}")
    net = VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
        qk_norm=qk_norm, drop_rate=dropout, attn_drop_rate=0.0)
    model = TimmClassifier(net, net.blocks, Attention)
    if attention == "mlra":
        model.use_mlra(mlra_rank)
    elif attention != "standard":
        raise ValueError(f"attention: unknown {attention!r}; allowed: ['standard', 'mlra']")
    return model
