"""Which dtype is fast on this CPU: bf16 only where it is native and measured faster, else fp32.

On an AVX2-only CPU PyTorch emulates bf16 matmuls, about 6x slower than fp32; with AVX512-BF16 or
AMX they are about 2x faster. So "auto" never assumes: it checks the instruction set, then times
one matmul of the model's own shape in both dtypes.
"""
from __future__ import annotations

import functools
import time

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_SPEEDUP = 1.2       # bf16 must beat fp32 by this much to be worth its rounding


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _seconds(a: torch.Tensor, b: torch.Tensor, reps: int = 5) -> float:
    a @ b                                   # first call: kernel selection, packing
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def probe(hidden_size: int = 576) -> tuple[float, float]:
    """(fp32 seconds, bf16 seconds) for one [256, D] x [D, 4D] matmul, the best of a few."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, hidden_size, generator=g)
    b = torch.randn(hidden_size, 4 * hidden_size, generator=g)
    return _seconds(a, b), _seconds(a.bfloat16(), b.bfloat16())


def choose(hidden_size: int = 576, flags: set[str] | None = None,
           timings: tuple[float, float] | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why) for running a model of this hidden size on this CPU."""
    flags = _cpu_flags() if flags is None else flags
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    if not native:
        return torch.float32, f"float32: this CPU ({capability}) has no native bf16 ({' or '.join(NATIVE_BF16_FLAGS)})"
    fp32, bf16 = probe(hidden_size) if timings is None else timings
    speedup = fp32 / bf16
    if speedup < MIN_SPEEDUP:
        return torch.float32, (f"float32: bf16 is native here ({native[0]}) but measured only {speedup:.2f}x "
                               f"fp32's matmul speed (needs {MIN_SPEEDUP}x)")
    return torch.bfloat16, f"bfloat16: native here ({native[0]}) and measured {speedup:.1f}x fp32's matmul speed"
