"""Decoder layers run through torch.compile, as stock vLLM runs them, under TIDE's eager control flow.

Stock vLLM compiles the whole model forward (on CPU: dynamo + inductor, traced once with the token
dimension dynamic, guards dropped) and afterwards calls dynamo's transformed bytecode directly, so a
step never pays for dynamo's frame evaluation. TIDE's forward branches on exits at every checkpoint,
so it cannot be one graph. Instead it runs two kinds of compiled functions, each compiled that way
(traced once, during start-up, at sizes >= 2 with the token dimensions dynamic, a 1 being
specialised otherwise; then called through the captured bytecode for every size, 1 included):

- a segment: the full layers between two routing checkpoints, plus the end checkpoint's router score;
  each segment has its own code object, so its graph and bytecode are its own;
- the partial layer: one layer after some tokens exited (attention over all rows, the rest over the
  running rows). A model's decoder layers are alike, and their parameters and (with vLLM's opaque
  LayerName, the default on torch >= 2.11) attention-layer names are graph inputs, so one graph
  serves every layer; where layer names are plain strings they are baked into the graph, and each
  layer gets its own.
"""
from __future__ import annotations

import types

import torch

from . import ops
from .ops import CUDA_LIBRARY, reference


def _run_segment(layers, adapter, positions, h, residual):
    for layer in layers:
        h, residual = adapter.layer(layer, positions, h, residual)
    return h, residual


def _run_segment_final(layers, adapter, positions, h, residual, norm):
    """The last segment, then the model's final norm, in the same graph (as in stock's compiled forward)."""
    h, residual = _run_segment(layers, adapter, positions, h, residual)
    return norm(h, residual)[0]


def _run_segment_scored(layers, adapter, positions, h, residual, router):
    """The segment, then its end checkpoint's router score for every row, in the same graph.

    With the CUDA library loaded the score is the fused CUDA op; elsewhere it is the op's PyTorch twin
    traced into the graph, so inductor fuses it with the segment's end.
    """
    h, residual = _run_segment(layers, adapter, positions, h, residual)
    return h, residual, _score(h + residual, router)


def _score(x, router):
    args = (x, *router, 2.0, x.new_ones(x.shape[0], dtype=torch.bool))    # threshold 2.0: scores only
    return torch.ops.tide.router_score(*args)[0] if x.is_cuda and CUDA_LIBRARY else reference.router_score(*args)[0]


def _run_partial_layer(layer, adapter, positions, h, residual, running):
    """One layer with only the ``running`` rows continuing (the family's adapter says how)."""
    return adapter.partial_layer(layer, positions, h, residual, running, all_rows=False)


def _run_partial_layer_all_rows(layer, adapter, positions, h, residual, running):
    """_run_partial_layer's result, computed over every row with only the running rows kept: for LoRA
    engines, whose adapted projections index their adapters by the step's token order."""
    return adapter.partial_layer(layer, positions, h, residual, running, all_rows=True)


# (scored, with final norm) -> (function, graph name suffix)
_SEGMENTS = {(False, False): (_run_segment, ""),
             (True, False): (_run_segment_scored, "_scored"),
             (False, True): (_run_segment_final, "_final")}


