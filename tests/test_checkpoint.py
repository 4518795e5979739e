"""Router checkpoint format: round trip, model identity and clear one-line errors."""
import json
import os

import pytest
import torch

from vllm_tide.checkpoint import OFF, RouterCheckpoint, check_threshold, checkpoint_layers
from vllm_tide.errors import TideConfigError
from vllm_tide.fingerprint import ModelIdentity, model_identity
from vllm_tide.projection import ExitProjection
from vllm_tide.settings import TideSettings


def make_ckpt(d=16, b=4, layers=(3, 7), num_layers=12, projection="identity", fingerprint="abc"):
    g = torch.Generator().manual_seed(0)
    routers = {c: {"down.weight": torch.randn(b, d, generator=g), "down.bias": torch.randn(b, generator=g),
                   "up.weight": torch.randn(1, b, generator=g), "up.bias": torch.randn(1, generator=g)} for c in layers}
    def proj():
        temp = 0.5 + torch.rand(1, generator=g).item()
        if projection == "temperature":
            return ExitProjection(temperature=temp)
        if projection == "affine":
            return ExitProjection(weight=torch.randn(d, d, generator=g), bias=torch.randn(d, generator=g),
                                  temperature=temp)
        return ExitProjection(u=torch.randn(d, 3, generator=g), v=torch.randn(3, d, generator=g),
                              bias=torch.randn(d, generator=g), temperature=temp)      # low-rank affine
    kind = "affine" if projection == "lowrank" else projection
    projections = {c: proj() for c in layers} if projection != "identity" else {}
    return RouterCheckpoint(model=ModelIdentity("LlamaForCausalLM", num_layers, d, 100, fingerprint), layers=list(layers),
                            bottleneck=b, routers=routers, projection=kind, projections=projections,
                            corpus="unit", tokens=123, suggested_threshold=0.875, suggested_min_layer=7,
                            extra={"note": "x"})


@pytest.mark.parametrize("projection", ["identity", "temperature", "affine", "lowrank"])
def test_round_trip_is_exact(tmp_path, projection):
    """Routers and exit projections come back bit for bit, so loaded projections reproduce the
    calibration-time exit logits exactly."""
    ckpt = make_ckpt(projection=projection)
    path = str(tmp_path / "r.safetensors")
    ckpt.save(path)
    back = RouterCheckpoint.load(path)
    assert back.model == ckpt.model and back.layers == ckpt.layers and back.bottleneck == ckpt.bottleneck
    assert (back.suggested_threshold, back.suggested_min_layer, back.tokens, back.corpus, back.extra) == \
        (0.875, 7, 123, "unit", {"note": "x"})
    for c in ckpt.layers:
        for k, v in ckpt.routers[c].items():
            assert torch.equal(back.routers[c][k], v)
        if projection == "identity":
            assert back.projections == {}
            continue
        h = torch.randn(5, 16, generator=torch.Generator().manual_seed(c))
        lm_head = torch.randn(100, 16, generator=torch.Generator().manual_seed(1))
        assert torch.equal(back.projections[c].apply(h) @ lm_head.T, ckpt.projections[c].apply(h) @ lm_head.T)
        assert back.projections[c].temperature == pytest.approx(ckpt.projections[c].temperature, rel=1e-7)
        for k, v in ckpt.projections[c].tensors().items():
            assert torch.equal(back.projections[c].tensors()[k], v)


def test_default_model_router_is_small(tmp_path):
    ckpt = make_ckpt(d=576, b=128, layers=(3, 7, 11, 15, 19, 23, 27), num_layers=30)
    path = tmp_path / "r.safetensors"
    ckpt.save(str(path))
    assert path.stat().st_size < 2.5e6


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


