"""Benchmark the TIDE CUDA ops against their PyTorch twins at Llama-3-8B shapes (GPU only, no vLLM).

    python benchmarks/ops_bench.py [--json FILE]
    python benchmarks/ops_bench.py --smoke [--json FILE]   # tiny shapes on CPU, twin against twin:
                                                           # checks this script, measures nothing

Every op is timed two ways (medians of single calls between CUDA events, after warm-up):
- call: the GPU is idle when the call starts, so the host's work to launch it is inside the time.
  That is what an eager caller waits for (TIDE runs without CUDA graphs).
- device: a spin kernel is queued first, longer than the call's host work, so the call is fully
  enqueued before the GPU reaches it and only its kernels are timed. Bandwidth and matmul rates
  come from this column, as the copy and matmul they are compared with are timed the same way.
"""
import argparse
import json
import time

import torch

import vllm_tide.ops as ops
from vllm_tide.kv_cache import SPLIT_CONTENT, cache_views
from vllm_tide.ops import reference as ref

# DEEP: layers filled after an exit at layer 15 of 32; SWEEP: more token counts for the router kernels
# alone, to see where they cross
LLAMA3_8B = dict(D=4096, B=128, KV_HEADS=8, HD=128, DEEP=16, TOKENS=(1, 8, 64, 512, 4096), NBLOCKS=4096,
                 COPY_BYTES=1 << 28, MM=8192, REPS=30, SWEEP=(2, 4, 16, 32, 128, 256, 1024, 2048, 16384))
SMOKE = dict(D=64, B=16, KV_HEADS=2, HD=16, DEEP=2, TOKENS=(1, 33), NBLOCKS=8, COPY_BYTES=1 << 16, MM=64, REPS=3,
             SWEEP=(2,))
GOAL_ROUTER_SPEEDUP, GOAL_WRITE_FRACTION, GOAL_WRITE_MIN_TOKENS = 2.0, 0.70, 512


