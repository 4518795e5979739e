"""The compiled functions (vllm_tide/compiled_layers.py) against their eager definitions, without vLLM:
traced once at >= 2 rows, then called through the captured bytecode at any row count (1 included)
without compiling again, and partial layers compiled per layer where layers differ in constants."""
import pytest
import torch

from vllm_tide.compiled_layers import SegmentRunner, _run_partial_layer, _run_segment
from vllm_tide.engine import DecoderAdapter

D = 16


class _Norm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x, residual=None):
        if residual is not None:
            x, residual = x + residual, x + residual
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return y if residual is None else (y, residual)


class _Proj(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, x):
        return self.lin(x), None


class _Attn(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.o_proj = _Proj()
        self.scale = scale          # a Python constant: a graph bakes it in, like a string layer name

    def core(self, positions, x):
        return torch.tanh(x * self.scale + positions[:, None].float())


class _Layer(torch.nn.Module):
    """The decoder-layer interface TIDE uses: layer(positions, h, residual) and its parts."""

    def __init__(self, scale: float):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = _Norm(), _Norm()
        self.self_attn = _Attn(scale)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(D, 2 * D), torch.nn.SiLU(), torch.nn.Linear(2 * D, D))

    def forward(self, positions, h, residual):
        h, residual = (self.input_layernorm(h), h) if residual is None else self.input_layernorm(h, residual)
        a, _ = self.self_attn.o_proj(self.self_attn.core(positions, h))
        a, residual = self.post_attention_layernorm(a, residual)
        return self.mlp(a), residual


class _Adapter(DecoderAdapter):
    def attention_core(self, attn, positions, normed):
        return attn.core(positions, normed)


@pytest.fixture
def compiles():
    names = []
    hook = torch._dynamo.convert_frame.register_bytecode_hook(lambda old, new: names.append(old.co_name))
    yield names
    hook.remove()


def _rows(n, gen):
    return (torch.arange(n) + 3, torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen))


@torch.no_grad()
def test_segment_traced_once_then_matches_eager_at_every_size(compiles):
    torch.manual_seed(0)
    layers = [_Layer(0.5 + i) for i in range(4)]
    runner, gen = SegmentRunner("eager", adapter=_Adapter()), torch.Generator().manual_seed(1)
    positions, h, residual = _rows(1, gen)
    out = runner(layers, 1, 3, positions, h, residual)          # 1 row before tracing: eager
    assert not runner.traced and compiles == []
    torch.testing.assert_close(out, _run_segment(layers[1:4], _Adapter(), positions, h, residual), rtol=0, atol=0)
    for n in (5, 1, 2, 33):                                      # traced at 5, then bytecode at every size
        positions, h, residual = _rows(n, gen)
        want = _run_segment(layers[1:4], _Adapter(), positions, h.clone(), residual.clone())
        got = runner(layers, 1, 3, positions, h, residual)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert runner.traced and compiles == ["tide_layers_1_3"]


@torch.no_grad()
@pytest.mark.parametrize("shared", [False, True])
def test_partial_layers_per_layer_unless_shared(compiles, shared):
    """Layers that differ in a Python constant need a graph each: per layer every one matches its
    eager definition; one shared graph bakes in the first layer's constant and is wrong for the other
    (why sharing is only used when vLLM passes layer names as graph inputs)."""
    torch.manual_seed(0)
    layers = [_Layer(0.5), _Layer(2.0)]
    runner, gen, adapter = SegmentRunner("eager", adapter=_Adapter()), torch.Generator().manual_seed(2), _Adapter()
    runner.shared_partial = shared
    running = torch.tensor([0, 2, 3])
    results = []
    for i, layer in enumerate(layers):
        positions, h, residual = _rows(6, gen)
        want = _run_partial_layer(layer, adapter, positions, h.clone(), residual.clone(), running)
        got = runner.partial(i, layer, adapter, positions, h, residual, running)
        results.append(all(torch.allclose(g, w, rtol=1e-6, atol=1e-6) for g, w in zip(got, want)))
        assert torch.equal(got[0][[1, 4, 5]], torch.zeros(3, D))   # rows not running: hidden 0
    assert results == ([True, False] if shared else [True, True])
    assert compiles == (["tide_partial_layer"] if shared else ["tide_partial_layer_0", "tide_partial_layer_1"])
    for n, k in ((1, 1), (9, 4)):                     # then bytecode for other sizes, no compile
        positions, h, residual = _rows(n, gen)
        running = torch.arange(k)
        want = _run_partial_layer(layers[0], adapter, positions, h.clone(), residual.clone(), running)
        torch.testing.assert_close(runner.partial(0, layers[0], adapter, positions, h, residual, running), want,
                                   rtol=1e-6, atol=1e-6)
    assert len(compiles) == (1 if shared else 2)