def test_truncated_and_corrupt_files(tmp_path):
    path = tmp_path / "r.safetensors"
    make_ckpt().save(str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    for name in ("trunc", "junk"):
        with pytest.raises(TideConfigError) as e:
            RouterCheckpoint.load(str(tmp_path / f"{name}.safetensors"))
        assert "truncated or corrupt" in one_line(e)
    with pytest.raises(TideConfigError) as e:
        RouterCheckpoint.load(str(tmp_path / "missing.safetensors"))
    assert "does not exist" in one_line(e)


def test_unknown_format_version(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    path = str(tmp_path / "r.safetensors")
    make_ckpt().save(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(path), path, metadata={**meta, "format_version": "99"})
    with pytest.raises(TideConfigError) as e:
        RouterCheckpoint.load(path)
    assert "version '99'" in one_line(e)


def test_router_for_another_model_is_refused():
    ckpt = make_ckpt()
    ckpt.check_model(ModelIdentity("LlamaForCausalLM", 12, 16, 100, "abc"), "r")   # same model: fine
    with pytest.raises(TideConfigError) as e:
        ckpt.check_model(ModelIdentity("LlamaForCausalLM", 12, 16, 100, "zzz"), "r")
    assert "different model" in one_line(e)
    with pytest.raises(TideConfigError) as e:
        ckpt.check_model(ModelIdentity("LlamaForCausalLM", 12, 32, 100, "abc"), "r")
    assert "hidden size" in one_line(e)


def test_shape_mismatch_in_file(tmp_path):
    ckpt = make_ckpt()
    ckpt.routers[3]["down.weight"] = torch.randn(4, 17)
    path = str(tmp_path / "r.safetensors")
    ckpt.save(path)
    with pytest.raises(TideConfigError) as e:
        RouterCheckpoint.load(path)
    assert "shape" in one_line(e)


def test_checkpoint_layers_never_include_final_layer():
    for n in (2, 5, 12, 30, 32):
        for k in range(1, n):
            layers = checkpoint_layers(n, k)
            assert n - 1 not in layers and all(0 <= c < n - 1 for c in layers)
    assert checkpoint_layers(30, 4) == [3, 7, 11, 15, 19, 23, 27]
    assert checkpoint_layers(32, 4) == [3, 7, 11, 15, 19, 23, 27]   # not 31: that is the last layer
    for bad in (0, -1, 30):
        with pytest.raises(TideConfigError):
            checkpoint_layers(30, bad)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01, "0.5", None, float("nan"), True, False])
def test_threshold_out_of_range(value):
    """Booleans too: True would read as 1.0 (as the per-request check already refuses them)."""
    with pytest.raises(TideConfigError) as e:
        check_threshold(value)
    one_line(e)


def test_settings_parse():
    s = TideSettings.parse({"router": "r.safetensors", "threshold": 1.0, "min_layer": 3})
    assert (s.threshold, s.min_layer, s.enabled) == (1.0, 3, True)
    assert TideSettings.parse({"enabled": False}).enabled is False
    assert (s.split_min_rows, s.split_min_fraction) == (16, 0.25)
    s = TideSettings.parse({"router": "r", "split_min_rows": 1, "split_min_fraction": 0})
    assert (s.split_min_rows, s.split_min_fraction) == (1, 0.0)
    for bad in ({"threshold": 0.5}, {"router": "r", "threshold": 2}, {"router": "r", "min_layer": -1},
                {"router": "r", "thresold": 0.5}, "r.safetensors", {"router": "r", "split_min_rows": 0},
                {"router": "r", "split_min_rows": 2.5}, {"router": "r", "split_min_fraction": 1.5},
                {"router": "r", "split_min_fraction": True}):
        with pytest.raises(TideConfigError) as e:
            TideSettings.parse(bad)
        one_line(e)
    # threshold precedence: explicit setting, else the checkpoint's suggestion
    ckpt = make_ckpt()
    assert TideSettings.parse({"router": "r"}).resolve(ckpt) == (0.875, 7)
    assert TideSettings.parse({"router": "r", "threshold": 0.6, "min_layer": 3}).resolve(ckpt) == (0.6, 3)
    # presets stored in the checkpoint; explicit settings still win; a preset that met nothing is off
    ckpt.extra["presets"] = {"default": None, "fast": {"threshold": 0.7, "min_layer": 3}}
    assert TideSettings.parse({"router": "r", "preset": "fast"}).resolve(ckpt) == (0.7, 3)
    assert TideSettings.parse({"router": "r", "preset": "fast", "threshold": 0.9}).resolve(ckpt) == (0.9, 3)
    # ... and exits off is OFF (the stock forward), while an explicit 1.0 stays 1.0 (routers run, never fire)
    assert TideSettings.parse({"router": "r", "preset": "default"}).resolve(ckpt) == (OFF, 7)
    assert TideSettings.parse({"router": "r", "preset": "default", "threshold": 1.0}).resolve(ckpt) == (1.0, 7)
    ckpt.suggested_threshold = 1.0      # what calibration suggests when no point meets its bar and pays
    assert TideSettings.parse({"router": "r"}).resolve(ckpt) == (OFF, 7)
    assert TideSettings.parse({"router": "r", "threshold": 1.0}).resolve(ckpt) == (1.0, 7)
    with pytest.raises(TideConfigError, match="has no preset 'balanced'"):
        TideSettings.parse({"router": "r", "preset": "balanced"}).resolve(ckpt)


