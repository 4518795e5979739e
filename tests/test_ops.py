"""TIDE ops: PyTorch twins against direct definitions (CPU, always), CUDA kernels against the twins
(GPU only). Fresh random inputs each run; outputs poisoned first so unwritten elements are caught."""
import os

import pytest
import torch

import vllm_tide.ops as ops
from vllm_tide.ops import reference as ref
from vllm_tide.router import Router, router_input

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SIZES = [1, 31, 32, 33, 1024, 1025]


def assert_same_writes(got, want):
    """Poisoned (NaN) buffers: the same elements written, with the same values; the rest untouched."""
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(want)], want[~torch.isnan(want)])


def rel_err(out, want):
    out, want = out.double(), want.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 33, 1025])
def test_router_score_matches_router_module(dtype, n):
    d, b = 96, 16
    router = Router(d, b)
    x = (torch.randn(n, d) * 3).to(dtype)
    norm_w = torch.rand(d) + 0.5
    active = torch.rand(n) > 0.3
    score, fire = ops.router_score(x, norm_w, 1e-5, router.down.weight.data, router.down.bias.data,
                                   router.up.weight.data.reshape(-1), router.up.bias.data, 0.5, active)
    with torch.no_grad():
        want = router(router_input(x, norm_w, 1e-5).float())
    assert rel_err(score, want) < 1e-5
    assert torch.equal(fire, active & (want > 0.5))


def test_threshold_one_never_fires():
    d, b = 8, 4
    x = torch.randn(64, d)
    w1, b1 = torch.zeros(b, d), torch.zeros(b)
    score, fire = ops.router_score(x, torch.ones(d), 1e-5, w1, b1, torch.zeros(b), torch.tensor([1e4]), 1.0,
                                   torch.ones(64, dtype=torch.bool))
    assert (score == 1.0).all() and not fire.any()


@pytest.mark.parametrize("n", SIZES + [100_000])
def test_compact_is_a_stable_split(n):
    mask = torch.rand(n) > 0.5
    order, count = ops.compact(mask)
    keep = [i for i in range(n) if not mask[i]] if n < 5000 else torch.nonzero(~mask).flatten().tolist()
    gone = [i for i in range(n) if mask[i]] if n < 5000 else torch.nonzero(mask).flatten().tolist()
    assert count.item() == len(keep)
    assert order.tolist() == keep + gone


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_rows(dtype):
    dst = torch.full((50, 7), float("nan"), dtype=dtype)
    idx = torch.randperm(50)[:20]
    src = torch.randn(20, 7, dtype=dtype)
    ops.scatter_rows(dst, idx, src)
    assert torch.equal(dst[idx], src)
    assert torch.isnan(dst[[i for i in range(50) if i not in set(idx.tolist())]]).all()