def median(xs):
    return sorted(xs)[len(xs) // 2]


def cuda_ms(fn, spin_cycles=0):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if spin_cycles:
        torch.cuda._sleep(spin_cycles)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def spin_cycles_per_ms():
    torch.cuda._sleep(1000)
    return 1e6 / cuda_ms(lambda: torch.cuda._sleep(1_000_000))


def bench(fn, reps, cycles_per_ms):
    """(call ms, device ms): medians over reps; see the module docstring. cycles_per_ms None: CPU wall time."""
    for _ in range(5):
        fn()
    if cycles_per_ms is None:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        return (median(times),) * 2
    torch.cuda.synchronize()
    call = median([cuda_ms(fn) for _ in range(reps)])
    spin = int((1.5 * call + 0.05) * cycles_per_ms)       # outlasts the host work, which is < the call time
    return call, median([cuda_ms(fn, spin) for _ in range(reps)])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (twins only), to check the script")
    args = p.parse_args()
    S = SMOKE if args.smoke else LLAMA3_8B
    D, B, KV_HEADS, HD, DEEP, REPS = S["D"], S["B"], S["KV_HEADS"], S["HD"], S["DEEP"], S["REPS"]
    if args.smoke:
        dev, cycles = "cpu", None
    else:
        assert ops.CUDA_LIBRARY, "build the ops first (make ops)"
        dev, cycles = "cuda", spin_cycles_per_ms()
    timed = lambda fn, reps=REPS: bench(fn, reps, cycles)   # noqa: E731
    bf = torch.bfloat16
    big = torch.empty(S["COPY_BYTES"], dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_gbs = 2 * big.numel() / timed(lambda: dst.copy_(big))[1] / 1e6
    a = torch.randn(S["MM"], S["MM"], device=dev, dtype=bf)
    mm_tflops = 2 * S["MM"] ** 3 / timed(lambda: a @ a, reps=max(2, REPS // 2))[1] / 1e9
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": mm_tflops,
               "shapes": {k: v for k, v in S.items() if k not in ("COPY_BYTES", "MM", "REPS", "SWEEP")}, "rows": [],
               "router_sweep": []}
    w1, b1 = torch.randn(B, D, device=dev) / D ** 0.5, torch.randn(B, device=dev) * 0.1
    w2, b2 = torch.randn(B, device=dev) / B ** 0.5, torch.randn(1, device=dev)
    nw = torch.rand(D, device=dev) + 0.5
    w_stack = torch.randn(DEEP * 2 * KV_HEADS * HD, D, device=dev, dtype=bf) / D ** 0.5
    cos_sin = torch.randn(8192, HD, device=dev)
    nblocks, bs = S["NBLOCKS"], 16
    # each deeper layer's cache as vLLM 0.32's CUDA backends keep it, [blocks, H, bs, 2*hd], viewed as they view it
    views = [cache_views(torch.empty(nblocks, KV_HEADS, bs, 2 * HD, device=dev, dtype=bf), SPLIT_CONTENT, KV_HEADS, HD)
             for _ in range(DEEP)]
    kc, vc = [kv[0] for kv in views], [kv[1] for kv in views]

    def row(op, n, fn_op, fn_twin, **extra):
        (op_call, op_dev), (tw_call, tw_dev) = timed(fn_op), timed(fn_twin)
        results["rows"].append(dict(op=op, tokens=n, cuda_call_ms=op_call, twin_call_ms=tw_call,
                                    cuda_device_ms=op_dev, twin_device_ms=tw_dev, speedup_call=tw_call / op_call,
                                    speedup_device=tw_dev / op_dev, **extra))
        return op_dev

    for n in S["TOKENS"]:
        x = torch.randn(n, D, device=dev, dtype=bf)
        active = torch.ones(n, dtype=torch.bool, device=dev)
        r_args = (x, nw, 1e-5, w1, b1, w2, b2, 0.5, active)
        row("router_score", n, lambda: torch.ops.tide.router_score(*r_args), lambda: ref.router_score(*r_args))
        for kernel in ops.ROUTER_KERNELS:   # each kernel forced, to see where they cross
            with ops.forced_router_kernel(kernel):
                row(f"router_score:{kernel}", n, lambda: torch.ops.tide.router_score(*r_args),
                    lambda: ref.router_score(*r_args))
        mask = torch.rand(n, device=dev) > 0.5
        row("compact", n, lambda: torch.ops.tide.compact(mask), lambda: ref.compact(mask))
        pos = torch.randint(0, 8192, (n,), device=dev)
        k_args = (x, w_stack, None, 1e-5, None, 0.0, cos_sin, pos, DEEP, KV_HEADS, HD, HD, True)
        gemm_ms = timed(lambda: x @ w_stack.t())[1]
        gemm_tf = 2 * n * D * w_stack.shape[0] / gemm_ms / 1e9
        row("kv_project", n, lambda: torch.ops.tide.kv_project(*k_args), lambda: ref.kv_project(*k_args),
            gemm_device_ms=gemm_ms, gemm_fraction_of_matmul=gemm_tf / mm_tflops,
            note=f"GEMM alone {gemm_ms:.4f} ms = {gemm_tf:.1f} TFLOP/s ({100 * gemm_tf / mm_tflops:.0f}% of matmul rate)")
        k, v = ref.kv_project(*k_args)
        slots = torch.stack([torch.randperm(nblocks * bs, device=dev)[:n] for _ in range(DEEP)])
        moved = 2 * 2 * k.numel() * k.element_size()        # K and V read, then written
        op_dev = row("kv_cache_write", n, lambda: torch.ops.tide.kv_cache_write(k, v, kc, vc, slots),
                     lambda: ref.kv_cache_write(k, v, kc, vc, slots))
        gbs = moved / op_dev / 1e6
        results["rows"][-1].update(GBps=gbs, fraction_of_copy=gbs / copy_gbs,
                                   note=f"{gbs:.0f} GB/s = {100 * gbs / copy_gbs:.0f}% of copy bandwidth")

    for n in S["SWEEP"]:                    # more token counts, router kernels only (device time)
        x = torch.randn(n, D, device=dev, dtype=bf)
        r_args = (x, nw, 1e-5, w1, b1, w2, b2, 0.5, torch.ones(n, dtype=torch.bool, device=dev))
        entry = {"tokens": n, "twin_device_ms": timed(lambda: ref.router_score(*r_args))[1]}
        for kernel in ops.ROUTER_KERNELS:
            with ops.forced_router_kernel(kernel):
                entry[f"{kernel}_call_ms"], entry[f"{kernel}_device_ms"] = timed(
                    lambda: torch.ops.tide.router_score(*r_args))
        results["router_sweep"].append(entry)

    results["goals"] = goals(results["rows"])
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def goals(rows):
    """The issue's goals, worst case over the sizes they apply to."""
    router = [e for e in rows if e["op"] == "router_score"]
    writes = [e for e in rows if e["op"] == "kv_cache_write" and e["tokens"] >= GOAL_WRITE_MIN_TOKENS]
    return {"router_min_speedup_call": min(e["speedup_call"] for e in router),
            "router_min_speedup_device": min(e["speedup_device"] for e in router),
            "cache_write_min_fraction_of_copy": min((e["fraction_of_copy"] for e in writes), default=None)}


def report(results):
    r, sh = results["rows"], results["shapes"]
    print(f"device {results['device']}, torch {results['torch']}: copy {results['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {results['bf16_matmul_TFLOPs']:.0f} TFLOP/s; shapes D={sh['D']}, router bottleneck "
          f"{sh['B']}, {sh['DEEP']} deeper layers, {sh['KV_HEADS']} KV heads x {sh['HD']}, bf16")
    print(f"{'':33} {'---- call (ms) ----':>26}   {'--- device (ms) ---':>26}")
    print(f"{'op':<26} {'tokens':>6} {'cuda':>8} {'twin':>8} {'x':>7}   {'cuda':>8} {'twin':>8} {'x':>7}  note")
    for e in r:
        print(f"{e['op']:<26} {e['tokens']:>6} {e['cuda_call_ms']:>8.4f} {e['twin_call_ms']:>8.4f} "
              f"{e['speedup_call']:>6.1f}x   {e['cuda_device_ms']:>8.4f} {e['twin_device_ms']:>8.4f} "
              f"{e['speedup_device']:>6.1f}x  {e.get('note', '')}")
    print("router kernels forced, device ms (call ms): " + ", ".join(ops.ROUTER_KERNELS))
    for e in results["router_sweep"]:
        print(f"  {e['tokens']:>6} tokens  twin {e['twin_device_ms']:.4f}  " + "  ".join(
            f"{k} {e[k + '_device_ms']:.4f} ({e[k + '_call_ms']:.4f})" for k in ops.ROUTER_KERNELS))
    g = results["goals"]
    print(f"goal: router_score >= {GOAL_ROUTER_SPEEDUP:.0f}x the twin at every size: worst "
          f"{g['router_min_speedup_call']:.2f}x per call, {g['router_min_speedup_device']:.2f}x on the device")
    if g["cache_write_min_fraction_of_copy"] is not None:
        print(f"goal: kv_cache_write >= {100 * GOAL_WRITE_FRACTION:.0f}% of copy bandwidth at >= "
              f"{GOAL_WRITE_MIN_TOKENS} tokens: worst {100 * g['cache_write_min_fraction_of_copy']:.0f}%")


if __name__ == "__main__":
    main()
