"""The tests' own reference (tests/reference.py) against Hugging Face, and calibration's simulator
(vllm_tide.simulate) against the reference, on every family variant. No vLLM needed."""
import pytest
import torch

from helpers import HF_RUNS, VARIANTS, ladder_router, make_tiny_model, mixing_threshold, synthetic_router
from reference import TideReference

IDS = [5, 17, 300, 4021, 9, 77, 1200, 31, 8, 640, 2, 19, 555, 13]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {v: make_tiny_model(v, str(root / v), None, seed=i) for i, v in enumerate(VARIANTS)}


@pytest.mark.parametrize("variant", HF_RUNS)
def test_reference_without_exits_is_hugging_face(variants, variant):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(variants[variant], dtype=torch.float64).eval()
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0]
    logits, exit_at, kv = TideReference(variants[variant], None).run(IDS)
    assert (exit_at == -1).all() and len(kv) == 8
    # HF computes its norms and rotary angles in fp32 even in a float64 model: 1e-5 of the logit scale
    err = (logits - want).abs().max().item() / want.abs().max().item()
    assert err <= 1e-5, err


def test_reference_branches_change_the_numbers(variants):
    """The branches HF cannot check (Mistral's llama_4_scaling, Qwen2's qk_norm) are really taken:
    the reference's K (qk_norm) or logits (scaling) differ from the same model with the branch off."""
    import json
    import os
    for variant, base in (("mistral-llama4", "mistral"), ("qwen2-qknorm", "qwen2")):
        on = TideReference(variants[variant], None)
        off = TideReference(variants[variant], None)
        off.llama4, off.qk_norm = None, False
        a, _, kv_a = on.run(IDS)
        b, _, kv_b = off.run(IDS)
        assert (a - b).abs().max() > 1e-3, variant
        with open(os.path.join(variants[variant], "config.json")) as f:
            assert json.load(f)["model_type"] == base.split("-")[0]
    assert (kv_a[3][0] - kv_b[3][0]).abs().max() > 1e-3         # qk_norm changes the cached K


@pytest.mark.parametrize("variant", HF_RUNS)
@pytest.mark.parametrize("projection", ["identity", "affine", "lowrank"])
def test_calibration_simulator_matches_the_reference(variants, tmp_path, variant, projection):
    """vllm_tide.simulate (what calibration measures exits with) against the independent reference:
    the same exit layer for every token and the same logits, with exits at several depths."""
    from transformers import AutoModelForCausalLM
    from vllm_tide.simulate import ExitSimulator
    path = str(tmp_path / "r.safetensors")
    ckpt = synthetic_router(variants[variant], path, {1: "some", 3: "some", 5: "some"}, interval=2, seed=3,
                            projection=projection)
    hf = AutoModelForCausalLM.from_pretrained(variants[variant], dtype=torch.float32).eval()
    got, got_exit, _ = ExitSimulator.from_checkpoint(hf, ckpt, 0.5, 0).run(IDS)
    want, want_exit, _ = TideReference(variants[variant], path, 0.5, 0).run(IDS)
    assert got_exit.tolist() == want_exit.tolist()
    assert len({int(e) for e in want_exit if e >= 0}) >= 2, want_exit     # several depths
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    assert err <= 1e-4, err


def test_ladder_router_forces_each_depth(variants, tmp_path):
    """The engine tests' router: each threshold of the ladder sends every token to one checkpoint
    (with margins of several spreads), and mixing_threshold splits a sequence between two."""
    path = str(tmp_path / "r.safetensors")
    ladder = ladder_router(variants["llama"], path)
    for threshold, layer in ladder.items():
        _, exit_at, _ = TideReference(variants["llama"], path, threshold, 0).run(IDS)
        assert set(exit_at.tolist()) == {layer}, (threshold, exit_at)
    for c, then in ((1, 3), (3, 5)):
        t = mixing_threshold(TideReference(variants["llama"], path, 1.0, c), IDS, c)
        _, exit_at, _ = TideReference(variants["llama"], path, t, 0).run(IDS)
        assert set(exit_at.tolist()) == {c, then}, (c, exit_at)