def _rms(x, w, eps):
    """RMSNorm in fp32, cast back (as vLLM's and HF's norms compute it); written here, not the plugin's."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def _rotate(k, cos_sin, rd, neox):
    """The textbook rotary on the first rd dims of k [N, H, hd]: neox pairs (i, i + rd/2), GPT-J pairs
    (2i, 2i + 1); cos_sin [N, rd] is cos then sin, as vLLM's cache stores them."""
    cos, sin = cos_sin.float()[:, None, : rd // 2], cos_sin.float()[:, None, rd // 2:]
    r, rest = k[..., :rd].float(), k[..., rd:]
    if neox:
        a, b = r[..., : rd // 2], r[..., rd // 2:]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = r[..., 0::2], r[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([out.to(k.dtype), rest], dim=-1)


def per_layer_kv(x, kv_w, norms, biases, knorms, eps, cos_sin, pos, heads, hd, rd, neox):
    """Direct definition: each layer's own norm, projection, k-norm and rotary, one layer at a time
    (nothing from the plugin: its own norm and rotary above)."""
    ks, vs = [], []
    for j in range(len(kv_w)):
        h = _rms(x, norms[j], eps)
        kv = h @ kv_w[j].to(x.dtype).t()
        if biases is not None:
            kv = kv + biases[j].to(x.dtype)
        k, v = kv.view(len(x), 2, heads, hd).unbind(1)
        if knorms is not None:
            k = _rms(k, knorms[j], 1e-6)
        ks.append(_rotate(k, cos_sin[pos], rd, neox))
        vs.append(v)
    return torch.stack(ks), torch.stack(vs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qwen", [False, True])
@pytest.mark.parametrize("n", [1, 33])
@pytest.mark.parametrize("neox, rd", [(True, 16), (False, 16), (True, 8)])     # rd < hd: partial rotary
def test_kv_project_matches_per_layer_definition(dtype, qwen, n, neox, rd):
    L, d, heads, hd = 3, 64, 2, 16
    x = torch.randn(n, d).to(dtype)
    kv_w = [torch.randn(2 * heads * hd, d) / 8 for _ in range(L)]
    norms = [torch.rand(d) + 0.5 for _ in range(L)]
    biases = [torch.randn(2 * heads * hd) for _ in range(L)] if qwen else None
    knorms = [torch.rand(hd) + 0.5 for _ in range(L)] if qwen else None
    cos_sin = torch.randn(100, rd)
    pos = torch.randint(0, 100, (n,))
    k, v = ops.kv_project(x, ops.fold_kv_weights(kv_w, norms), None if biases is None else torch.cat(biases), 1e-5,
                          None if knorms is None else torch.stack(knorms), 1e-6, cos_sin, pos, L, heads, hd, rd, neox)
    kw, vw = per_layer_kv(x, kv_w, norms, biases, knorms, 1e-5, cos_sin, pos, heads, hd, rd, neox)
    assert k.shape == (L, n, heads, hd)
    assert rel_err(k, kw) < TOL[dtype] * 3 and rel_err(v, vw) < TOL[dtype] * 3


@pytest.mark.parametrize("neox", [True, False])
def test_rotary_matches_vllm(neox):
    vllm_rope = pytest.importorskip("vllm.model_executor.layers.rotary_embedding")
    from vllm.config import VllmConfig, set_current_vllm_config
    with set_current_vllm_config(VllmConfig()):
        rope = vllm_rope.get_rope(64, max_position=256, is_neox_style=neox,
                                  rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    pos = torch.randint(0, 256, (9,))
    q, k = torch.randn(9, 3 * 64), torch.randn(9, 2 * 64)
    _, k_want = rope.forward_native(pos, q.clone(), k.clone())
    k_got = ref.apply_rotary(k.view(9, 2, 64), rope.cos_sin_cache[pos], rope.rotary_dim, neox)
    assert rel_err(k_got.reshape(9, -1), k_want) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_kv_cache_write_matches_cpu_backend(dtype, isa):
    """The twin's writes through strided views land exactly where vLLM's CPU backend writes the same K/V."""
    pytest.importorskip("vllm.v1.attention.backends.cpu_attn")
    from vllm import _custom_ops as vops
    from vllm_tide.kv_cache import CPU, cache_views
    blocks, heads, bs, hd, n = 6, 2, 32, 64, 40
    k = torch.randn(1, n, heads, hd).to(dtype)
    v = torch.randn(1, n, heads, hd).to(dtype)
    slots = torch.randperm(blocks * bs)[:n]
    slots[3] = -1
    backend = torch.full((blocks, heads, bs, 2 * hd), float("nan"), dtype=dtype)
    kc, vc = backend.view(blocks, heads, 2 * bs, hd).chunk(2, dim=2)
    vops.cpu_attn_reshape_and_cache(k[0], v[0], kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    mine = torch.full_like(backend, float("nan"))
    kview, vview = cache_views(mine, CPU, heads, hd)
    ops.kv_cache_write(k, v, [kview], [vview], slots[None])
    assert_same_writes(mine, backend)
    assert torch.isnan(mine).any()   # slot -1 and unused slots stay untouched


@pytest.mark.parametrize("backend", ["flash_attn", "triton_attn", "flex_attention"])
@pytest.mark.parametrize("physical", [(0, 1, 2, 3), (0, 2, 1, 3)])   # block-major HND and NHD in memory
def test_gpu_backend_cache_views_are_the_backends_own(backend, physical, monkeypatch):
    """vLLM 0.32's CUDA backends (FlashAttention, Triton, FlexAttention here; FlashInfer does not import
    without its package) keep each layer's cache as [blocks, H, bs, 2*hd].
    TIDE's views must be the very ones the backend's own do_kv_cache_update derives (same address, shape and
    strides), so the CUDA kernel writes where the backend would. The backend's CUDA-only write kernel is
    swapped for a recorder; the views come from the backend's real code."""
    from types import SimpleNamespace
    mod = pytest.importorskip(f"vllm.v1.attention.backends.{backend}")
    from vllm.v1.attention.backend import AttentionType
    from vllm_tide.kv_cache import SPLIT_CONTENT, cache_layout, cache_views
    seen = {}

    def record(key, value, key_cache, value_cache, *args):
        seen.update(k=key_cache, v=value_cache)

    writer, impl_cls = {"flash_attn": ("reshape_and_cache_flash", "FlashAttentionImpl"),
                        "triton_attn": ("triton_reshape_and_cache_flash", "TritonAttentionImpl"),
                        "flex_attention": (None, "FlexAttentionImpl")}[backend]
    if writer:
        monkeypatch.setattr(mod, writer, record, raising=False)
    else:    # flex calls torch.ops._C_cache_ops.reshape_and_cache_flash, absent from CPU builds
        ops_ns = SimpleNamespace(_C_cache_ops=SimpleNamespace(reshape_and_cache_flash=record))
        monkeypatch.setattr(mod, "torch", SimpleNamespace(ops=ops_ns))
    impl_cls = getattr(mod, impl_cls)
    blocks, heads, bs, hd, n = 5, 3, 16, 64, 7
    impl = object.__new__(impl_cls)        # its __init__ queries the CUDA platform; the update needs only these
    impl.__dict__.update(attn_type=AttentionType.DECODER, head_size=hd, num_kv_heads=heads, kv_cache_dtype="auto",
                         _is_per_token_head_quant=False)
    layer = SimpleNamespace(impl=impl, _k_scale=None, _v_scale=None)
    logical = (blocks, heads, bs, 2 * hd)
    kv_cache = torch.full([logical[i] for i in physical], float("nan")).permute(*physical)   # self-inverse orders
    assert tuple(kv_cache.shape) == logical
    k, v = torch.randn(n, heads, hd), torch.randn(n, heads, hd)
    slots = torch.randperm(blocks * bs)[:n]
    slots[2] = -1
    impl_cls.do_kv_cache_update(impl, layer, k, v, kv_cache, slots)
    assert cache_layout(layer) == SPLIT_CONTENT
    views = cache_views(kv_cache, cache_layout(layer), heads, hd)
    for mine, theirs in zip(views, (seen["k"], seen["v"])):
        assert (mine.data_ptr(), mine.shape, mine.stride()) == (theirs.data_ptr(), theirs.shape, theirs.stride())
    ops.kv_cache_write(k[None], v[None], [views[0]], [views[1]], slots[None])
    for t, s in enumerate(slots.tolist()):      # the backend's documented content: (B, H, N, [K | V])
        if s >= 0:
            b, off = divmod(s, bs)
            assert torch.equal(kv_cache[b, :, off, :hd], k[t]) and torch.equal(kv_cache[b, :, off, hd:], v[t])
    assert torch.isnan(kv_cache).sum().item() == (blocks * bs - (n - 1)) * heads * 2 * hd


# ----------------------------------------------------------------------------- CUDA kernels vs twins

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and ops.CUDA_LIBRARY),
                          reason="needs a CUDA device and the ops library built with `make ops`")


def test_forced_router_kernel_restores_the_callers_setting(monkeypatch):
    """Benchmarks and tests force one router kernel at a time; a setting the user made survives them."""
    env = ops.ROUTER_KERNEL_ENV
    monkeypatch.setenv(env, "cublas")
    with ops.forced_router_kernel("cuda_cores"):
        assert os.environ[env] == "cuda_cores"
    assert os.environ[env] == "cublas"
    monkeypatch.delenv(env)
    with ops.forced_router_kernel("cuda_cores"):
        assert os.environ[env] == "cuda_cores"
    assert env not in os.environ
    with pytest.raises(ValueError, match="unknown router kernel 'tensor_cores': use one of cuda_cores, cublas"):
        with ops.forced_router_kernel("tensor_cores"):
            pass
    assert env not in os.environ


# router_score picks its kernel by token count; these force one (fp32 input and shapes cuBLAS's path
# cannot take fall back to the CUDA-core kernel even when cuBLAS is forced, and must stay right)
@pytest.fixture(params=ops.ROUTER_KERNELS)
def router_path(request):
    with ops.forced_router_kernel(request.param):
        yield request.param


def check_router_score(dtype, n, d, b):
    """The CUDA op against the twin on fresh random inputs: scores to 1e-4, and every exit decision
    clear of the threshold (borderline scores may flip)."""
    args = [(torch.randn(n, d) * 2).to(dtype), torch.rand(d) + 0.5, 1e-5, torch.randn(b, d) / d ** 0.5,
            torch.randn(b) * 0.1, torch.randn(b) / b ** 0.5, torch.randn(1), 0.5, torch.rand(n) > 0.2]
    gpu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    s_ref, f_ref = ref.router_score(*args)
    s, f = torch.ops.tide.router_score(*gpu)
    assert rel_err(s.cpu(), s_ref) < 1e-4
    clear = (s_ref - 0.5).abs() > 1e-3
    assert torch.equal(f.cpu()[clear], f_ref[clear])


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES + [4096])
@pytest.mark.parametrize("d,b", [(576, 128), (896, 128), (4096, 128), (570, 96)])   # 570: the unvectorised path
def test_cuda_router_score(dtype, n, d, b, router_path):
    check_router_score(dtype, n, d, b)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,b", [(1, 4096, 128), (65, 4096, 256), (100, 512, 16), (129, 8, 32), (1025, 4096, 48),
                                   (3000, 2048, 64), (1025, 576, 272), (64, 1000, 128)])
