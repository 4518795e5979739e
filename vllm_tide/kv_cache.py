"""Writing propagated K/V into vLLM's paged caches, whatever the attention backend.

Caches whose layout is a strided view of [num_blocks, block_size, H, hd] go through the single
``tide::kv_cache_write`` op (CUDA kernel or its twin). Any other layout falls back to the backend's
own cache-update call, one layer at a time.
"""
from __future__ import annotations

import torch

from . import ops

CPU = "cpu"
SPLIT_CONTENT = "split-content"

_CPU_PLAIN_ISAS = ("vec", "vec16")
# vLLM 0.32's CUDA backends whose per-layer cache is [blocks, H, block_size, 2*hd] (a strided view
# in any of vLLM's physical layouts) with K then V in the last dimension: each one's own
# do_kv_cache_update takes `kv_cache.transpose(1, 2).split(head_size, dim=-1)`. Their quantized
# variants change the content and are excluded by the dtype check in write_layers_kv.
_SPLIT_CONTENT_IMPLS = ("FlashAttentionImpl", "TritonAttentionImpl", "FlashInferImpl", "FlexAttentionImpl")


def cache_layout(attn_layer) -> str | None:
    """The layout family of an attention layer's cache, or None when TIDE does not know it."""
    if getattr(attn_layer, "isa", None) in _CPU_PLAIN_ISAS:     # set on the layers by the CPU backend
        return CPU
    if type(getattr(attn_layer, "impl", None)).__name__ in _SPLIT_CONTENT_IMPLS:
        return SPLIT_CONTENT
    return None


def cache_views(kv_cache: torch.Tensor, layout: str | None, num_kv_heads: int, head_size: int):
    """(K view, V view), each [num_blocks, block_size, H, hd], or None for an unknown layout."""
    if kv_cache.dim() != 4 or kv_cache.shape[1] != num_kv_heads:
        return None
    if layout == SPLIT_CONTENT and kv_cache.shape[3] == 2 * head_size:
        return kv_cache.transpose(1, 2).split(head_size, dim=-1)
    if layout == CPU:
        # vLLM CPU backend: [blocks, H, bs, 2*hd] = per block and head, K as [hd, bs] then V as [bs, hd]
        nb, h, bs, _ = kv_cache.shape
        k, v = kv_cache.view(nb, h, 2 * bs, head_size).chunk(2, dim=2)
        return k.view(nb, h, head_size, bs).permute(0, 3, 1, 2), v.permute(0, 2, 1, 3)
    return None


def write_layers_kv(layer_names: list[str], k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v: [L, N, H, hd] for the named layers, in order; slots come from the forward context."""
    from vllm.forward_context import get_forward_context
    from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
    ctx = get_forward_context()
    layers = [ctx.no_compile_layers[name] for name in layer_names]
    views = [cache_views(a.kv_cache, cache_layout(a), k.shape[2], k.shape[3]) for a in layers]
    if all(view is not None for view in views) and all(a.kv_cache.dtype == k.dtype for a in layers):
        slots = torch.stack([ctx.slot_mapping[name][: k.shape[1]] for name in layer_names])
        ops.kv_cache_write(k, v, [kv[0] for kv in views], [kv[1] for kv in views], slots)
        return
    for j, name in enumerate(layer_names):
        unified_kv_cache_update(k[j], v[j], name)
