"""Models: ``gpt`` (nanoGPT-style, ours), ``vit`` and ``swin`` (timm's).

Every model is an ``nn.Module`` with the probe interface the trial loop relies on:
  ``loss(x, y) -> Tensor``                      training objective on a batch
  ``transformer_blocks() -> nn.Module``         the blocks (scope of sigmaReparam, per-layer norms)
  ``layers() -> [nn.Module, ...]``              one module per attention layer, in forward order
  ``qk_weights() -> [(W_q, W_k, heads), ...]``  effective query/key projections, one per layer
  ``token_embedding() -> Tensor | None``        the token embedding matrix (for TEV)
  ``capture_attention()``                       context manager yielding an ``AttentionStats`` that
                                                the forward passes inside it fill, layer by layer
"""

from workloads.models.gpt import GPT, GPTConfig
from workloads.models.swin import build_swin
from workloads.models.vit import build_vit

WORKLOADS = ("gpt", "vit", "swin")

__all__ = ["GPT", "GPTConfig", "WORKLOADS", "build_swin", "build_vit"]
