"""Every family's exits in a real vLLM engine against the independent reference (tests/reference.py).

For each family variant (each branch that changes the exits' arithmetic, as a real config), one
engine with the ladder router (helpers.ladder_router) serves:
- one batch whose requests, by their own thresholds, exit every token at layer 1, at 3, at 5, never,
  and split between two checkpoints: mixed depths in one batch and inside one sequence. Prompt and
  decode logprobs match the reference's; each exit layer's count equals the reference's;
- single requests whose K and V, at every layer and at the exact cache slots vLLM gave their
  positions (recorded from the attention metadata of each step), equal the reference's. The expected
  cache is written by vLLM's own cache writer, so any layout (packed ones included) is compared.
And bf16 against the same float64 reference at a bf16 tolerance.
"""
import gc

import pytest
import torch

from conftest import DEFAULT_MODEL, requires_engine
from probes import SlotRecorder, cache_errors, logprob_errors
from helpers import VARIANTS, ladder_router, make_tiny_model, mixing_threshold
from reference import TideReference

from vllm_tide.settings import EVERY_EXIT

pytestmark = [pytest.mark.e2e, requires_engine]

PROMPTS = ["The capital of France is", "Once upon a time, there was a little girl who",
           "def fibonacci(n):", "The three primary colours are red, yellow and",
           "In 1969 the first person to walk on the moon was", "Water boils at a temperature of one hundred"]
DECODE = 6
FP32_TOL = 1e-4      # of the largest |logit|, as the other engine tests
BF16_TOL = 0.08      # nats, on each token's logprob: bf16 weights and activations against float64
BF16_CACHE_TOL = 0.03   # of the largest |K| or |V| of a layer (bf16 keeps 8 bits of mantissa)


# The families whose adapters change how layers are called run the fp32 test in vLLM's default
# compiled mode (TIDE's segments and partial layers traced through their adapters), bf16 eagerly;
# the others run eagerly (the default model's compiled test covers the Llama layout).
COMPILED = ("granite", "gemma3")


def make_llm(model, router, dtype="float32", eager=True):
    from vllm import LLM
    return LLM(model=model, dtype=dtype, enforce_eager=eager, max_model_len=512, block_size=32, seed=0,
               enable_prefix_caching=False, max_num_seqs=8,
               additional_config={"tide": {"router": router, "threshold": 0.5, "min_layer": 0, **EVERY_EXIT}})


def shutdown(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def generate(llm, prompts, thresholds, **kw):
    from vllm import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=DECODE, logprobs=0, prompt_logprobs=0,
                             extra_args={"tide_threshold": t}, **kw) for t in thresholds]
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def variant_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {v: make_tiny_model(v, str(root / v), DEFAULT_MODEL, seed=i) for i, v in enumerate(VARIANTS)}


def mixed_thresholds(model, router, ids):
    """Thresholds that split this sequence between checkpoints 1 and 3, and between 3 and 5."""
    return [mixing_threshold(TideReference(model, router, 1.0, c), ids, c) for c in (1, 3)]


# each variant with its own exit projection kind, so every kind meets every path somewhere
PROJECTION = {"llama": "affine", "llama-bias": "lowrank", "mistral": "temperature", "mistral-llama4": "affine",
              "qwen2": "identity", "qwen2-qknorm": "lowrank", "qwen3": "affine", "phi3": "temperature",
              "granite": "affine", "gemma3": "lowrank"}


def check_requests(llm, model, router, thresholds, want_layers, ids, tol):
    """One batch, each request at its threshold: logprobs within tol of the reference's (tol > 0: of
    the largest |logit|; tol < 0: nats), greedy tokens the reference's argmax (fp32 only), each
    request's exit layers as wanted, and the engine's exit counts per layer the reference's."""
    from vllm_tide import exit_stats, reset_exit_stats
    reset_exit_stats(llm)
    outs = generate(llm, PROMPTS[:len(thresholds)], thresholds)
    counts = {1: 0, 3: 0, 5: 0}
    for i, (out, t) in enumerate(zip(outs, thresholds)):
        seq, exit_at, err, scale, gen, greedy = logprob_errors(out, ids[i], TideReference(model, router, t, 0))
        assert err <= (tol * scale if tol > 0 else -tol), (i, err, scale)
        assert tol < 0 or gen == greedy, i
        assert set(exit_at.tolist()) == set(want_layers[i]), (i, exit_at)
        for c in counts:
            counts[c] += int((exit_at == c).sum())
    stats = exit_stats(llm)
    assert {c: stats["exits_per_layer"][c] for c in counts} == counts, (stats, counts)
    assert stats["deferred_exits"] == 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exits_match_the_reference(variant_models, tmp_path, variant):
    from transformers import AutoTokenizer
    model, router = variant_models[variant], str(tmp_path / "r.safetensors")
    tok = AutoTokenizer.from_pretrained(model)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ladder = ladder_router(model, router, sample=ids, projection=PROJECTION[variant])
    mixed = [mixing_threshold(TideReference(model, router, 1.0, 1), ids[4], 1),
             mixing_threshold(TideReference(model, router, 1.0, 3), ids[5], 3)]
    thresholds = list(ladder) + mixed            # every token exits at 1 / 3 / 5 / never; two split
    want_layers = [(c,) for c in ladder.values()] + [(1, 3), (3, 5)]
    llm = make_llm(model, router, eager=variant not in COMPILED)
    try:
        assert "Tide" in llm.apply_model(lambda m: type(m).__name__)[0]
        assert llm.apply_model(lambda m: m.tide.run_layers.compiled) == [variant in COMPILED]
        assert [llm.get_tokenizer()(p)["input_ids"] for p in PROMPTS] == ids
        check_requests(llm, model, router, thresholds, want_layers, ids, FP32_TOL)
        # K and V at the exact slots, one request at a time (each one's slots recorded alone)
        recorder = SlotRecorder()
        llm.apply_model(recorder.install)
        for i in (4, 5):
            recorder.steps.clear()
            out = generate(llm, [PROMPTS[i]], [thresholds[i]])[0]
            seq = ids[i] + list(out.outputs[0].token_ids)[:-1]
            errs = cache_errors(llm, TideReference(model, router, thresholds[i], 0), seq, recorder.slots())
            assert max(max(e) for e in errs.values()) <= 1e-4, (i, errs)
    finally:
        shutdown(llm)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_exits_match_the_reference(variant_models, tmp_path, variant):
    """bf16 weights and activations against the float64 reference, at forced depths (a split
    threshold's margin is below bf16's noise in the scores, so mixed depths are the fp32 test's)."""
    from transformers import AutoTokenizer
    model, router = variant_models[variant], str(tmp_path / "r.safetensors")
    tok = AutoTokenizer.from_pretrained(model)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ladder = ladder_router(model, router, sample=ids, projection=PROJECTION[variant])
    llm = make_llm(model, router, dtype="bfloat16")
    try:
        check_requests(llm, model, router, list(ladder), [(c,) for c in ladder.values()], ids, -BF16_TOL)
        recorder = SlotRecorder()      # every token exits at layer 1: layers 2.. hold only filled K/V
        llm.apply_model(recorder.install)
        out = generate(llm, [PROMPTS[1]], [list(ladder)[0]])[0]
        seq = ids[1] + list(out.outputs[0].token_ids)[:-1]
        errs = cache_errors(llm, TideReference(model, router, list(ladder)[0], 0), seq, recorder.slots())
        assert max(max(e) for e in errs.values()) <= BF16_CACHE_TOL, errs
    finally:
        shutdown(llm)