class SegmentRunner:
    """Runs segments (``runner(layers, start, end, positions, h, residual[, router | final_norm])``, each
    layer called through ``runner.adapter``,
    layers start..end inclusive, with ``router`` also the score at ``end``, with ``final_norm`` the normed
    output instead of (h, residual)) and partial layers (``runner.partial(...)``), compiled or eagerly.

    A runner serves one model: each segment's layers are sliced once (slicing a ModuleList builds a new
    module, which is not free on every step).
    """

    def __init__(self, backend: str | None = None, options: dict | None = None, adapter=None):
        self.compiled = backend is not None
        self.adapter = adapter      # the family's engine.DecoderAdapter (EarlyExitEngine sets its own)
        self._backend = backend
        self._options = dict(options or {})
        self._options["guard_filter_fn"] = torch.compiler.skip_all_guards_unsafe
        self._fns: dict = {}
        self._slices: dict = {}
        self.shared_partial = _layer_names_are_graph_inputs()

    @classmethod
    def for_engine(cls, vllm_config) -> "SegmentRunner":
        """Compiled like the stock model unless the engine runs eagerly (enforce_eager / mode NONE)."""
        from vllm.config import CompilationMode
        cc = vllm_config.compilation_config
        if cc.mode == CompilationMode.NONE:
            return cls()
        backend = cc.backend if cc.backend in ("eager", "aot_eager") else "inductor"
        return cls(backend, cc.inductor_compile_config if backend == "inductor" else None)

    def __call__(self, layers, start: int, end: int, positions, h, residual, router=None, final_norm=None):
        if (start, end) not in self._slices:
            self._slices[start, end] = tuple(layers[start:end + 1])
        layers = self._slices[start, end]
        base, suffix = _SEGMENTS[router is not None, final_norm is not None]
        extra = tuple(x for x in (router, final_norm) if x is not None)
        if not self.compiled:
            return base(layers, self.adapter, positions, h, residual, *extra)
        key = (start, end, suffix)
        if key not in self._fns:
            self._fns[key] = _CompiledFn(base, f"tide_layers_{start}_{end}{suffix}", self._backend, self._options,
                                         num_static=2)
        return self._fns[key](layers, self.adapter, positions, h, residual, *extra)

    def partial(self, index: int, layer, adapter, positions, h, residual, running, all_rows: bool = False):
        """Layer ``index`` for the running rows only (see _run_partial_layer; with ``all_rows``,
        _run_partial_layer_all_rows)."""
        base = _run_partial_layer_all_rows if all_rows else _run_partial_layer
        if not self.compiled:
            return base(layer, adapter, positions, h, residual, running)
        suffix = "_all_rows" if all_rows else ""
        key = ("partial" + suffix,) if self.shared_partial else ("partial" + suffix, index)
        if key not in self._fns:
            name = "tide_partial_layer" + suffix + ("" if self.shared_partial else f"_{index}")
            self._fns[key] = _CompiledFn(base, name, self._backend, self._options, num_static=2)
        return self._fns[key](layer, adapter, positions, h, residual, running)

    @property
    def traced(self) -> bool:
        """Whether every compiled function made so far has its bytecode (start-up traces them all)."""
        return bool(self._fns) and all(fn.direct is not None for fn in self._fns.values())


def _layer_names_are_graph_inputs() -> bool:
    """Whether vLLM passes attention-layer names to its ops as opaque graph inputs (not constants)."""
    try:
        from vllm.utils import torch_utils
    except ImportError:
        return False
    return bool(getattr(torch_utils, "_USE_LAYERNAME", False))


class _CompiledFn:
    """A function compiled once, then called through dynamo's transformed bytecode.

    The first ``num_static`` arguments are modules and helpers, then come positions (token dimension
    last) and the other per-row tensors (token dimension first). Until traced, it runs eagerly.
    """

    def __init__(self, base, name: str, backend: str, options: dict, num_static: int = 1):
        # a fresh code object: dynamo caches graphs (and we capture bytecode) per code object
        self.code = base.__code__.replace(co_name=name)
        self.eager = base
        self.num_static = num_static
        self.compiled = torch.compile(types.FunctionType(self.code, base.__globals__, name),
                                      backend=backend, options=options, fullgraph=True)
        self.direct = None      # the transformed bytecode as a plain function, once traced

    def __call__(self, *args):
        if self.direct is not None:
            return self.direct(*args)
        positions, *rest = args[self.num_static:]
        dynamic = [(positions, positions.dim() - 1)] + [(t, 0) for t in rest if isinstance(t, torch.Tensor)]
        if min(t.shape[d] for t, d in dynamic) < 2:   # a 1 would be specialised: eager until a larger call
            return self.eager(*args)
        for t, d in dynamic:
            torch._dynamo.mark_dynamic(t, d)
        captured = []

        def hook(old_code, new_code):
            if old_code is self.code:
                captured.append(new_code)

        handle = torch._dynamo.convert_frame.register_bytecode_hook(hook)
        try:
            out = self.compiled(*args)
        finally:
            handle.remove()
        if captured:
            # dynamo put the compiled graph into the globals the code runs in; guards are dropped, so
            # the bytecode is valid for every later call (sizes included), as in stock vLLM
            self.direct = types.FunctionType(captured[-1], self.eager.__globals__, self.code.co_name)
        return out