def test_serve_flags_become_settings():
    """`vllm serve --plugin tide --tide-*` flags give the same settings as additional_config."""
    import argparse
    from vllm_tide.plugin import add_tide_cli_args, tide_config_from_args
    parser = add_tide_cli_args(argparse.ArgumentParser())

    def settings(*argv):
        return tide_config_from_args(parser.parse_args(list(argv)))
    assert settings() is None
    raw = settings("--plugin", "tide", "--tide-router", "r.safetensors", "--tide-preset", "fast",
                   "--tide-min-layer", "3", "--tide-split-min-rows", "4", "--tide-split-min-fraction", "0.5")
    assert raw == {"router": "r.safetensors", "preset": "fast", "min_layer": 3, "split_min_rows": 4,
                   "split_min_fraction": 0.5}
    s = TideSettings.parse(raw)
    assert (s.preset, s.min_layer, s.threshold, s.split_min_rows, s.split_min_fraction) == ("fast", 3, None, 4, 0.5)
    for argv in (["--tide-router", "r"], ["--plugin", "tide"], ["--plugin", "tied", "--tide-router", "r"]):
        with pytest.raises(TideConfigError) as e:
            settings(*argv)
        one_line(e)
    with pytest.raises(TideConfigError) as e:
        TideSettings.parse(settings("--plugin", "tide", "--tide-router", "r", "--tide-split-min-fraction", "2"))
    one_line(e)