class _InPlaceNorm(_Norm):
    """A fused add+norm that updates the residual in place, as vLLM's custom op does."""

    def forward(self, x, residual=None):
        if residual is None:
            return super().forward(x)
        residual.add_(x)
        return super().forward(residual), residual


@torch.no_grad()
@pytest.mark.parametrize("backend", [None, "eager"])
def test_partial_layer_over_all_rows_equals_running_rows_only(backend):
    """The LoRA variant (every row through o_proj/MLP, running rows kept) gives the running-rows result:
    running rows updated, exited rows at (hidden 0, residual frozen) even with an in-place fused norm."""
    torch.manual_seed(0)
    layer, adapter = _Layer(0.7), _Adapter()
    layer.input_layernorm, layer.post_attention_layernorm = _InPlaceNorm(), _InPlaceNorm()
    runner, gen = SegmentRunner(backend, adapter=_Adapter()), torch.Generator().manual_seed(4)
    for n, running in ((6, [0, 2, 3]), (9, [8]), (1, [0]), (5, [])):
        positions, h, residual = _rows(n, gen)
        running = torch.tensor(running, dtype=torch.int64)
        exited = torch.tensor([i for i in range(n) if i not in running.tolist()], dtype=torch.int64)
        h[exited] = 0                      # exited rows are frozen as (0, x_e)
        frozen = residual[exited].clone()
        want = _run_partial_layer(layer, adapter, positions, h.clone(), residual.clone(), running)
        got = runner.partial(0, layer, adapter, positions, h, residual, running, all_rows=True)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(got[1][exited], frozen) and torch.equal(got[0][exited], torch.zeros(len(exited), D))
    assert runner.compiled == (backend is not None) and (runner.traced or backend is None)


@torch.no_grad()
def test_segment_with_inductor_matches_eager():
    """The backend vLLM uses on CPU: inductor's code for a segment equals eager within fp32 rounding."""
    torch.manual_seed(0)
    layers = [_Layer(1.0), _Layer(1.5)]
    runner, gen = SegmentRunner("inductor", adapter=_Adapter()), torch.Generator().manual_seed(3)
    for n in (4, 1, 17):
        positions, h, residual = _rows(n, gen)
        want = _run_segment(layers, _Adapter(), positions, h.clone(), residual.clone())
        torch.testing.assert_close(runner(layers, 0, 1, positions, h, residual), want, rtol=1e-5, atol=1e-5)
    assert runner.traced


@torch.no_grad()
def test_final_segment_includes_the_final_norm(compiles):
    """The last segment with the model's final norm in its graph returns norm(h + residual), at any size."""
    torch.manual_seed(0)
    layers, norm = [_Layer(0.7), _Layer(1.3)], _Norm()
    runner, gen = SegmentRunner("eager", adapter=_Adapter()), torch.Generator().manual_seed(4)
    for n in (3, 1, 12):
        positions, h, residual = _rows(n, gen)
        want = norm(*_run_segment(layers, _Adapter(), positions, h.clone(), residual.clone()))[0]
        got = runner(layers, 0, 1, positions, h, residual, final_norm=norm)
        assert got.shape == (n, D)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert compiles == ["tide_layers_0_1_final"]


