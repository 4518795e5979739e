"""The dispatch layer for TIDE's hot-path ops (namespace ``tide``).

Every op is a torch custom op with a fake (meta) implementation, so torch.compile can trace callers.
Its PyTorch twin (ops/reference.py) is registered as the CompositeExplicitAutograd kernel: it runs
on CPU and anywhere the compiled library is absent. ``make ops`` builds csrc/ into a library that
registers CUDA kernels for the same ops; when it is loaded, CUDA tensors take those kernels.

The plugin's exit path calls only the functions below; ``CALLS`` counts them so a test can prove
that no op is dead code. This module imports without vLLM.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import logging
import os

import torch

from . import reference

logger = logging.getLogger("vllm.tide.ops")
CALLS: collections.Counter = collections.Counter()

_lib = torch.library.Library("tide", "DEF")
_lib.define("router_score(Tensor x, Tensor norm_weight, float eps, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
            "float threshold, Tensor active) -> (Tensor, Tensor)")
_lib.define("compact(Tensor exit_mask) -> (Tensor, Tensor)")
_lib.define("scatter_rows(Tensor(a!) dst, Tensor index, Tensor src) -> ()")
_lib.define("kv_project(Tensor x, Tensor w_stack, Tensor? bias, float eps, Tensor? k_norm, float k_norm_eps, "
            "Tensor cos_sin_cache, Tensor positions, int num_layers, int num_kv_heads, int head_size, "
            "int rotary_dim, bool neox) -> (Tensor, Tensor)")
_lib.define("kv_cache_write(Tensor k, Tensor v, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slots) -> ()")

for _name in ("router_score", "compact", "scatter_rows", "kv_project", "kv_cache_write"):
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


@torch.library.register_fake("tide::router_score")
def _router_score_fake(x, norm_weight, eps, w1, b1, w2, b2, threshold, active):
    return x.new_empty(x.shape[0], dtype=torch.float32), active.new_empty(x.shape[0], dtype=torch.bool)


@torch.library.register_fake("tide::compact")
def _compact_fake(exit_mask):
    return exit_mask.new_empty(exit_mask.shape[0], dtype=torch.int64), exit_mask.new_empty(1, dtype=torch.int64)


@torch.library.register_fake("tide::scatter_rows")
def _scatter_rows_fake(dst, index, src):
    return None


@torch.library.register_fake("tide::kv_project")
def _kv_project_fake(x, w_stack, bias, eps, k_norm, k_norm_eps, cos_sin_cache, positions, num_layers,
                     num_kv_heads, head_size, rotary_dim, neox):
    shape = (num_layers, x.shape[0], num_kv_heads, head_size)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.register_fake("tide::kv_cache_write")
def _kv_cache_write_fake(k, v, k_caches, v_caches, slots):
    return None


def library_candidates() -> list[str]:
    """Where the CUDA library is looked for, in order: $TIDE_OPS_LIBRARY; the installed package's own
    folder (where `cmake --install build/ops --prefix SITE_PACKAGES` puts it); a repo checkout's build/ops."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [os.environ.get("TIDE_OPS_LIBRARY", "")]
    candidates += sorted(glob.glob(os.path.join(package, "*tide_ops*.so")))
    candidates += sorted(glob.glob(os.path.join(os.path.dirname(package), "build", "ops", "*tide_ops*.so")))
    return [c for c in candidates if c]


def _load_cuda_library() -> str | None:
    """Load the CMake-built library (``make ops``) if present. Returns its path."""
    if not torch.cuda.is_available():
        return None
    for path in library_candidates():
        if path and os.path.exists(path):
            torch.ops.load_library(path)
            return path
    return None


CUDA_LIBRARY = _load_cuda_library()

# The CUDA library has two router_score kernels: CUDA cores (small batches) and cuBLAS on bf16 tensor
# cores with exact splits of the fp32 weights (from 128 tokens); it picks one by token count. This
# variable, read on every call, forces one ("auto" or unset: pick).
ROUTER_KERNEL_ENV = "TIDE_ROUTER_KERNEL"
ROUTER_KERNELS = ("cuda_cores", "cublas")


@contextlib.contextmanager
def forced_router_kernel(kernel: str):
    """Run router_score with one kernel (one of ROUTER_KERNELS), restoring the variable after."""
    if kernel not in ROUTER_KERNELS:
        raise ValueError(f"unknown router kernel {kernel!r}: use one of {', '.join(ROUTER_KERNELS)}")
    before = os.environ.get(ROUTER_KERNEL_ENV)
    os.environ[ROUTER_KERNEL_ENV] = kernel
    try:
        yield
    finally:
        if before is None:
            del os.environ[ROUTER_KERNEL_ENV]
        else:
            os.environ[ROUTER_KERNEL_ENV] = before


ACTIVE_PATH = (f"CUDA kernels from {CUDA_LIBRARY}" if CUDA_LIBRARY else
               "PyTorch reference ops" + (" (CUDA library not built: run `make ops`)" if torch.cuda.is_available() else ""))
logger.info("TIDE ops: %s", ACTIVE_PATH)


# ----------------------------------------------------------------------------- the exit path's entry points

def router_score(x, norm_weight, eps, w1, b1, w2, b2, threshold, active):
    CALLS["router_score"] += 1
    return torch.ops.tide.router_score(x, norm_weight, eps, w1, b1, w2, b2, threshold, active)


def compact(exit_mask):
    CALLS["compact"] += 1
    return torch.ops.tide.compact(exit_mask)


def scatter_rows(dst, index, src) -> None:
    CALLS["scatter_rows"] += 1
    torch.ops.tide.scatter_rows(dst, index, src)


def kv_project(x, w_stack, bias, eps, k_norm, k_norm_eps, cos_sin_cache, positions, num_layers, num_kv_heads,
               head_size, rotary_dim, neox):
    CALLS["kv_project"] += 1
    return torch.ops.tide.kv_project(x, w_stack, bias, eps, k_norm, k_norm_eps, cos_sin_cache, positions,
                                     num_layers, num_kv_heads, head_size, rotary_dim, neox)


def kv_cache_write(k, v, k_caches, v_caches, slots) -> None:
    CALLS["kv_cache_write"] += 1
    torch.ops.tide.kv_cache_write(k, v, k_caches, v_caches, slots)


fold_kv_weights = reference.fold_kv_weights
