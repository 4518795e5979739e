"""Pure-PyTorch twins of the TIDE ops: the CPU path, and the reference the CUDA ops are tested against.

Each function has exactly the semantics of its op in csrc/. No vLLM import: the GPU check machine
has none.
"""
from __future__ import annotations

import torch

from ..router import rms_norm


def router_score(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor, threshold: float, active: torch.Tensor):
    """RMSNorm(x) -> Linear(D,B) -> SiLU -> Linear(B,1) -> sigmoid, all in fp32.

    x: [N, D] residual stream (any float dtype); w1 [B, D], b1 [B], w2 [B], b2 [1] (fp32);
    active: [N] bool. Returns (score [N] fp32, exit [N] bool = active & score > threshold).
    The comparison is strict, so threshold 1.0 never fires.
    """
    # the router input is what the model would see: the final norm's output in the model's dtype
    z = rms_norm(x, norm_weight, eps).float()
    hdn = torch.nn.functional.silu(z @ w1.t() + b1)
    score = torch.sigmoid(hdn @ w2 + b2)
    return score, active & (score > threshold)


def compact(exit_mask: torch.Tensor):
    """Stable split of row indices: continuing rows (mask False) first, then exited rows.

    Returns (order [N] int64, num_continuing [1] int64).
    """
    n = exit_mask.shape[0]
    idx = torch.arange(n, device=exit_mask.device)
    keep = idx[~exit_mask]
    order = torch.cat([keep, idx[exit_mask]])
    return order, torch.tensor([keep.numel()], dtype=torch.int64, device=exit_mask.device)


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] = src[i], in place."""
    dst.index_copy_(0, index, src.to(dst.dtype))


def fold_kv_weights(kv_weights: list[torch.Tensor], norm_weights: list[torch.Tensor]) -> torch.Tensor:
    """Stack each layer's [2*kv, D] K/V projection with its input-norm weight folded in, so that one
    GEMM of the un-weighted normalised state serves every deeper layer: [L*2*kv, D]."""
    return torch.cat([w * g.to(w.dtype)[None, :] for w, g in zip(kv_weights, norm_weights)])


def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int, neox: bool) -> torch.Tensor:
    """x [..., N, H, hd] rotated with cos_sin [N, rotary_dim] (cos half, then sin half)."""
    cos, sin = cos_sin.to(torch.float32).chunk(2, dim=-1)       # [N, rd/2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    xr, xp = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    if neox:
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out.to(x.dtype), xp], dim=-1)


def kv_project(x: torch.Tensor, w_stack: torch.Tensor, bias: torch.Tensor | None, eps: float,
               k_norm: torch.Tensor | None, k_norm_eps: float, cos_sin_cache: torch.Tensor,
               positions: torch.Tensor, num_layers: int, num_kv_heads: int, head_size: int,
               rotary_dim: int, neox: bool):
    """K and V of ``num_layers`` consecutive layers for frozen states x [N, D].

    w_stack [L*2*kv, D] from fold_kv_weights; bias [L*2*kv] or None; k_norm [L, hd] or None
    (Qwen3's per-head RMSNorm on K, before rotary). Returns k, v: [L, N, H, hd], in x's dtype.
    """
    n = x.shape[0]
    xf = x.float()
    u = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    kv = torch.nn.functional.linear(u, w_stack.to(x.dtype), None if bias is None else bias.to(x.dtype))
    kv = kv.view(n, num_layers, 2, num_kv_heads, head_size).permute(2, 1, 0, 3, 4)   # [2, L, N, H, hd]
    k, v = kv[0], kv[1]
    if k_norm is not None:
        k = rms_norm(k, k_norm[:, None, None, :], k_norm_eps)
    k = apply_rotary(k, cos_sin_cache.index_select(0, positions), rotary_dim, neox)
    return k.contiguous(), v.contiguous()


def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                   slots: torch.Tensor) -> None:
    """Write k, v [L, N, H, hd] into each layer's paged cache at slots [L, N] (-1: skip).

    Caches are strided views shaped [num_blocks, block_size, H, hd], whatever the backend's layout.
    """
    for j in range(k.shape[0]):
        s = slots[j]
        ok = s >= 0
        s = s[ok]
        bs = k_caches[j].shape[1]
        blk, off = s // bs, s % bs
        k_caches[j][blk, off] = k[j][ok].to(k_caches[j].dtype)
        v_caches[j][blk, off] = v[j][ok].to(v_caches[j].dtype)