@torch.no_grad()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_segments_on_cuda_match_cpu(backend):
    """The compiled functions on a GPU (no vLLM needed): plain, scored and final segments and partial
    layers, traced once on CUDA tensors, against their eager definitions on the CPU (with the CUDA ops
    library loaded, the scored graph calls the fused router kernel)."""
    import copy
    if backend == "inductor":
        pytest.importorskip("triton")
    from vllm_tide.ops import reference
    torch.manual_seed(0)
    cpu_layers, cpu_norm = [_Layer(0.6), _Layer(1.1)], _Norm()
    for layer in cpu_layers:
        layer.input_layernorm, layer.post_attention_layernorm = _InPlaceNorm(), _InPlaceNorm()
    layers, norm = [copy.deepcopy(m).cuda() for m in cpu_layers], copy.deepcopy(cpu_norm).cuda()
    cpu_router = (cpu_norm.weight, 1e-6, torch.randn(4, D), torch.randn(4), torch.randn(4), torch.randn(1))
    router = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in cpu_router)
    adapter, runner, gen = _Adapter(), SegmentRunner(backend, adapter=_Adapter()), torch.Generator().manual_seed(6)
    tol = dict(rtol=1e-4, atol=1e-4)
    for n, running in ((6, [0, 2, 3]), (1, [0]), (33, list(range(0, 33, 3)))):
        positions, h, residual = _rows(n, gen)
        running = torch.tensor(running, dtype=torch.int64)
        exited = torch.tensor([i for i in range(n) if i not in running.tolist()], dtype=torch.int64)
        h[exited] = 0
        cuda = lambda *ts: [t.clone().cuda() for t in ts]  # noqa: E731  (copies: layers write in place)
        want = _run_segment(cpu_layers, _Adapter(), positions, h.clone(), residual.clone())
        got = runner(layers, 0, 1, *cuda(positions, h, residual))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, **tol)
        *_, score = runner(layers, 0, 1, *cuda(positions, h, residual), router)
        want_score = reference.router_score(sum(want), *cpu_router, 2.0, torch.ones(n, dtype=torch.bool))[0]
        torch.testing.assert_close(score.cpu(), want_score, **tol)
        got = runner.partial(0, layers[0], adapter, *cuda(positions, h, residual, running))
        want = _run_partial_layer(cpu_layers[0], adapter, positions, h.clone(), residual.clone(), running)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, **tol)
        got = runner(layers, 0, 1, *cuda(positions, h, residual), final_norm=norm)
        want_h, want_r = _run_segment(cpu_layers, _Adapter(), positions, h.clone(), residual.clone())
        torch.testing.assert_close(got.cpu(), cpu_norm(want_h, want_r)[0], **tol)
    assert runner.traced


def test_exits_are_taken_only_when_they_save_work():
    """engine._take: exits that leave no row running are always taken (K/V fill only); exits that leave
    rows running only once 16 rows and a quarter of the step have exited (partial layers then run on
    fewer rows); otherwise they would save nothing and are deferred."""
    from types import SimpleNamespace

    from vllm_tide.engine import EarlyExitEngine
    rule = SimpleNamespace(split_min_rows=16, split_min_fraction=0.25)

    def take(n, running, exits):
        return EarlyExitEngine._take(rule, n, running, exits)
    assert take(1, 1, 1)                      # a decode step's single token
    assert take(8, 8, 8) and take(8, 3, 3)    # the last rows of a step (3 left after 5 exited before)
    assert not take(8, 8, 7)                  # 7 of 8: the 8th would still run every layer
    assert not take(1024, 1024, 15)           # 15 rows: deferred
    assert not take(100, 100, 16)             # 16 rows but 16%: deferred
    assert take(40, 40, 16)                   # 16 rows and 40%: taken
    assert take(1024, 1024, 300)
    assert take(100, 70, 1)                   # already split (30 exited): every further exit saves


def test_padded_rows_are_not_counted_and_never_exit(monkeypatch):
    """On GPUs vLLM can pad a step (CUDA graphs, micro-batches) and marks the padding in the forward
    context: the engine counts only the real tokens, and rows past the requests' thresholds never exit."""
    from types import SimpleNamespace

    import vllm.forward_context as fc
    from vllm_tide import engine
    from vllm_tide.checkpoint import OFF
    ctx = SimpleNamespace(attn_metadata={"model.layers.0.self_attn.attn": object()},
                          is_padding=torch.tensor([False, False, False, True, True]))
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context", lambda: ctx)
    assert engine._real_step() == (True, 3)
    ctx.is_padding = None                     # no padding marked: every row is real
    assert engine._real_step() == (True, None)
    ctx.attn_metadata = None                  # profile and dummy runs
    assert engine._real_step() == (False, None)
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: False)
    assert engine._real_step() == (False, None)

    step = SimpleNamespace(threshold=OFF, step_thresholds=torch.tensor([0.5, 0.7, 0.9]), step_min=0.5)
    thr, routing = engine.EarlyExitEngine._step_thresholds(step, 5)
    assert routing and torch.equal(thr, torch.tensor([0.5, 0.7, 0.9, OFF, OFF]))
    thr, _ = engine.EarlyExitEngine._step_thresholds(step, 2)   # more thresholds than rows: the first n
    assert torch.equal(thr, torch.tensor([0.5, 0.7]))
    step.step_min = OFF                       # every request has exits off: stock's forward
    assert not engine.EarlyExitEngine._step_thresholds(step, 5)[1]
    step.step_thresholds, step.threshold = None, 0.8   # every request at the engine's threshold
    assert engine.EarlyExitEngine._step_thresholds(step, 5) == (None, True)
    assert engine.EarlyExitEngine._step_thresholds(step, 5, 5) == (None, True)
    # padded rows (3 real of 5) never exit, at the engine's threshold too
    thr, routing = engine.EarlyExitEngine._step_thresholds(step, 5, 3)
    assert routing and torch.equal(thr, torch.tensor([0.8, 0.8, 0.8, OFF, OFF]))
