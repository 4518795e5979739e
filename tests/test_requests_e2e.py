"""Per-request exit control offline: thresholds in one batch, exits off, prefix-cache keying, bad values."""
import pytest
import torch

from conftest import DEFAULT_MODEL, requires_engine
from helpers import synthetic_router
from reference import TideReference
from test_plugin_e2e import PROMPTS, stock_tokens, with_engine

from vllm_tide.settings import EVERY_EXIT

pytestmark = [pytest.mark.e2e, requires_engine]


def params(n, threshold=None, enabled=None, **kw):
    from vllm import SamplingParams
    extra = {}
    if threshold is not None:
        extra["tide_threshold"] = threshold
    if enabled is not None:
        extra["tide_enabled"] = enabled
    return SamplingParams(temperature=0, max_tokens=n, logprobs=0, extra_args=extra or None, **kw)


def test_each_request_gets_its_own_threshold_in_one_batch(tmp_path):
    """One batch: the engine's threshold, a lower and a higher one, and exits off. Each request's
    logprobs match the reference at its own threshold; exits-off is stock vLLM's output."""
    from vllm import SamplingParams
    from vllm_tide import exit_stats, reset_exit_stats
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {11: "some", 19: "some"}, seed=7)
    # the engine's threshold (0.7), a lower one, a raised one that never exits (1.0), exits off
    settings = [(None, None), (0.2, None), (1.0, None), (None, False)]
    effective = [0.7, 0.2, 1.0, None]
    prompts = [PROMPTS[3]] * 4                     # the same prompt under four settings
    want_stock = stock_tokens(DEFAULT_MODEL, prompts, 8)

    def check(llm):
        outs = llm.generate(prompts, [params(8, t, e, prompt_logprobs=0) for t, e in settings], use_tqdm=False)
        tok = llm.get_tokenizer()
        exits = []
        for prompt, out, thr, stock in zip(prompts, outs, effective, want_stock):
            gen = list(out.outputs[0].token_ids)
            if thr is None or thr == 1.0:
                assert gen == stock
            if thr is None:
                continue
            ids = tok(prompt)["input_ids"]
            logits, exit_at, _ = TideReference(DEFAULT_MODEL, router, thr, 0).run(ids + gen)
            lp = torch.log_softmax(logits.double(), -1)
            got = [out.outputs[0].logprobs[i][gen[i]].logprob for i in range(len(gen))]
            want = [lp[len(ids) - 1 + i, gen[i]].item() for i in range(len(gen))]
            assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4 * logits.abs().max().item()
            exits.append(int((exit_at >= 0).sum()))
        assert exits[0] > 0 and exits[1] > 0 and exits[2] == 0, exits
        # exits off costs nothing: a batch of only exits-off requests runs no router at all
        reset_exit_stats(llm)
        off = llm.generate(prompts[:2], [params(8, enabled=False)] * 2, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in off] == want_stock[:2]
        # n > 1: vLLM fans a request out into child requests, and each keeps the parent's setting
        sampled = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=8, extra_args={"tide_enabled": False})
        assert len(llm.generate(prompts[:1], sampled, use_tqdm=False)[0].outputs) == 3
        assert sum(exit_stats(llm)["exits_per_layer"].values()) == 0
        # at 0.2 every child exits as the reference does on its own sampled tokens: the engine's exit
        # counts are the children's summed, and each sampled token's (raw) logprob is the reference's
        sampled.extra_args, sampled.logprobs = {"tide_threshold": 0.2}, 0
        reset_exit_stats(llm)
        children = llm.generate(prompts[:1], sampled, use_tqdm=False)[0].outputs
        ids = tok(prompts[0])["input_ids"]
        ref, counts = TideReference(DEFAULT_MODEL, router, 0.2, 0), {}
        for child in children:
            gen = list(child.token_ids)
            logits, exit_at, _ = ref.run(ids + gen[:-1])
            lp = torch.log_softmax(logits, -1)
            err = max(abs(child.logprobs[i][gen[i]].logprob - lp[len(ids) - 1 + i, gen[i]].item()) for i in range(len(gen)))
            assert err <= 1e-4 * logits.abs().max().item(), err
            for c in (11, 19):
                counts[c] = counts.get(c, 0) + int((exit_at == c).sum())
        assert len({tuple(c.token_ids) for c in children}) > 1                # really three samples
        ex = exit_stats(llm)["exits_per_layer"]
        assert {c: ex[c] for c in counts} == counts and sum(counts.values()) > 0, (ex, counts)
    with_engine(DEFAULT_MODEL, {"router": router, "threshold": 0.7, "min_layer": 0, **EVERY_EXIT}, check)