def test_cuda_router_score_more_shapes(dtype, n, d, b, router_path):
    """Bottlenecks from 16 to 272 (48 and 272 not multiples of 32), token counts off every tile size,
    hidden sizes from 8 up (fp16 writes its norm output as two bf16 halves of 8 columns each)."""
    check_router_score(dtype, n, d, b)


@cuda
def test_cuda_router_kernel_setting_is_checked(monkeypatch):
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    args = (x, torch.ones(64, device="cuda"), 1e-5, torch.randn(16, 64, device="cuda"), torch.zeros(16, device="cuda"),
            torch.randn(16, device="cuda"), torch.zeros(1, device="cuda"), 0.5, torch.ones(4, dtype=torch.bool, device="cuda"))
    monkeypatch.setenv(ops.ROUTER_KERNEL_ENV, "tensorcores")
    with pytest.raises(RuntimeError, match="TIDE_ROUTER_KERNEL is 'tensorcores': set it to auto, cuda_cores or cublas"):
        torch.ops.tide.router_score(*args)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [33, 1025])
def test_cuda_router_score_unaligned_weights(dtype, n, router_path):
    """A down-projection that is a view 4 bytes into its storage cannot take 16-byte loads."""
    d, b = 576, 128
    w1 = (torch.randn(b * d + 1) / d ** 0.5)[1:].view(b, d)
    args = [(torch.randn(n, d) * 2).to(dtype), torch.rand(d) + 0.5, 1e-5, w1,
            torch.randn(b) * 0.1, torch.randn(b) / b ** 0.5, torch.randn(1), 0.5, torch.rand(n) > 0.2]
    gpu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    gpu[3] = (torch.randn(b * d + 1, device="cuda"))[1:].view(b, d).copy_(w1)
    assert gpu[3].data_ptr() % 16 != 0
    s_ref, _ = ref.router_score(*args)
    s, _ = torch.ops.tide.router_score(*gpu)
    assert rel_err(s.cpu(), s_ref) < 1e-4


