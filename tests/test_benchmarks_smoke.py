"""Smoke runs of the benchmark scripts, so they cannot rot. Assertions are on the shape and validity of
the results, plus what must hold exactly: with exits off TIDE is stock."""
import json
import math
import os
import random
import subprocess
import sys

import pytest

from conftest import DEFAULT_MODEL, ROOT, requires_engine
from helpers import synthetic_router



# The GPU machine has no vLLM: runs with without_vllm make any import of it fail, as it would there.
WITHOUT_VLLM = "import sys, runpy; sys.modules['vllm'] = None; sys.argv = sys.argv[1:]; "


def run(script, *args, without_vllm=False):
    path = os.path.join(ROOT, "benchmarks", script)
    python = [sys.executable, "-c", WITHOUT_VLLM + "runpy.run_path(sys.argv[0], run_name='__main__')"] \
        if without_vllm else [sys.executable]
    out = subprocess.run([*python, path, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def run_with_router(tmp_path, script, fire_at, *args, seed=0):
    """Run a benchmark script on the default model with a synthetic router; its JSON result."""
    router, res = str(tmp_path / "r.safetensors"), tmp_path / "result.json"
    synthetic_router(DEFAULT_MODEL, router, fire_at, seed=seed)
    run(script, "--model", DEFAULT_MODEL, "--router", router, *args, "--json", str(res))
    return json.loads(res.read_text())


@pytest.mark.e2e
@requires_engine
def test_quality_benchmark_smoke(tmp_path):
    result = run_with_router(tmp_path, "quality.py", {27: "some"}, "--split", "dev", "--tokens", "300", "--chunk", "128",
                             "--gen-prompts", "3", "--gen-tokens", "6", "--thresholds", "0.5", "1.0", "--chat", seed=2)
    # the questions went through the model's chat template
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    with open(os.path.join(ROOT, "data", "gsm8k", "test.jsonl")) as f:
        questions = [json.loads(line)["question"] for line in f][:3]
    chat = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            for q in questions]
    assert result["generation_prompt_tokens"] == [len(tok(text, add_special_tokens=False)["input_ids"]) for text in chat]
    rows = {r["threshold"]: r for r in result["rows"]}
    off = rows[1.0]
    assert off["top1_agreement"] == 1.0 and off["ppl_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert off["gen_exact_match"] == 1.0 and off["text_partial_layer_fraction"] == 0.0
    # transcripts: the continuation positions of stock's own greedy transcripts (an off-by-one would
    # score each token against itself and agree almost never)
    assert result["stock_transcript_self_agreement"] >= 0.9
    assert off["transcript_agreement"] == 1.0 and off["transcript_positions"] == 3 * 6
    on = rows[0.5]
    assert on["transcript_positions"] == 3 * 6 and on["transcript_exits_per_layer"]["27"] > 0
    assert 0 < on["text_exits_per_layer"]["27"] and 0 < on["text_partial_layer_fraction"] < 1
    assert 0 <= on["top1_agreement"] <= 1 and on["ppl_ratio"] > 0 and on["tokens"] == off["tokens"] > 250


@pytest.mark.e2e
@requires_engine
def test_quality_benchmark_on_your_own_text_and_prompts(tmp_path):
    """--text and --prompts replace the built-in split and GSM8K questions: the counted positions and
    the prompts' token counts are those of the given files."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The lighthouse keeper climbed the stairs every evening at dusk. " * 12)
    (docs / "b.txt").write_text("Rivers carry sediment to the sea, where deltas slowly grow. " * 12)
    prompts = ["Write a haiku about autumn.", "def add(a, b):\\n    return", "Translate 'good morning' to French."]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    result = run_with_router(tmp_path, "quality.py", {27: "some"}, "--text", str(docs), "--prompts",
                             str(tmp_path / "prompts.txt"), "--chunk", "64", "--gen-tokens", "5",
                             "--thresholds", "1.0")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    texts = [(docs / f).read_text() for f in ("a.txt", "b.txt")]
    ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    # every 64-token chunk scores all its tokens but the first
    assert result["rows"][0]["tokens"] == len(ids) - math.ceil(len(ids) / 64)
    plain = [p.replace("\\n", "\n") for p in prompts]
    assert result["generation_prompt_tokens"] == [len(tok(p)["input_ids"]) for p in plain]
    off = result["rows"][0]
    assert off["top1_agreement"] == 1.0 and off["gen_exact_match"] == 1.0 and 0 < off["transcript_positions"] <= 3 * 5


@pytest.mark.parametrize("script", ["demo.py", "load_test.py", "quality.py"])
def test_scripts_name_a_missing_router_in_one_sentence(script, tmp_path):
    """Before any engine or server starts: exit status 2 and the one sentence, no traceback."""
    missing = str(tmp_path / "nope.safetensors")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--router", missing],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: The TIDE router file {missing} does not exist; create one with " \
                                 f"`python calibration/calibrate.py --model MODEL --output {missing}`."


def test_quality_benchmark_rejects_missing_text(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--text",
                          str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip() == f"error: --text {str(tmp_path / 'nope')!r} does not exist; pass text files or " \
                                 f"folders of .txt, .md or .jsonl files."


@pytest.mark.e2e
@requires_engine
def test_speed_benchmark_smoke(tmp_path):
    m = run_with_router(tmp_path, "speed.py", {15: "all"}, "--threshold", "0.5", "--repeats", "1",
                        "--modes", "decode_b1", "--execution", "eager")["modes"]["decode_b1"]
    assert m["stock_tok_s"] > 0 and m["tide_tok_s"] > 0 and m["ratio"] > 0
    # both start orders ran, and the ratio is their geometric mean
    assert m["ratio"] == pytest.approx((m["ratio_stock_first"] * m["ratio_tide_first"]) ** 0.5)
    assert m["skipped_layer_fraction"] == pytest.approx(14 / 30)     # every token exits at 15


def test_speed_ratio_cancels_the_start_order_factor():
    """Whichever engine starts second runs faster by some factor f on this machine: the halves read
    r*f and r/f, and the reported ratio must be r."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import speed
    rng = random.Random(0)
    r, f = 0.97, 1.2

    def half(factor):      # pairs whose stock/TIDE time ratios are r * factor * noise
        stock = [{"seconds": 1.0, "tokens": 64} for _ in range(5)]
        tide = [{"seconds": 1.0 / (r * factor * rng.uniform(0.99, 1.01)), "tokens": 64, "skipped": 0.1}
                for _ in range(5)]
        return {"stock": stock, "tide": tide}
    m = speed.summarize({"stock_first": half(f), "tide_first": half(1 / f)})
    assert m["ratio_stock_first"] == pytest.approx(r * f, rel=0.011)
    assert m["ratio_tide_first"] == pytest.approx(r / f, rel=0.011)
    assert m["ratio"] == pytest.approx(r, rel=0.011)
    assert m["ratio_min"] < r / f * 1.011 and m["ratio_max"] > r * f / 1.011
    assert m["skipped_layer_fraction"] == 0.1 and m["stock_tok_s"] == 64
    # more halves: each pair of engine processes also has its own factor (g, h), which averages down
    assert speed.half_names(4) == ["stock_first", "tide_first", "stock_first_2", "tide_first_2"]
    g, h = 1.1, 0.95
    m = speed.summarize({"stock_first": half(f * g), "tide_first": half(h / f), "stock_first_2": half(f / g),
                         "tide_first_2": half(1 / (f * h))})
    assert m["ratio"] == pytest.approx(r, rel=0.011) and len(m["ratio_per_half"]) == 4
    assert m["ratio_stock_first"] == pytest.approx(r * f, rel=0.011)
    assert m["ratio_tide_first"] == pytest.approx(r / f, rel=0.011)


@pytest.mark.parametrize("halves", ["3", "0"])
def test_speed_benchmark_rejects_odd_halves(halves):
    """One sentence before any engine starts (an odd count would not cancel the start-order factor)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--halves", halves],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--halves must be an even number of at least 2" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
@requires_engine
def test_forward_overhead_benchmark_smoke(tmp_path):
    r = run_with_router(tmp_path, "forward_overhead.py", {15: "all"}, "--threshold", "1.0", "--tokens", "4",
                        "--repeats", "2", "--execution", "eager")
    assert r["steps"] == 8          # both forwards timed on every real step: 4 tokens (prefill included) x 2
    assert r["median_ms"]["stock"] > 0 and r["median_ms"]["tide"] > 0 and r["speed_ratio_stock_over_tide"] > 0


@pytest.mark.e2e
@requires_engine
def test_split_rule_benchmark_smoke(tmp_path):
    r = run_with_router(tmp_path, "split_rule.py", {11: "some", 19: "some"}, "--threshold", "0.5", "--min-layer", "0",
                        "--prompt-tokens", "24", "--batch", "2", "--repeats", "2", "--execution", "eager",
                        "--rule", "4", "0.1", seed=3)
    assert r["steps"] == 2 and set(r["median_ms"]) == {"stock", "engine rule (16 rows and 25%)", "every exit taken",
                                                       "only when no row is left running", "split at 4 rows and 10%"}
    assert all(v > 0 for v in r["median_ms"].values()) and sum(r["exit_fraction_per_layer"].values()) > 0


def test_ops_benchmark_smoke(tmp_path):
    """ops_bench.py runs only in the rare device session (scripts/gpu_check.sh), so its code is run here,
    on CPU at tiny shapes (twin against twin) and without vLLM, where a bug cannot waste that session."""
    res = tmp_path / "ops.json"
    out = run("ops_bench.py", "--smoke", "--json", str(res), without_vllm=True)
    r = json.loads(res.read_text())
    ops = ("router_score", "router_score:cuda_cores", "router_score:cublas", "compact", "kv_project",
           "kv_cache_write")      # router scoring as dispatched, then with each of its kernels forced
    assert [(e["op"], e["tokens"]) for e in r["rows"]] == [(op, n) for n in (1, 33) for op in ops]
    assert [e["tokens"] for e in r["router_sweep"]] == [2]
    assert all(r["router_sweep"][0][f"{k}_{t}_ms"] > 0 for k in ("cuda_cores", "cublas")
               for t in ("call", "device"))
    times = ("cuda_call_ms", "twin_call_ms", "cuda_device_ms", "twin_device_ms")
    assert all(e[t] > 0 for e in r["rows"] for t in times)
    assert all(0 < e["fraction_of_copy"] for e in r["rows"] if e["op"] == "kv_cache_write")
    assert r["goals"]["router_min_speedup_call"] == min(e["speedup_call"] for e in r["rows"] if e["op"] == "router_score")
    assert "goal: router_score" in out


@pytest.mark.parametrize("tests,at_least", [("tests/test_ops.py", 100), ("tests/test_calibration.py", 3),
                                            ("tests/test_compiled_layers.py", 2)])
def test_gpu_tests_collect_without_vllm(tests, at_least):
    """scripts/gpu_check.sh runs `pytest TESTS -k cuda` on a machine without vLLM."""
    code = WITHOUT_VLLM + ("import pytest; sys.exit(pytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider', "
                           f"'-k', 'cuda', '{tests}']))")
    proc = subprocess.run([sys.executable, "-c", code, "x"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = int(proc.stdout.split(" tests collected")[0].split()[-1].split("/")[0])
    assert collected >= at_least, proc.stdout[-500:]


def test_frontier_choice_and_report(tmp_path):
    """The frontier's preset choice follows the bars on dev figures, and the report writes its JSON,
    table and plots (fabricated figures; the measurements themselves are the benchmark's job)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import frontier

    def point(v, t, agree, ppl, exited, split="dev", size="dev"):
        return {"variant": v, "threshold": t, "min_layer": 11, "split": split, "size": size, "top1_agreement": agree,
                "ppl_ratio": ppl, "exited_fraction": exited, "gen_exact_match": 0.5, "gen_skipped_layer_fraction": exited,
                "text_exits_per_layer": {"11": 10, "19": 5}, "tokens": 100}
    runs = {"a|0.99|11|dev|dev": point("kl:affine", 0.99, 0.985, 1.01, 0.02),
            "a|0.9|11|dev|dev": point("kl:affine", 0.9, 0.96, 1.05, 0.06),
            "b|0.5|11|dev|dev": point("top1:identity", 0.5, 0.91, 1.9, 0.12),
            "b|0.4|11|dev|dev": point("top1:identity", 0.4, 0.85, 3.0, 0.20)}
    chosen = frontier.choose(frontier.dev_points(runs))
    assert chosen["default"]["threshold"] == 0.99 and chosen["balanced"]["threshold"] == 0.9
    assert chosen["fast"]["threshold"] == 0.5                      # 0.4 misses the 90% bar
    runs["kl:affine|0.99|11|test|full"] = point("kl:affine", 0.99, 0.98, 1.02, 0.02, "test", "full")
    runs["speed|kl:affine|0.99|11"] = {"modes": {m: {"ratio": 1.05} for m in ("decode_b1", "decode_b8", "prefill")}}
    args = frontier.parse_args(["--variants", "kl:affine", "top1:identity", "--out", str(tmp_path)])
    frontier.stage_report(args, runs)
    summary = json.loads((tmp_path / "frontier.json").read_text())
    assert summary["chosen_on_dev"]["default"]["threshold"] == 0.99 and summary["test"]["default"]["ppl_ratio"] == 1.02
    assert "| default | kl:affine | 0.99 | 11 |" in (tmp_path / "frontier.md").read_text()
    for png in ("frontier.png", "exit_histogram.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_demo_shows_the_best_point_when_the_default_keeps_exits_off(tmp_path, capsys):
    """The demo of early exit must exit: when the router's default keeps exits off (no point paid for
    its checkpoints), it says so and runs the default bar's best point explicitly."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import demo
    path = str(tmp_path / "r.safetensors")
    ckpt = synthetic_router(DEFAULT_MODEL, path, {27: "some"}, threshold=1.0, min_layer=27)
    ckpt.extra["presets"] = {"default": None, "fast": {"threshold": 0.5, "min_layer": 27, "skipped_fraction": 0.02}}
    ckpt.extra["unpaid"] = {"default": {"threshold": 0.8, "min_layer": 27, "skipped_fraction": 0.007}}
    ckpt.save(path)
    tide = {"router": path}
    demo.explain_exits_off(tide, ckpt)
    assert tide == {"router": path, "threshold": 0.8, "min_layer": 27}
    assert "keeps exits off" in capsys.readouterr().out
    for exits in ({"router": path, "preset": "fast"}, {"router": path, "threshold": 0.9}):
        before = dict(exits)
        demo.explain_exits_off(exits, ckpt)
        assert exits == before and capsys.readouterr().out == ""


def test_propagation_maps_benchmark(tmp_path):
    """The propagation experiment (HF only): its fitted maps reproduce an exactly affine update, without
    maps it is exactly the plugin's reference simulator (copy propagation), and mapped states change
    only later tokens (the exited tokens' own predictions are the same both ways)."""
    import runpy
    import torch
    bench = runpy.run_path(os.path.join(ROOT, "benchmarks", "propagation_maps.py"))
    # fit_maps: x_j = x + x A_j + b_j is recovered
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g, dtype=torch.float64)
    truth = {j: (0.3 * torch.randn(16, 16, generator=g, dtype=torch.float64), torch.randn(16, generator=g,
                                                                                             dtype=torch.float64))
             for j in (3, 4)}
    states = {2: x, **{j: x + x @ a + b for j, (a, b) in truth.items()}}
    maps = bench["fit_maps"](states, [1], 5, ridge=1e-9)
    assert set(maps) == {(1, 3), (1, 4)}
    for j, (a, b) in truth.items():
        assert torch.allclose(maps[(1, j)][0].double(), a, atol=1e-4) and torch.allclose(maps[(1, j)][1].double(), b, atol=1e-4)
    # without maps it is the plugin's reference simulator (copy propagation), exactly
    from transformers import AutoModelForCausalLM
    from helpers import make_tiny_model
    from vllm_tide.checkpoint import RouterCheckpoint
    from vllm_tide.simulate import ExitSimulator
    tiny = make_tiny_model("llama", str(tmp_path / "tiny"), DEFAULT_MODEL)
    synthetic_router(tiny, str(tmp_path / "tiny.safetensors"), {3: "some"}, seed=1)
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ckpt = RouterCheckpoint.load(str(tmp_path / "tiny.safetensors"))
    ids = torch.randint(0, 1000, (40,), generator=g).tolist()
    want_logits, want_exits, _ = ExitSimulator.from_checkpoint(hf, ckpt, 0.5, 0).run(ids)
    copy = bench["MappedExits"].from_checkpoint(hf, ckpt, 0.5, 0)
    got_logits, got_exits, _ = copy.run(ids)
    assert 0 < (want_exits >= 0).sum() < len(ids) and torch.equal(got_exits, want_exits)
    assert torch.equal(got_logits, want_logits)
    # the experiment end to end on the default model, with a router that exits some tokens at layer 23
    router, res = str(tmp_path / "r.safetensors"), tmp_path / "result.json"
    synthetic_router(DEFAULT_MODEL, router, {23: "some"}, seed=4)
    run("propagation_maps.py", "--model", DEFAULT_MODEL, "--router", router, "--fit-tokens", "512",
        "--val-tokens", "256", "--points", "0.5:23", "--search", "--json", str(res))
    copy, mapped = (json.loads(res.read_text())["points"][0][k] for k in ("copy", "mapped"))
    assert copy["exit_rate"] == mapped["exit_rate"] > 0.1
    assert copy["disagreements"]["exited"] == mapped["disagreements"]["exited"]
    assert copy["kl"] != mapped["kl"]      # the deeper layers' K/V did change