def test_exits_that_would_save_nothing_are_deferred(tmp_path):
    """By default an exit is taken only when it saves work in its step: when it leaves no row running,
    or enough rows have exited to run the rest on fewer rows. Batched with a request whose exits are
    off, a request's short prompt and its decode steps never qualify, so its tokens run every layer and
    its output is stock's, although its router fires; alone, the same request exits."""
    from vllm_tide import exit_stats, reset_exit_stats
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {11: "some", 19: "some"}, seed=7)
    want_stock = stock_tokens(DEFAULT_MODEL, PROMPTS[:2], 8)

    def check(llm):
        outs = llm.generate(PROMPTS[:2], [params(8, 0.2), params(8, enabled=False)], use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == want_stock
        stats = exit_stats(llm)
        assert sum(stats["exits_per_layer"].values()) == 0 and stats["deferred_exits"] > 0, stats
        assert stats["partial_layer_fraction"] == stats["skipped_layer_fraction"] == 0
        reset_exit_stats(llm)
        alone = llm.generate(PROMPTS[:1], params(8, 0.2), use_tqdm=False)[0]    # batch 1: every decode exit taken
        ids = llm.get_tokenizer()(PROMPTS[0])["input_ids"]
        gen = list(alone.outputs[0].token_ids)
        _, exit_at, _ = TideReference(DEFAULT_MODEL, router, 0.2, 0).run(ids + gen)
        decode_exits = int((exit_at[len(ids):-1] >= 0).sum())    # decode steps (the prompt has other rows)
        assert decode_exits > 0 and sum(exit_stats(llm)["exits_per_layer"].values()) >= decode_exits
    with_engine(DEFAULT_MODEL, {"router": router, "threshold": 0.7, "min_layer": 0}, check)


def test_prefix_cache_never_crosses_exit_settings(tmp_path):
    """An exits-off request after an exits-on request with the same prompt gets stock output, while
    requests with the same setting do share cached blocks."""
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {11: "all"})
    prompt = " ".join(PROMPTS) * 2                                  # several full 32-token blocks
    want = stock_tokens(DEFAULT_MODEL, [prompt], 8)[0]

    def check(llm):
        on = llm.generate([prompt], params(8), use_tqdm=False)[0]
        off = llm.generate([prompt], params(8, enabled=False), use_tqdm=False)[0]
        assert list(off.outputs[0].token_ids) == want
        assert not off.num_cached_tokens                            # nothing reused across settings
        on_again = llm.generate([prompt], params(8), use_tqdm=False)[0]
        assert on_again.num_cached_tokens >= 64                     # same setting: blocks reused
        assert list(on_again.outputs[0].token_ids) == list(on.outputs[0].token_ids)
        off_again = llm.generate([prompt], params(8, enabled=False), use_tqdm=False)[0]
        assert off_again.num_cached_tokens >= 64 and list(off_again.outputs[0].token_ids) == want
        # the keying matters: every token exits at 11, so the exits-on computation is not stock's
        lp_on = [next(iter(d.values())).logprob for d in on.outputs[0].logprobs]
        lp_off = [next(iter(d.values())).logprob for d in off.outputs[0].logprobs]
        assert max(abs(a - b) for a, b in zip(lp_on, lp_off)) > 1e-2
    with_engine(DEFAULT_MODEL, {"router": router, "threshold": 0.5, "min_layer": 0}, check, enable_prefix_caching=True)


def test_bad_request_parameters_are_clear_errors_and_the_engine_goes_on(tmp_path):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {15: "all"})

    def check(llm):
        cases = [({"tide_threshold": 1.5}, "tide_threshold must be a number in (0, 1]"),
                 ({"tide_threshold": "high"}, "tide_threshold must be a number"),
                 ({"tide_enabled": "no"}, "tide_enabled must be true or false"),
                 ({"tide_treshold": 0.9}, "Unknown TIDE request parameter 'tide_treshold'")]
        for extra, text in cases:
            with pytest.raises(VLLMValidationError) as e:
                llm.generate(["Hi"], SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
            assert text in str(e.value) and "\n" not in str(e.value)
        out = llm.generate(["Hi"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
    with_engine(DEFAULT_MODEL, {"router": router, "threshold": 0.5, "min_layer": 0}, check)


def test_a_router_whose_default_is_exits_off_runs_stock(tmp_path):
    """Calibration leaves the default at exits off when no point pays for its checkpoints: then the
    engine runs stock vLLM's forward without a single router call, and a request that sets its own
    threshold still exits."""
    from vllm_tide import exit_stats, reset_exit_stats
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {15: "all"}, threshold=1.0, min_layer=15)   # the suggestion: off
    want = stock_tokens(DEFAULT_MODEL, PROMPTS[:3], 8)

    def count_routes(model):
        engine, calls = model.tide, []
        route = engine._route
        engine._route = lambda *a, **kw: (calls.append(1), route(*a, **kw))[1]
        engine.route_calls = calls

    def check(llm):
        llm.apply_model(count_routes)
        calls = lambda: llm.apply_model(lambda m: len(m.tide.route_calls))[0]  # noqa: E731
        outs = llm.generate(PROMPTS[:3], params(8), use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == want
        assert calls() == 0 and exit_stats(llm)["threshold"] == 2.0
        reset_exit_stats(llm)
        own = llm.generate(PROMPTS[:1], params(8, threshold=0.5), use_tqdm=False)
        assert calls() > 0 and exit_stats(llm)["exits_per_layer"][15] == 8 + len(own[0].prompt_token_ids) - 1
    with_engine(DEFAULT_MODEL, {"router": router}, check)
