"""Benchmark the TIDE CUDA ops against their PyTorch twins at Llama-3-8B shapes (GPU only, no vLLM).

    python benchmarks/ops_bench.py [--json FILE]
"""
import argparse
import json
import time

import torch

import vllm_tide.ops as ops
from vllm_tide.ops import reference as ref

D, LAYERS, KV_HEADS, HD, B = 4096, 32, 8, 128, 128
TOKENS = (1, 8, 64, 512, 4096)
DEEP = 16                       # layers filled after an exit at layer 15


def bench(fn, reps=50):
    """Median milliseconds over reps, with CUDA events, after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    args = p.parse_args()
    assert ops.CUDA_LIBRARY, "build the ops first (make ops)"
    dev, bf = "cuda", torch.bfloat16
    big = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_ms = bench(lambda: dst.copy_(big))
    copy_gbs = 2 * big.numel() / copy_ms / 1e6
    a = torch.randn(8192, 8192, device=dev, dtype=bf)
    mm_ms = bench(lambda: a @ a, reps=20)
    mm_tflops = 2 * 8192 ** 3 / mm_ms / 1e9
    rows, results = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "date": time.strftime("%Y-%m-%d"), "copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": mm_tflops}
    w1, b1 = torch.randn(B, D, device=dev) / D ** 0.5, torch.randn(B, device=dev) * 0.1
    w2, b2 = torch.randn(B, device=dev) / B ** 0.5, torch.randn(1, device=dev)
    nw = torch.rand(D, device=dev) + 0.5
    w_stack = torch.randn(DEEP * 2 * KV_HEADS * HD, D, device=dev, dtype=bf) / D ** 0.5
    cos_sin = torch.randn(8192, HD, device=dev)
    nblocks, bs = 4096, 16
    caches = torch.empty(DEEP, 2, nblocks, bs, KV_HEADS, HD, device=dev, dtype=bf)
    kc, vc = [caches[j, 0] for j in range(DEEP)], [caches[j, 1] for j in range(DEEP)]
    for n in TOKENS:
        x = torch.randn(n, D, device=dev, dtype=bf)
        active = torch.ones(n, dtype=torch.bool, device=dev)
        r_args = (x, nw, 1e-5, w1, b1, w2, b2, 0.5, active)
        t_op = bench(lambda: torch.ops.tide.router_score(*r_args))
        t_tw = bench(lambda: ref.router_score(*r_args))
        rows.append(("router_score", n, t_op, t_tw, ""))
        mask = torch.rand(n, device=dev) > 0.5
        rows.append(("compact", n, bench(lambda: torch.ops.tide.compact(mask)), bench(lambda: ref.compact(mask)), ""))
        pos = torch.randint(0, 8192, (n,), device=dev)
        k_args = (x, w_stack, None, 1e-5, None, 0.0, cos_sin, pos, DEEP, KV_HEADS, HD, HD, True)
        t_op = bench(lambda: torch.ops.tide.kv_project(*k_args))
        t_tw = bench(lambda: ref.kv_project(*k_args))
        t_gemm = bench(lambda: x @ w_stack.t())
        gemm_tf = 2 * n * D * w_stack.shape[0] / t_gemm / 1e9
        rows.append(("kv_project", n, t_op, t_tw, f"GEMM alone {t_gemm:.4f} ms = {gemm_tf:.1f} TFLOP/s "
                                                    f"({100 * gemm_tf / mm_tflops:.0f}% of measured matmul rate)"))
        k, v = ref.kv_project(*k_args)
        slots = torch.stack([torch.randperm(nblocks * bs, device=dev)[:n] for _ in range(DEEP)])
        t_op = bench(lambda: torch.ops.tide.kv_cache_write(k, v, kc, vc, slots))
        t_tw = bench(lambda: ref.kv_cache_write(k, v, kc, vc, slots))
        moved = 2 * 2 * k.numel() * k.element_size()        # K and V read, then written
        gbs = moved / t_op / 1e6
        rows.append(("kv_cache_write", n, t_op, t_tw, f"{gbs:.0f} GB/s = {100 * gbs / copy_gbs:.0f}% of copy bandwidth"))
    results["rows"] = [dict(op=o, tokens=n, cuda_ms=a_, twin_ms=b_, speedup=b_ / a_, note=c) for o, n, a_, b_, c in rows]
    print(f"device {results['device']}, torch {results['torch']}: copy {copy_gbs:.0f} GB/s, "
          f"bf16 matmul {mm_tflops:.0f} TFLOP/s; Llama-3-8B shapes (D={D}, {DEEP} deeper layers, "
          f"{KV_HEADS} KV heads x {HD}), bf16")
    print(f"{'op':<15} {'tokens':>6} {'cuda ms':>9} {'twin ms':>9} {'speed-up':>8}  note")
    for o, n, a_, b_, c in rows:
        print(f"{o:<15} {n:>6} {a_:>9.4f} {b_:>9.4f} {b_ / a_:>7.1f}x  {c}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