@cuda
@pytest.mark.parametrize("n", [1, 33, 1025])
def test_cuda_router_score_float64_input(n):
    """Double inputs are dispatched too; their staged input cannot take the 8-byte half-precision loads."""
    check_router_score(torch.float64, n, 576, 128)


@cuda
@pytest.mark.parametrize("n", SIZES + [100_000])
def test_cuda_compact(n):
    mask = torch.rand(n) > 0.5
    order, count = torch.ops.tide.compact(mask.cuda())
    o_ref, c_ref = ref.compact(mask)
    assert torch.equal(order.cpu(), o_ref) and torch.equal(count.cpu(), c_ref)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 33, 1025])
def test_cuda_scatter_rows(dtype, n):
    dst = torch.full((n + 7, 300), float("nan"), dtype=dtype, device="cuda")
    idx = torch.randperm(n + 7, device="cuda")[:n]
    src = torch.randn(n, 300, dtype=dtype, device="cuda")
    want = dst.clone().cpu()
    ref.scatter_rows(want, idx.cpu(), src.cpu())
    torch.ops.tide.scatter_rows(dst, idx, src)
    assert_same_writes(dst.cpu(), want)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qwen", [False, True])
@pytest.mark.parametrize("n", [1, 31, 33, 1025])
def test_cuda_kv_fill(dtype, qwen, n):
    L, d, heads, hd, blocks, bs = 4, 512, 8, 128, 160, 16
    x = torch.randn(n, d).to(dtype)
    w = torch.randn(L * 2 * heads * hd, d) / d ** 0.5
    bias = torch.randn(L * 2 * heads * hd) if qwen else None
    knorm = torch.rand(L, hd) + 0.5 if qwen else None
    cos_sin = torch.randn(4096, hd)
    pos = torch.randint(0, 4096, (n,))
    args = (x, w.to(dtype), bias, 1e-5, knorm, 1e-6, cos_sin, pos, L, heads, hd, hd, True)
    k_ref, v_ref = ref.kv_project(*args)
    k, v = torch.ops.tide.kv_project(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
    assert rel_err(k.cpu(), k_ref) < TOL[dtype] * 3 and rel_err(v.cpu(), v_ref) < TOL[dtype] * 3
    slots = torch.stack([torch.randperm(blocks * bs)[:n] for _ in range(L)])
    slots[:, ::7] = -1
    caches = torch.full((L, 2, blocks, bs, heads, hd), float("nan"), dtype=dtype)
    want = caches.clone()
    ref.kv_cache_write(k_ref, v_ref, [want[j, 0] for j in range(L)], [want[j, 1] for j in range(L)], slots)
    gc = caches.cuda()
    torch.ops.tide.kv_cache_write(k_ref.cuda(), v_ref.cuda(), [gc[j, 0] for j in range(L)],
                                  [gc[j, 1] for j in range(L)], slots.cuda())
    assert_same_writes(gc.cpu(), want)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("physical", [(0, 1, 2, 3), (0, 2, 1, 3)])
@pytest.mark.parametrize("n", [1, 33, 1025])
def test_cuda_kv_cache_write_through_backend_views(dtype, physical, n):
    """The layout CUDA backends give in vLLM 0.32: [blocks, H, bs, 2*hd] per layer, viewed as in the
    backends' own cache update (see test_gpu_backend_cache_views_are_the_backends_own)."""
    from vllm_tide.kv_cache import SPLIT_CONTENT, cache_views
    L, heads, hd, blocks, bs = 3, 8, 128, 80, 16
    k, v = torch.randn(L, n, heads, hd).to(dtype), torch.randn(L, n, heads, hd).to(dtype)
    slots = torch.stack([torch.randperm(blocks * bs)[:n] for _ in range(L)])
    slots[:, ::7] = -1
    logical = (blocks, heads, bs, 2 * hd)

    def layers(device):
        return [torch.full([logical[i] for i in physical], float("nan"), dtype=dtype, device=device)
                .permute(*physical) for _ in range(L)]

    def write(fn, caches, *tensors):
        views = [cache_views(c, SPLIT_CONTENT, heads, hd) for c in caches]
        fn(*tensors[:2], [kv[0] for kv in views], [kv[1] for kv in views], tensors[2])

    want, got = layers("cpu"), layers("cuda")
    write(ref.kv_cache_write, want, k, v, slots)
    write(torch.ops.tide.kv_cache_write, got, k.cuda(), v.cuda(), slots.cuda())
    for g, w in zip(got, want):
        assert_same_writes(g.cpu(), w)
