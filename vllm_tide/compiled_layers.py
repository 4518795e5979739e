"""Decoder layers run through torch.compile, as stock vLLM runs them, under TIDE's eager control flow.

Stock vLLM compiles the whole model forward (on CPU: dynamo + inductor, traced once, guards dropped).
TIDE's forward branches on exits at every checkpoint, so it cannot be one graph. Instead the layers
between two routing checkpoints form a segment, and each segment is one compiled graph: the layer
loop between routers costs one call instead of one Python module call per layer and op.

Each segment gets its own code object, so its graph is cached apart from the others; parameters and
the attention layers' names are graph inputs. Guards are dropped as vLLM drops them for its own graph,
except the shape guards dynamo always keeps: a graph is traced at a token count >= 2 with the token
dimension dynamic, and a single-token step gets its own graph (the 0/1 specialisation), so nothing
else is re-checked per call.
"""
from __future__ import annotations

import types

import torch

from .ops import CUDA_LIBRARY, reference


def _run_segment(layers, positions, h, residual):
    for layer in layers:
        h, residual = layer(positions, h, residual)
    return h, residual


def _run_segment_scored(layers, positions, h, residual, router):
    """The segment, then its end checkpoint's router score for every row, in the same graph.

    With the CUDA library loaded the score is the fused CUDA op; elsewhere it is the op's PyTorch twin
    traced into the graph, so inductor fuses it with the segment's end.
    """
    for layer in layers:
        h, residual = layer(positions, h, residual)
    x = h + residual
    args = (x, *router, 2.0, x.new_ones(x.shape[0], dtype=torch.bool))    # threshold 2.0: scores only
    score = torch.ops.tide.router_score(*args)[0] if x.is_cuda and CUDA_LIBRARY else reference.router_score(*args)[0]
    return h, residual, score


class SegmentRunner:
    """``runner(layers, start, end, positions, h, residual[, router])`` runs layers start..end (inclusive).

    With ``router`` (compiled only) it also returns the router score at ``end``.
    """

    def __init__(self, backend: str | None = None, options: dict | None = None):
        self.compiled = backend is not None
        self._backend = backend
        self._options = dict(options or {})
        self._options["guard_filter_fn"] = torch.compiler.skip_all_guards_unsafe
        self._fns: dict[tuple, list] = {}     # (start, end, scored) -> [eager fn, compiled fn, layers, traced]

    @classmethod
    def for_engine(cls, vllm_config) -> "SegmentRunner":
        """Compiled like the stock model unless the engine runs eagerly (enforce_eager / mode NONE)."""
        from vllm.config import CompilationMode
        cc = vllm_config.compilation_config
        if cc.mode == CompilationMode.NONE:
            return cls()
        backend = cc.backend if cc.backend in ("eager", "aot_eager") else "inductor"
        return cls(backend, cc.inductor_compile_config if backend == "inductor" else None)

    def __call__(self, layers, start: int, end: int, positions, h, residual, router=None):
        args = (positions, h, residual) if router is None else (positions, h, residual, router)
        if not self.compiled:
            return _run_segment(layers[start:end + 1], *args)
        key = (start, end, router is not None)
        if key not in self._fns:
            # a fresh code object per segment: dynamo caches graphs per code object
            base = _run_segment if router is None else _run_segment_scored
            code = base.__code__.replace(co_name=f"tide_layers_{start}_{end}")
            fn = types.FunctionType(code, base.__globals__, code.co_name)
            compiled = torch.compile(fn, backend=self._backend, options=self._options, fullgraph=True)
            self._fns[key] = [base, compiled, tuple(layers[start:end + 1]), False]
        entry = self._fns[key]
        base, compiled, seg, traced = entry
        if not traced:
            if h.shape[0] < 2:   # trace at >= 2 tokens (a 1 would be specialised); until then run eagerly
                return base(seg, *args)
            for t in (positions, h, residual):
                if t is not None:
                    torch._dynamo.mark_dynamic(t, t.dim() - 1 if t is positions else 0)
            entry[3] = True
        return compiled(seg, *args)