def test_fingerprint_tracks_weights_as_stored(tmp_path):
    from safetensors.torch import save_file
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 4, "vocab_size": 10}
    tensors = {"model.norm.weight": torch.ones(4), "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 4)}
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "a" / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(4) * 1.001
    save_file(tensors, str(tmp_path / "b" / "model.safetensors"))
    a, b = model_identity(str(tmp_path / "a")), model_identity(str(tmp_path / "b"))
    assert a.fingerprint and b.fingerprint and a.fingerprint != b.fingerprint
    assert (a.architecture, a.num_layers, a.hidden_size, a.vocab_size) == ("LlamaForCausalLM", 2, 4, 10)
    assert model_identity(str(tmp_path / "a")) == a


def test_fingerprint_hashes_a_fused_qkv_projection(tmp_path):
    """Phi-3 stores no k_proj: its fused qkv_proj is hashed instead, so a change to it is seen."""
    from safetensors.torch import save_file
    cfg = {"architectures": ["Phi3ForCausalLM"], "num_hidden_layers": 2, "hidden_size": 4, "vocab_size": 10}
    qkv = torch.randn(12, 4)
    for name, last in (("a", qkv.clone()), ("b", qkv + 1e-3 * (torch.arange(48).view(12, 4) == 47))):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        save_file({"model.norm.weight": torch.ones(4), "model.layers.0.self_attn.qkv_proj.weight": qkv,
                   "model.layers.1.self_attn.qkv_proj.weight": last}, str(tmp_path / name / "model.safetensors"))
    a, b = model_identity(str(tmp_path / "a")), model_identity(str(tmp_path / "b"))
    assert a.fingerprint and b.fingerprint and a.fingerprint != b.fingerprint


def test_cuda_graphs_stay_on_where_tide_resolves_to_exits_off(tmp_path, monkeypatch):
    """On a CUDA-like platform, a router whose default keeps exits off leaves the CUDA graph mode as the
    user set it (stock's forward runs every step), and a request's own tide_threshold is then a 400
    telling how to allow exits; a router that exits turns graphs off. On a CPU-like platform nothing
    changes: graphs off, per-request thresholds accepted."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode
    from vllm.exceptions import VLLMValidationError

    from helpers import make_tiny_model, synthetic_router
    from vllm_tide import plugin, request_control
    model = make_tiny_model("llama", str(tmp_path / "m"), None, num_layers=8)
    off, on = str(tmp_path / "off.safetensors"), str(tmp_path / "on.safetensors")
    synthetic_router(model, off, {}, threshold=1.0)         # calibration found nothing that pays
    synthetic_router(model, on, {}, threshold=0.8)
    cuda, cpu = SimpleNamespace(is_cuda_alike=lambda: True), SimpleNamespace(is_cuda_alike=lambda: False)

    def start(router, platform, **tide):
        args = SimpleNamespace(model=model, additional_config={"tide": {"router": router, **tide}}, quantization=None,
                               kv_cache_dtype="auto", pipeline_parallel_size=1, enforce_eager=False,
                               compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE"})
        monkeypatch.setattr(plugin, "_pin_v1_model_runner", lambda: None)
        import vllm.platforms
        monkeypatch.setattr(vllm.platforms, "current_platform", platform)
        assert plugin.check_request(args)
        return args

    def request(args, extra):
        processor = SimpleNamespace(vllm_config=SimpleNamespace(additional_config=args.additional_config))
        req = SimpleNamespace(cache_salt=None)
        request_control.check_and_salt(processor, SimpleNamespace(extra_args=extra), req)
        return req.cache_salt

    locked = start(off, cuda)
    assert locked.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
    assert locked.additional_config["tide"]["request_exits"] is False
    with pytest.raises(VLLMValidationError, match="start it with --tide-threshold or --tide-preset"):
        request(locked, {"tide_threshold": 0.5})
    assert request(locked, {"tide_enabled": False}) == "tide:off" and request(locked, None) == "tide:default"
    for args in (start(off, cuda, threshold=0.5), start(on, cuda), start(off, cpu)):
        assert args.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
        assert "request_exits" not in args.additional_config["tide"]
        assert request(args, {"tide_threshold": 0.5}) == "tide:0.5"

def test_pipeline_parallelism_is_refused_in_one_sentence(tmp_path, monkeypatch):
    """TIDE's layer loop runs the whole stack in one process: --pipeline-parallel-size > 1 is one sentence
    at start-up (tensor parallelism is supported)."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from helpers import make_tiny_model, synthetic_router
    from vllm_tide import plugin
    model = make_tiny_model("llama", str(tmp_path / "m"), None, num_layers=8)
    router = str(tmp_path / "r.safetensors")
    synthetic_router(model, router, {}, threshold=0.8)
    monkeypatch.setattr(plugin, "_pin_v1_model_runner", lambda: None)

    def args(pp):
        return SimpleNamespace(model=model, additional_config={"tide": {"router": router}}, quantization=None,
                               kv_cache_dtype="auto", pipeline_parallel_size=pp, enforce_eager=True,
                               compilation_config={})
    with pytest.raises(TideConfigError, match="does not support pipeline parallelism; use tensor parallelism") as e:
        plugin.check_request(args(2))
    one_line(e)
    assert plugin.check_request(args(1))


def test_tide_request_fields_on_an_engine_without_tide_are_a_400():
    """An engine started without TIDE answers a request's tide_* parameter with a 400 (VLLMValidationError)
    that says how to start it, instead of ignoring it; requests without them pass untouched."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm.exceptions import VLLMValidationError

    from vllm_tide import request_control
    processor = SimpleNamespace(vllm_config=SimpleNamespace(additional_config={}))
    for extra in ({"tide_threshold": 0.5}, {"tide_enabled": False}):
        req = SimpleNamespace(cache_salt=None)
        with pytest.raises(VLLMValidationError, match="does not run TIDE early exit.*--plugin tide --tide-router"):
            request_control.check_and_salt(processor, SimpleNamespace(extra_args=extra), req)
    for extra in (None, {"other": 1}):
        req = SimpleNamespace(cache_salt="mine")
        request_control.check_and_salt(processor, SimpleNamespace(extra_args=extra), req)
        assert req.cache_salt == "mine"     # stock: no TIDE salt


def test_top_level_request_fields_move_into_vllm_xargs():
    """tide_* fields at the top level of a served request body (where vLLM's own extras go) reach the
    per-request checks as if given in vllm_xargs; the same field in both places is one clear error."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    from vllm_tide import plugin
    from vllm_tide.request_control import move_top_level_fields
    req = CompletionRequest(model="m", prompt="hi", tide_threshold=0.7, top_k=3, vllm_xargs={"other": 1})
    move_top_level_fields(req)
    assert req.vllm_xargs == {"other": 1, "tide_threshold": 0.7} and "tide_threshold" not in req.model_extra
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tide_enabled=False)
    move_top_level_fields(chat)
    assert chat.vllm_xargs == {"tide_enabled": False}
    plain = CompletionRequest(model="m", prompt="hi")
    move_top_level_fields(plain)
    assert plain.vllm_xargs is None
    both = CompletionRequest(model="m", prompt="hi", tide_threshold=0.7, vllm_xargs={"tide_threshold": 0.5})
    with pytest.raises(VLLMValidationError, match="both at the top level of the request and in vllm_xargs"):
        move_top_level_fields(both)
    # the serving path: vLLM's own to_sampling_params, patched, carries them into extra_args
    plugin._patch_request_bodies()
    params = CompletionRequest(model="m", prompt="hi", max_tokens=2, tide_threshold=0.7).to_sampling_params(
        max_tokens=2, default_sampling_params={})
    assert params.extra_args == {"tide_threshold": 0.7}


def test_cpu_dtype_is_bf16_only_where_native_and_faster():
    import torch

    from vllm_tide import cpu_dtype
    assert cpu_dtype.choose(flags={"avx2", "fma"})[0] == torch.float32            # emulated bf16: never
    assert "no native bf16" in cpu_dtype.choose(flags={"avx2"})[1]
    assert cpu_dtype.choose(flags={"avx512_bf16"}, timings=(1.0, 0.4))[0] == torch.bfloat16
    slow = cpu_dtype.choose(flags={"amx_bf16"}, timings=(1.0, 0.95))
    assert slow[0] == torch.float32 and "measured only 1.05x" in slow[1]
    dtype, why = cpu_dtype.choose()           # this machine: whichever its probe says, with the reason
    assert dtype in (torch.float32, torch.bfloat16) and why.startswith(str(dtype).replace("torch.", ""))


def test_ops_library_is_looked_for_in_the_variable_then_the_installed_package(tmp_path, monkeypatch):
    import vllm_tide
    from vllm_tide import ops
    monkeypatch.setenv("TIDE_OPS_LIBRARY", str(tmp_path / "mine.so"))
    package = os.path.dirname(vllm_tide.__file__)
    installed = os.path.join(package, "libtide_ops.so")
    made = not os.path.exists(installed)
    if made:
        open(installed, "w").close()
    try:
        found = ops.library_candidates()
    finally:
        if made:
            os.remove(installed)
    assert found[0] == str(tmp_path / "mine.so") and found[1] == installed
