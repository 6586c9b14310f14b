"""Models: ``gpt`` (nanoGPT-style, ours), ``vit`` and ``swin`` (timm's).

Every model is an ``nn.Module`` with the probe interface the trial loop relies on:
  ``loss(x, y) -> Tensor``                      training objective on a batch
  ``transformer_blocks() -> nn.Module``         the blocks (scope of sigmaReparam)
  ``layers() -> [nn.Module, ...]``              one module per attention layer, in forward order
  ``qk_weights() -> [(W_q, W_k, heads), ...]``  effective query/key projections, one per layer
  ``qk_ranks() -> [int, ...]``                  rank of W_q[h]^T W_k[h]'s factorisation per layer
                                                (d_h, or MLRA's r): the floor 1/r of SEC
  ``token_embedding() -> Tensor | None``        the token embedding matrix (for TEV)
  ``capture_attention(batch=PROBE_BATCH)``      context manager yielding an ``AttentionStats`` that
                                                the forward passes inside it fill, layer by layer,
                                                from every item of the batch (an int ``batch``:
                                                the first that many), without changing what the
                                                forward computes

timm is imported only when a ViT or Swin is built, so GPT trials start faster; torch only when a
model is (``WORKLOADS`` is read by the spec's validation, which imports no torch).
"""

WORKLOADS = ("gpt", "vit", "swin")


def __getattr__(name: str):
    if name in ("GPT", "GPTConfig"):
        from workloads.models import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_vit(**kwargs):
    from workloads.models.vit import build_vit as build

    return build(**kwargs)


def build_swin(**kwargs):
    from workloads.models.swin import build_swin as build

    return build(**kwargs)


__all__ = ["GPT", "GPTConfig", "WORKLOADS", "build_swin", "build_vit"]
