"""What is a matrix: the one rule that Weyl smoothing (``WeylAdamW``) and weight decay share, on
GPT, ViT and Swin alike (issue 20).

A parameter is a **matrix** when it maps features to features: the weight of an ``nn.Linear``
(``[out, in]``; sigmaReparam's too), of a convolution (the patch embedding, taken as the matrix
``[out, in * kh * kw]`` it applies to each patch), and a per-head factor marked with
``matrix_batch_dims = k`` (MLRA's ``up``, ``[3H, r, d_h]``: 3H matrices ``r x d_h``, each on its
own). Everything else is **not** a matrix, whatever its shape:

| kind            | what                                                                 |
| --------------- | -------------------------------------------------------------------- |
| ``matrix``      | Linear and conv weights, per-head factors                           |
| ``embedding``   | token and position embeddings (``nn.Embedding``; timm's ``pos_embed``, ``absolute_pos_embed``): looked up or added, not multiplied |
| ``position_bias`` | relative position bias tables (Swin's ``relative_position_bias_table``) |
| ``class_token`` | timm's ``cls_token`` / ``reg_token`` / ``dist_token``                 |
| ``norm``        | LayerNorm (and other norm) weights and biases                        |
| ``bias``        | biases of Linear and conv layers and of fused projections            |
| ``gain``        | sigmaReparam's scalar gamma                                         |

A tensor with several uses takes the kind of its non-matrix use: GPT's output head is tied to the
token embedding, so that one tensor is an ``embedding``. This matches what timm excludes from weight
decay (``no_weight_decay``: position embeddings, class tokens, relative position bias tables) and
nanoGPT-style practice for norms and biases; unlike nanoGPT, embeddings are not decayed either.

:func:`mark` sets ``p.param_kind`` on every parameter of a model (``workloads.trainer`` does it when it
builds the optimizer); ``workloads.stabilizers.weyl.matrix_shape`` reads it. A parameter outside an
ablate model (no ``param_kind``) falls back to its shape there.
"""

from __future__ import annotations

from torch import nn

KINDS = ("matrix", "embedding", "position_bias", "class_token", "norm", "bias", "gain")

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
_EMBEDDING_NAMES = ("pos_embed", "absolute_pos_embed")
_TOKEN_NAMES = ("cls_token", "reg_token", "dist_token")


def _kind(module: nn.Module, attr: str, p: nn.Parameter, name: str) -> str:
    if isinstance(module, _NORMS):
        return "norm"
    if attr == "bias":
        return "bias"
    if isinstance(module, nn.Embedding) or attr in _EMBEDDING_NAMES:
        return "embedding"
    if attr == "relative_position_bias_table":
        return "position_bias"
    if attr in _TOKEN_NAMES:
        return "class_token"
    if attr == "gamma" and p.dim() == 0:
        return "gain"
    if attr == "weight" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "matrix"
    if getattr(p, "matrix_batch_dims", 0):
        return "matrix"
    raise ValueError(f"{name} ({type(module).__name__}.{attr}, shape {tuple(p.shape)}): no rule says "
                     f"what kind of tensor this is; extend workloads.matrices")


def classify(model: nn.Module) -> dict[str, str]:
    """``{parameter name: kind}`` for every parameter of ``model`` (a tied tensor under its first
    name), by the rule of the module docstring."""
    kinds: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            k = _kind(module, attr, p, f"{mod_name}.{attr}" if mod_name else attr)
            prev = kinds.get(id(p))
            kinds[id(p)] = k if prev in (None, "matrix") else prev  # a non-matrix use wins
    return {name: kinds[id(p)] for name, p in model.named_parameters()}


def mark(model: nn.Module) -> dict[str, str]:
    """:func:`classify`, and set ``p.param_kind`` on each parameter (read by ``matrix_shape``)."""
    kinds = classify(model)
    for name, p in model.named_parameters():
        p.param_kind = kinds[name]
    return kinds
