"""Calibration end to end on tiny models built here; labels checked against an independent computation."""
import math
import os

import pytest
import torch

from conftest import DEFAULT_MODEL
from helpers import WORDS, make_tiny_model
from vllm_tide.calibrate import CalibrationConfig, calibrate
from vllm_tide.exit_labels import States, auc, cosine_labels, exit_metrics, kl_labels
from vllm_tide.operating_points import PropagatedEval, choose_presets, choose_propagated, net_layers_saved
from vllm_tide.checkpoint import RouterCheckpoint
from vllm_tide.errors import TideConfigError
from vllm_tide.projection import ExitProjection, fit_affine, fit_temperature

needs_tokenizer = pytest.mark.skipif(not os.path.isdir(DEFAULT_MODEL), reason="needs the default model's tokenizer (make setup)")


def corpus(tmp_path):
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        idx = torch.randint(0, len(WORDS), (600,), generator=g)
        (tmp_path / f"doc{i}.txt").write_text(" ".join(WORDS[j] for j in idx))
    return [str(tmp_path)]


@needs_tokenizer
@pytest.mark.parametrize("family,criterion,projection,cost", [("llama", "top1", "identity", 100.0),
                                                              ("qwen2", "kl", "temperature", 0.0),
                                                              ("qwen3", "cosine", "affine", 0.0),
                                                              ("phi3", "top1", "affine", 0.0),
                                                              ("granite", "kl", "temperature", 0.0),
                                                              ("gemma3", "kl", "affine", 0.0)])
def test_calibration_end_to_end(tmp_path, family, criterion, projection, cost):
    from vllm_tide.simulate import ExitSimulator
    from transformers import AutoModelForCausalLM
    model = make_tiny_model(family, str(tmp_path / "m"), DEFAULT_MODEL, num_layers=6)
    out = str(tmp_path / "r.safetensors")
    prompts = None
    if family == "qwen2":   # the model's answers to the user's own prompts instead of the built-in ones
        prompts = str(tmp_path / "prompts.txt")
        (tmp_path / "prompts.txt").write_text("Explain taxes.\nWrite a story about a king.\nList three rivers.\n")
    # loose targets so that the propagated search finds a point that exits on a random tiny model
    ckpt = calibrate(CalibrationConfig(model=model, output=out, corpus=corpus(tmp_path), max_tokens=3000,
                                       seq_len=128, interval=2, epochs=2, dtype="float32", criterion=criterion,
                                       exit_projection=projection, kl_bound=2.0, target_agreement=0.5,
                                       max_ppl_increase=10.0, select_tokens=256, answer_tokens=96,
                                       answer_prompts=prompts, checkpoint_cost=cost))
    back = RouterCheckpoint.load(out)
    assert back.layers == [1, 3] and 5 not in back.layers          # never the final layer
    assert back.tokens == ckpt.tokens >= 2500
    assert back.projection == projection and back.criterion == criterion
    assert sorted(back.projections) == ([] if projection == "identity" else [1, 3])
    rows = back.extra["validation"]
    assert [r["layer"] for r in rows] == [1, 3] and all(0 <= r["positive_rate"] <= 1 for r in rows)
    # lossless mode's drafting routers: saved beside the exit routers, judged on top-1 (each checkpoint's
    # drafts are right as often as its exits agree) and a preset chosen by the modelled speed
    lossless = back.extra["lossless"]
    assert sorted(back.draft_routers) == [1, 3] and back.draft_routers[1]["down.weight"].shape == (ckpt.bottleneck, back.model.hidden_size)
    assert not torch.equal(back.draft_routers[1]["down.weight"], back.routers[1]["down.weight"])
    assert [r["right"] for r in lossless["checkpoints"]] == [r["exit_top1_agreement"] for r in rows]
    preset = lossless["preset"]
    assert preset["min_layer"] in (1, 3) and preset["pays"] == (preset["speedup"] > 1)
    # judged on the validation text and on the model's own answers: its figure is the lesser set's
    assert set(preset["by_set"]) == {"text", "answers"}
    assert preset["speedup"] == min(r["speedup"] for r in preset["by_set"].values())
    presets, chosen = back.extra["presets"], back.extra["propagated"]
    assert set(presets) == {"default", "balanced", "fast"} and presets["default"] == chosen
    assert len(back.extra["propagated_evaluations"]) >= 2 and back.extra["answer_tokens"] == 96
    assert (back.extra["answer_prompts"] == prompts) == (prompts is not None)
    for r in back.extra["propagated_evaluations"]:    # judged on the text and on the model's own answers
        assert set(r["by_set"]) == {"text", "answers"}
        assert r["skipped_fraction"] == min(m["skipped_fraction"] for m in r["by_set"].values())
    if cost > 0:    # no point saves 100 layers per checkpoint: every preset keeps exits off
        assert chosen is None and back.suggested_threshold == 1.0 and set(presets.values()) == {None}
        # the best points are kept, and the post-hoc report describes the default bar's
        chosen = back.extra["unpaid"]["default"]
        assert (back.extra["post_hoc"]["threshold"], back.extra["post_hoc"]["min_layer"]) == \
            (chosen["threshold"], chosen["min_layer"])
    else:           # the suggestion is the propagated measurement's
        assert chosen is not None and (chosen["threshold"], chosen["min_layer"]) == \
            (back.suggested_threshold, back.suggested_min_layer) and back.extra["unpaid"] == {}
    assert chosen["top1_agreement"] >= 0.5 and chosen["ppl_ratio"] <= 11.0
    for p in [*presets.values(), *back.extra["unpaid"].values()]:   # each met its bar in the measurement
        assert p is None or p in back.extra["propagated_evaluations"]
    # the saved point, read back by the independent reference (its own reading of the file and its own
    # forward), exits exactly as calibration's simulator does with the calibrated modules
    from reference import TideReference
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = list(range(100, 228))
    logits, exit_at, _ = ExitSimulator.from_checkpoint(hf, back, chosen["threshold"], chosen["min_layer"]).run(ids)
    want, want_exit, _ = TideReference(model, out, chosen["threshold"], chosen["min_layer"]).run(ids)
    assert exit_at.tolist() == want_exit.tolist() and (want_exit >= 0).any()
    assert set(exit_at.tolist()) <= {-1, 1, 3} and all(e < 0 or e >= chosen["min_layer"] for e in exit_at.tolist())
    assert (logits.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def _states(z: dict, final, top1, target):
    return States(z=z, final=final, top1=top1, target=target)


def test_kl_labels_and_metrics_match_independent_computation():
    """KL(final || exit), the exit top-1 and next-token NLLs, per token and checkpoint, computed
    independently with plain softmax sums; kl labels = KL below the bound and the same top-1."""
    g = torch.Generator().manual_seed(2)
    n, d, v = 150, 12, 40
    final = torch.randn(n, d, generator=g)
    z = {1: final + 0.3 * torch.randn(n, d, generator=g), 3: final + 0.05 * torch.randn(n, d, generator=g)}
    w = torch.randn(v, d, generator=g)
    top1 = (final @ w.T).argmax(-1)
    target = torch.randint(0, v, (n,), generator=g)
    target[-1] = -1
    projs = {1: ExitProjection(temperature=1.7), 3: None}
    m = exit_metrics(_states(z, final, top1, target), projs, w, with_kl=True, chunk=37)
    for c, scale in ((1, 1 / 1.7), (3, 1.0)):
        for i in range(0, n, 7):
            p = torch.softmax(final[i] @ w.T, -1).double()
            q = torch.softmax((z[c][i] @ w.T) * scale, -1).double()
            assert m[c].kl[i].item() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-4, abs=1e-6)
            assert bool(m[c].agree[i]) == (int((z[c][i] @ w.T).argmax()) == int(top1[i]))
            if target[i] >= 0:
                assert m[c].nll_exit[i].item() == pytest.approx(-float(q[target[i]].log()), rel=1e-4)
                assert m[c].nll_final[i].item() == pytest.approx(-float(p[target[i]].log()), rel=1e-4)
        assert torch.isnan(m[c].nll_exit[-1])
        labels = kl_labels(m[c], 0.05)
        assert torch.equal(labels, (m[c].kl < 0.05) & m[c].agree)
    assert kl_labels(m[3], 0.05).float().mean() > kl_labels(m[1], 0.05).float().mean()   # closer state, more exits


def test_label_outcomes_on_a_shortlist_equal_the_full_computation():
    """Labels skip the full-vocabulary product for rows a shortlist already shows disagreeing: the top-1
    agreement and the KL where it agrees must equal the full computation's, token for token (and the
    temperatures fitted on the first rows equal a fit on those rows alone)."""
    from vllm_tide.exit_labels import TEMPERATURE_SAMPLE, exit_outcomes, fit_temperature as fit_t
    g = torch.Generator().manual_seed(5)
    n, d, v = 3000, 16, 400
    final = torch.randn(n, d, generator=g)
    z = {c: final + noise * torch.randn(n, d, generator=g) for c, noise in ((2, 1.0), (5, 0.2))}
    w = torch.randn(v, d, generator=g)
    target = torch.randint(0, v, (n,), generator=g)
    projs = {2: ExitProjection(), 5: ExitProjection(weight=torch.eye(d) * 1.1, bias=torch.zeros(d))}
    states = _states(z, final, None, target)
    labels, fitted = exit_outcomes(states, projs, w, with_kl=True, with_nll=False, fit_temperatures=True, chunk=500)
    full = exit_metrics(states, fitted, w, with_kl=True, chunk=700)
    for c in projs:
        assert torch.equal(labels[c].agree, full[c].agree) and 0.05 < labels[c].agree.float().mean() < 0.95
        ok = labels[c].agree
        assert torch.allclose(labels[c].kl[ok], full[c].kl[ok], rtol=1e-5, atol=1e-6)
        assert torch.isinf(labels[c].kl[~ok]).all()
        rows = slice(0, TEMPERATURE_SAMPLE)
        want = fit_t(projs[c].apply(z[c][rows]) @ w.T, torch.log_softmax(final[rows] @ w.T, -1))
        assert fitted[c].temperature == pytest.approx(want, rel=1e-5)


def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 60, generator=g) * 3
    final_logp = torch.log_softmax(logits / 2.5, -1)        # the final distribution is the exit's at T=2.5
    assert fit_temperature(logits, final_logp) == pytest.approx(2.5, rel=1e-3)
    # against a brute-force grid on a noisy problem
    final_logp = torch.log_softmax(logits / 1.8 + 0.5 * torch.randn(300, 60, generator=g), -1)
    grid = torch.linspace(0.5, 4.0, 701)
    p = final_logp.exp()
    kls = [(p * (final_logp - torch.log_softmax(logits / t, -1))).sum(-1).mean().item() for t in grid]
    best = float(grid[int(torch.tensor(kls).argmin())])
    assert fit_temperature(logits, final_logp) == pytest.approx(best, abs=0.01)
    # a final distribution sharper or flatter than any temperature in [e^-3, e^3] gives: the bound
    assert fit_temperature(logits, torch.log_softmax(logits * 100, -1)) == pytest.approx(math.exp(-3))
    assert fit_temperature(logits, torch.log_softmax(logits / 1000, -1)) == pytest.approx(math.exp(3))


def test_fit_affine_recovers_a_known_map_full_and_low_rank():
    g = torch.Generator().manual_seed(4)
    n, d = 2000, 16
    z = torch.randn(n, d, generator=g)
    u, v = torch.randn(d, 2, generator=g), torch.randn(2, d, generator=g)
    a = torch.eye(d) + u @ v
    b = torch.randn(d, generator=g)
    target = z @ a.T + b
    full = fit_affine(z, target, ridge=1e-6)
    assert torch.allclose(full.weight, a, atol=1e-4) and torch.allclose(full.bias, b, atol=1e-4)
    low = fit_affine(z, target, ridge=1e-6, rank=2)
    assert low.weight is None and low.u.shape == (d, 2) and low.v.shape == (2, d)
    assert torch.allclose(low.apply(z), target, atol=1e-3)
    assert torch.allclose(full.apply(z), target, atol=1e-3)


def test_labels_match_independent_computation():
    """top1: the exit's argmax equals the final argmax; cosine: cos(exit, final) > 0.98 after the final norm."""
    g = torch.Generator().manual_seed(1)
    n, d, v = 200, 16, 50
    z, final = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    final[:80] = z[:80] + 0.01 * torch.randn(80, d, generator=g)
    w = torch.randn(v, d, generator=g)
    final_top1 = (final @ w.T).argmax(-1)
    want = torch.tensor([int(torch.argmax(w @ z[i])) == int(final_top1[i]) for i in range(n)])
    def top1_labels(proj, chunk=4096):     # top1 labels are exit_metrics' agreement
        states = _states({0: z}, final, final_top1, torch.full((n,), -1))
        return exit_metrics(states, {0: proj}, w, with_kl=False, with_nll=False, chunk=chunk)[0].agree
    assert torch.equal(top1_labels(None, chunk=33), want)
    proj = ExitProjection(weight=torch.eye(d) * 2, bias=torch.zeros(d))
    assert torch.equal(top1_labels(proj), want)        # argmax is scale-invariant
    cos = torch.tensor([float(z[i] @ final[i] / (z[i].norm() * final[i].norm())) for i in range(n)])
    assert torch.equal(cosine_labels(z, None, final, 0.98), cos > 0.98)
    assert cosine_labels(z, None, final, 0.98)[:80].all()


def test_auc():
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 1, 0, 1])) == 0.5


@needs_tokenizer
def test_empty_corpus_is_a_clear_error(tmp_path):
    model = make_tiny_model("llama", str(tmp_path / "m"), DEFAULT_MODEL, num_layers=4)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(TideConfigError, match="corpus is empty"):
        calibrate(CalibrationConfig(model=model, output=str(tmp_path / "r.safetensors"),
                                    corpus=[str(tmp_path / "empty")], max_tokens=2000, interval=2))
    with pytest.raises(TideConfigError, match="interval"):
        calibrate(CalibrationConfig(model=model, output=str(tmp_path / "r.safetensors"),
                                    corpus=[str(tmp_path / "empty")], max_tokens=2000, interval=4))


def test_corpus_reads_text_markdown_and_json_lines(tmp_path):
    """--corpus / --text: files as given, folders by their .txt, .md and .jsonl files in sorted order
    (nested too, nothing else), a .jsonl file one document per line; a bad line is one sentence."""
    from vllm_tide.corpus import read_texts
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("plain text")
    (d / "b.md").write_text("# Markdown\n\n`code`")
    (d / "c.jsonl").write_text('"a string"\n\n{"text": "a text field", "id": 1}\n{"content": "a content field"}\n')
    (d / "d.py").write_text("print('not text')")
    (d / "sub" / "e.txt").write_text("nested")
    (tmp_path / "f.log").write_text("a file given by name")
    assert read_texts([str(d), str(tmp_path / "f.log")]) == [
        "plain text", "# Markdown\n\n`code`", "a string", "a text field", "a content field", "nested",
        "a file given by name"]
    (d / "c.jsonl").write_text('{"text": "ok"}\n\n{"label": 3}\n')
    with pytest.raises(TideConfigError, match=r"Line 3 of '.*c\.jsonl' is not a JSON string or an object"):
        read_texts([str(d)])


def test_operating_point_choice_pays_for_its_checkpoints():
    """Among points meeting a bar, a shallower minimum exit layer wins only if the extra layers it
    skips outweigh the extra checkpoints it runs (each costing checkpoint_cost decoder layers)."""
    layers, num_layers = [3, 7, 11], 16
    reach = {3: 0.5, 7: 0.4, 11: 0.3}   # a shallower minimum skips more at every threshold

    def evaluate(t, m):
        return {"threshold": t, "min_layer": m, "top1_agreement": t, "ppl_ratio": 1.0,
                "skipped_fraction": (1 - t) * reach[m]}
    # at the 0.9 bar: 0.8, 0.64 and 0.48 layers skipped per token with 3, 2 and 1 checkpoints
    pick = lambda cost: choose_propagated(evaluate, layers, 0.9, None, None, num_layers, cost)  # noqa: E731
    assert (pick(0.0)["threshold"], pick(0.0)["min_layer"]) == (0.9, 3)
    assert pick(0.1)["min_layer"] == 3            # nets 0.5, 0.44, 0.38
    assert pick(0.2)["min_layer"] == 11           # nets 0.2, 0.24, 0.28
    assert pick(0.5)["min_layer"] == 11           # nets -0.7, -0.36, -0.02: the best, though it does not pay
    assert net_layers_saved(0.05, 3, layers, num_layers, 0.5) == pytest.approx(0.8 - 1.5)
    assert choose_propagated(evaluate, layers, 0.9, None, 7, num_layers, 0.5)["min_layer"] == 7   # a fixed minimum
    assert choose_propagated(evaluate, layers, 1.0, None, None, num_layers, 0.5) is None         # no point meets it
    presets, unpaid = choose_presets(evaluate, layers, 0.9, 0.02, None, num_layers, 0.0)
    assert presets["fast"] == evaluate(0.9, 3) and presets["default"] == evaluate(0.9, 3) and unpaid == {}
    nothing = lambda t, m: {**evaluate(t, m), "skipped_fraction": 0.0}  # noqa: E731
    assert choose_presets(nothing, layers, 0.9, 0.02, None, num_layers, 0.0)[0]["default"] == nothing(0.9, 3)
    # a preset is only a point that pays: at cost 0.5 the 0.9 bar's best nets -0.02 layers, so exits off;
    # the 0.9 "fast" bar is the same bar here, and "balanced" (0.95) nets 0.05*0.3*16 - 0.5 = -0.26
    presets, unpaid = choose_presets(evaluate, layers, 0.9, 0.02, None, num_layers, 0.5)
    assert presets == {"default": None, "balanced": None, "fast": None}
    assert unpaid["default"] == unpaid["fast"] == evaluate(0.9, 11) and unpaid["balanced"]["threshold"] == 0.95
    presets, unpaid = choose_presets(evaluate, layers, 0.9, 0.02, None, num_layers, 0.2)
    assert presets["default"] == presets["fast"] == evaluate(0.9, 11) and unpaid == {}
    assert presets["balanced"] == evaluate(0.95, 11)       # nets -0.2, -0.08, +0.04


def test_post_hoc_bound_prunes_the_propagated_search_without_changing_its_choice():
    """Post-hoc figures start each depth's threshold search at its lowest post-hoc pass and skip depths whose
    post-hoc saving (with its margin) cannot beat the best point found: fewer simulations, the same choice
    as the exhaustive search whenever propagation only loses fidelity and skipping."""
    from vllm_tide.exit_labels import ExitMetrics
    from vllm_tide.operating_points import THRESHOLD_GRID, PostHocBound
    g = torch.Generator().manual_seed(6)
    layers, num_layers, n = [3, 7, 11], 16, 4000
    scores = {c: torch.rand(n, generator=g) for c in layers}
    # exits at 11 are right far more often than at 3 or 7
    agree = {c: torch.rand(n, generator=g) < {3: 0.5, 7: 0.7, 11: 0.99}[c] for c in layers}
    nll = torch.zeros(n)
    metrics = {c: ExitMetrics(agree[c], None, nll, nll) for c in layers}
    bound = PostHocBound(scores, metrics, num_layers)
    calls = []

    def propagated(t, m):     # a little worse than post hoc: agreement 0.2 points lower, same skipping
        calls.append((t, m))
        r = bound.figures(t, m)
        return {"threshold": t, "min_layer": m, "ppl_ratio": 1.0, "skipped_fraction": r["skipped_fraction"],
                "top1_agreement": r["top1_agreement"] - 0.002}
    want = choose_propagated(propagated, layers, 0.99, None, None, num_layers, 0.3)
    exhaustive = len(set(calls))
    calls.clear()
    got = choose_propagated(propagated, layers, 0.99, None, None, num_layers, 0.3, bound)
    assert got == want and got["min_layer"] == 11
    assert len(set(calls)) < exhaustive
    assert all(m == 11 for _, m in calls)          # depths 3 and 7 cannot pay for their checkpoints post hoc
    ok = lambda r: r["top1_agreement"] >= 0.99     # noqa: E731
    assert min(THRESHOLD_GRID.index(t) for t, _ in calls) >= bound.start(ok, 11)


def test_threshold_search_goes_below_one_half():
    """Router scores follow the labels, not the bar: a router trained on strict labels can meet a loose
    bar far below 0.5, and the search finds the lowest threshold that meets it."""
    def evaluate(t, m):     # agreement rises with the threshold: 0.89 at 0.05, 0.90 at 0.1
        return {"threshold": t, "min_layer": m, "top1_agreement": 0.88 + 0.2 * t, "ppl_ratio": 1.0,
                "skipped_fraction": 1 - t}
    assert choose_propagated(evaluate, [3], 0.9, None, None, 8, 0.0)["threshold"] == 0.1
    assert choose_propagated(evaluate, [3], 0.87, None, None, 8, 0.0)["threshold"] == 0.05


@needs_tokenizer
def test_own_answers_are_the_models_greedy_answers_to_chat_prompts(tmp_path):
    """The validation answers are the frozen model's greedy continuations of instruction prompts built
    from validation passages, with the prompt length marking where each answer starts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm_tide import answers
    model_dir = make_tiny_model("llama", str(tmp_path / "m"), DEFAULT_MODEL, num_layers=4)
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chunks = [tok(" ".join(["the nation is strong and the people are free."] * 30))["input_ids"][i:i + 128]
              for i in range(0, 256, 64)]
    got = answers.generate(hf, tok, chunks, tokens=40, max_new_tokens=16)
    lens = [len(seq) - n for seq, n in got]
    assert sum(lens) == 40 and lens == [16, 16, 8]
    for i, (seq, n) in enumerate(got):
        prompt = tok.decode(seq[:n])
        assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
        assert answers.INSTRUCTIONS[i] in prompt and "the people are free" in prompt
        with torch.no_grad():   # teacher-forced argmax at the positions before each answer token
            top1 = hf(torch.tensor([seq])).logits[0].argmax(-1)
        assert seq[n:] == top1[n - 1:-1].tolist()
    # the user's own prompts, one per line, through the chat template as they are
    (tmp_path / "p.txt").write_text("Write a haiku about rivers.\n\nFix this bug:\\nx = 1 +\n")
    own = answers.read_prompts(str(tmp_path / "p.txt"))
    assert own == ["Write a haiku about rivers.", "Fix this bug:\nx = 1 +"]
    got = answers.generate(hf, tok, chunks, tokens=20, max_new_tokens=16, own=own)
    assert [len(seq) - n for seq, n in got] == [16, 4]
    assert "<|im_start|>user\nFix this bug:\nx = 1 +<|im_end|>" in tok.decode(got[1][0][:got[1][1]])
    # a JSON Lines dataset or request log as it is: strings, or objects with the prompt under a known key
    (tmp_path / "p.jsonl").write_text('"Say hi."\n{"question": "What is 2 + 2?", "answer": "4"}\n\n'
                                      '{"id": 3, "prompt": "Line one\\nline two"}\n')
    assert answers.read_prompts(str(tmp_path / "p.jsonl")) == ["Say hi.", "What is 2 + 2?", "Line one\nline two"]
    (tmp_path / "bad.jsonl").write_text('{"question": "ok"}\n\n{"answer": "no prompt here"}\n')
    with pytest.raises(TideConfigError, match="Line 3 of --prompts .* is not a JSON string or an object"):
        answers.read_prompts(str(tmp_path / "bad.jsonl"), "--prompts")
    for bad, why in [("missing.txt", "Cannot read"), ("empty.txt", "holds no prompts")]:
        if bad == "empty.txt":
            (tmp_path / bad).write_text("\n \n")
        with pytest.raises(TideConfigError, match=why):
            CalibrationConfig(model=model_dir, output="", answer_prompts=str(tmp_path / bad)).validate()
    tok.chat_template = None    # a base model continues the passage itself
    plain = [tok.decode(p) for p in answers.prompts(tok, chunks, 2)]
    assert all("<|im_start|>" not in p and "the people are free" in p for p in plain)


@needs_tokenizer
def test_propagated_eval_counts_answer_tokens_and_judges_on_every_set(tmp_path):
    """With answers, every figure of a point is the worse of text and answers (answer positions only):
    the lower agreement, the higher perplexity ratio, the smaller saving; each matches a direct simulation. Text-only results stored by an older
    calibration are reused for the text set."""
    from transformers import AutoModelForCausalLM
    from helpers import synthetic_router
    from vllm_tide.simulate import ExitSimulator
    model_dir = make_tiny_model("llama", str(tmp_path / "m"), DEFAULT_MODEL, num_layers=8)
    ckpt = synthetic_router(model_dir, str(tmp_path / "r.safetensors"), {3: "some", 7: "never"}, interval=4)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    routers = {c: ckpt.router_module(c).eval() for c in ckpt.layers}
    g = torch.Generator().manual_seed(1)
    text = [torch.randint(100, 4000, (48,), generator=g).tolist() for _ in range(2)]
    answers = [(torch.randint(100, 4000, (40,), generator=g).tolist(), 25), (text[0][:30], 12)]
    ev = PropagatedEval(hf, text, routers, {}, 8, answers)
    r = ev(0.5, 0)

    def direct(items):
        full, sim = ExitSimulator(hf, {}, {}, 1.0, 0), ExitSimulator(hf, routers, {}, 0.5, 0)
        agree, dnll, after = [], [], []
        for seq, n in items:
            s = max(n - 1, 0)
            (lf, _, _), (le, ex, _) = full.run(seq), sim.run(seq)
            nxt = torch.tensor(seq[s + 1:])[:, None]
            agree.append(lf.argmax(-1)[s:-1] == le.argmax(-1)[s:-1])
            dnll.append(torch.log_softmax(lf[s:-1], -1).gather(1, nxt) - torch.log_softmax(le[s:-1], -1).gather(1, nxt))
            after.append(torch.where(ex[s:-1] >= 0, 7 - ex[s:-1], 0))
        a, d, k = torch.cat(agree), torch.cat(dnll).double(), torch.cat(after)
        return a.float().mean().item(), math.exp(d.mean().item()), k.sum().item() / (len(k) * 8), len(k)

    t_agree, t_ppl, t_skip, t_n = direct([(s, 0) for s in text])
    a_agree, a_ppl, a_skip, a_n = direct(answers)
    assert (t_n, a_n) == (2 * 47, 15 + 18)        # answer positions only: 40 - 25 and 30 - 12
    assert 0 < a_skip < 5 / 8 and 0 < t_skip < 5 / 8 and a_skip != t_skip
    by = r["by_set"]
    assert by["text"] == pytest.approx({"top1_agreement": t_agree, "ppl_ratio": t_ppl, "skipped_fraction": t_skip})
    assert by["answers"] == pytest.approx({"top1_agreement": a_agree, "ppl_ratio": a_ppl, "skipped_fraction": a_skip})
    assert r["top1_agreement"] == min(t_agree, a_agree) and r["ppl_ratio"] == max(t_ppl, a_ppl)
    assert r["skipped_fraction"] == min(t_skip, a_skip) and min(t_agree, a_agree) < 1.0
    # a result stored without per-set figures is the text set's; only the answers are measured again
    fresh = PropagatedEval(hf, text, routers, {}, 8, answers)
    fresh.remember({"threshold": 0.5, "min_layer": 0, "top1_agreement": 0.25, "ppl_ratio": 3.0, "skipped_fraction": 0.5})
    again = fresh(0.5, 0)
    assert again["by_set"]["text"]["top1_agreement"] == 0.25 and again["by_set"]["answers"] == by["answers"]
    assert PropagatedEval(hf, text, routers, {}, 8)(0.5, 0)["skipped_fraction"] == pytest.approx(t_skip)
    # a stored result with every set is kept as it is, and nothing is simulated for it
    stored = PropagatedEval(hf, text, routers, {}, 8, answers)
    stored.remember(r)
    assert stored.results == {(0.5, 0): r} and stored(0.5, 0) == r and stored._full == {}


@needs_tokenizer
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_simulation_from_a_checkpoint_matches_the_full_run(tmp_path, family):
    """Calibration simulates each point from the full model's recorded pass, starting at the point's
    first active checkpoint: the same exits and logits as the simulation from layer 0, and the recorded
    pass's logits are the full model's (qwen2: biases and a per-layer-type attention mask)."""
    from transformers import AutoModelForCausalLM
    from helpers import synthetic_router
    from vllm_tide.simulate import ExitSimulator, full_pass
    model_dir = make_tiny_model(family, str(tmp_path / "m"), DEFAULT_MODEL, num_layers=8)
    ckpt = synthetic_router(model_dir, str(tmp_path / "r.safetensors"), {3: "some", 5: "some"}, interval=2)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seq = torch.randint(100, 4000, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    prefix, logits = full_pass(hf, seq, ckpt.layers)
    with torch.no_grad():
        assert torch.equal(logits, hf(torch.tensor([seq])).logits[0].float())
    for min_layer, start in [(2, 3), (3, 3), (4, 5)]:
        sim = ExitSimulator.from_checkpoint(hf, ckpt, 0.5, min_layer)
        want_logits, want_exits, _ = sim.run(seq)
        got_logits, got_exits = sim.run_from(prefix, start)
        assert torch.equal(got_exits, want_exits) and (got_exits >= 0).sum() >= 3
        assert torch.allclose(got_logits, want_logits, rtol=0, atol=1e-5)
        assert (got_logits - logits).abs().max() > 1e-2       # the exits changed the outputs


@pytest.mark.parametrize("field,value,why", [
    ("criterion", "mse", "Unknown label criterion"), ("exit_projection", "mlp", "Unknown exit projection"),
    ("max_tokens", 500, "--max-tokens must be at least 1000"), ("target_agreement", 1.5, "--target-agreement"),
    ("kl_bound", 0.0, "--kl-bound must be a positive"), ("max_ppl_increase", -0.1, "--max-ppl-increase"),
    ("answer_tokens", -1, "--answer-tokens"), ("checkpoint_cost", float("nan"), "--checkpoint-cost"),
    ("affine_rank", 0, "--affine-rank"), ("device", "cuda", "--device cuda needs a CUDA GPU"),
    ("corpus", ["/nonexistent/a.txt"], "--corpus '/nonexistent/a.txt' does not exist"),
    ("output", "/proc/tide/r.safetensors", "Cannot write the router checkpoint"),
    ("output", "/tmp", "Cannot write the router checkpoint")])
def test_bad_calibration_settings_get_one_sentence(field, value, why):
    if field == "device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so --device cuda is fine")
    cfg = CalibrationConfig(model="m", output="o")
    cfg.validate()
    setattr(cfg, field, value)
    with pytest.raises(TideConfigError, match=why) as e:
        cfg.validate()
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_calibration_output_folder_is_made_up_front(tmp_path):
    out = tmp_path / "new" / "deeper" / "r.safetensors"
    CalibrationConfig(model="m", output=str(out)).validate()
    assert out.parent.is_dir() and not out.exists()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")


@needs_cuda
def test_exit_simulation_on_cuda_matches_cpu(tmp_path):
    """Calibration's simulations run where the model is (routers and projections are trained on the
    CPU): on a GPU, the same exits, logits and per-set figures as on the CPU."""
    from transformers import AutoModelForCausalLM
    from helpers import synthetic_router
    from vllm_tide.simulate import ExitSimulator, full_pass
    model_dir = make_tiny_model("qwen2", str(tmp_path / "m"), None, num_layers=8)
    ckpt = synthetic_router(model_dir, str(tmp_path / "r.safetensors"), {3: "some", 5: "some"}, interval=2,
                            projection="affine")
    cpu = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gpu = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().cuda()
    seq = torch.randint(100, 4000, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    for min_layer in (0, 4):
        want_logits, want_exits, _ = ExitSimulator.from_checkpoint(cpu, ckpt, 0.5, min_layer).run(seq)
        sim = ExitSimulator.from_checkpoint(gpu, ckpt, 0.5, min_layer)
        logits, exits, _ = sim.run(seq)
        assert torch.equal(exits.cpu(), want_exits) and (want_exits >= 0).sum() >= 3
        assert torch.allclose(logits.cpu(), want_logits, rtol=1e-4, atol=1e-4)
        prefix, _ = full_pass(gpu, seq, ckpt.layers)
        assert torch.equal(sim.run_from(prefix, min(sim.routers))[1].cpu(), want_exits)
    routers = {c: ckpt.router_module(c).eval() for c in ckpt.layers}
    text, answers = [seq, seq[::-1]], [(seq[:40], 20)]
    want = PropagatedEval(cpu, text, routers, ckpt.projections, 8, answers)(0.5, 3)["by_set"]
    got = PropagatedEval(gpu, text, routers, ckpt.projections, 8, answers)(0.5, 3)["by_set"]
    for name in ("text", "answers"):
        assert got[name] == pytest.approx(want[name], rel=1e-4)
    assert all(next(r.parameters()).is_cpu for r in routers.values())    # the caller's routers stay put


@needs_cuda
def test_calibration_on_cuda(tmp_path):
    """`--device cuda`: the model, simulations and LM-head products on the GPU give the same
    checkpoint as on the CPU, up to fp32 rounding in the labels."""
    model = make_tiny_model("llama", str(tmp_path / "m"), None, num_layers=6)
    (tmp_path / "c").mkdir()
    docs = corpus(tmp_path / "c")

    def run(device):
        return calibrate(CalibrationConfig(model=model, output=str(tmp_path / f"{device}.safetensors"), corpus=docs,
                                           max_tokens=3000, seq_len=128, interval=2, epochs=2, dtype="float32",
                                           kl_bound=2.0, target_agreement=0.5, max_ppl_increase=10.0,
                                           select_tokens=256, answer_tokens=96, checkpoint_cost=0.0, device=device))
    cpu, gpu = run("cpu"), run("cuda")
    assert gpu.layers == cpu.layers == [1, 3] and gpu.tokens == cpu.tokens
    for c in cpu.layers:
        assert gpu.projections[c].temperature == pytest.approx(cpu.projections[c].temperature, rel=1e-3)
        assert torch.allclose(gpu.projections[c].weight, cpu.projections[c].weight, atol=1e-3)
    for g, c in zip(gpu.extra["validation"], cpu.extra["validation"]):
        assert g["positive_rate"] == pytest.approx(c["positive_rate"], abs=0.02)
        assert g["exit_top1_agreement"] == pytest.approx(c["exit_top1_agreement"], abs=0.01)
    assert gpu.extra["answer_tokens"] == cpu.extra["answer_tokens"] == 96
    assert gpu.extra["propagated"] is not None and gpu.extra["propagated"]["top1_agreement"] >= 0.5


def test_missing_corpora_say_how_to_get_them(tmp_path):
    from vllm_tide import corpus
    with pytest.raises(TideConfigError, match="`make setup`.*pass your own text with --corpus.*TIDE_DATA_DIR"):
        corpus.split_files("calibration", str(tmp_path))


@needs_tokenizer
def test_calibration_takes_a_hub_model_id_from_the_local_cache(tmp_path, monkeypatch):
    """`--model ORG/NAME` resolves offline in the Hugging Face cache, as the plugin resolves it; an id
    that is not there is one sentence."""
    import huggingface_hub.constants as hub
    from vllm_tide.calibrate import parse_args
    snapshot = tmp_path / "hub" / "models--tide-test--tiny" / "snapshots" / ("ab" * 20)
    make_tiny_model("llama", str(snapshot), DEFAULT_MODEL, num_layers=4)
    (tmp_path / "hub" / "models--tide-test--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--tide-test--tiny" / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = str(tmp_path / "r.safetensors")
    (tmp_path / "c").mkdir()
    cfg = parse_args(["--model", "tide-test/tiny", "--output", out, "--corpus", *corpus(tmp_path / "c"),
                      "--max-tokens", "2000", "--label-tokens", "1000", "--validation-tokens", "512", "--seq-len",
                      "128", "--interval", "2", "--epochs", "1", "--select-tokens", "0", "--dtype", "float32"])
    ckpt = calibrate(cfg)
    assert cfg.model == str(snapshot) and ckpt.model.num_layers == 4
    assert RouterCheckpoint.load(out).model == ckpt.model
    with pytest.raises(TideConfigError, match="neither a model folder nor a model id in the local Hugging Face"):
        calibrate(CalibrationConfig(model="tide-test/absent", output=out))


@needs_tokenizer
def test_add_presets_recomputes_the_presets_of_an_existing_router(tmp_path):
    """`add_presets` (for routers calibrated before presets existed) rebuilds the presets and the
    suggestion from the stored propagated measurements and new simulations: on an unchanged model and
    split they equal the ones calibration chose."""
    from vllm_tide.calibrate import add_presets
    model = make_tiny_model("llama", str(tmp_path / "m"), DEFAULT_MODEL, num_layers=6)
    out = str(tmp_path / "r.safetensors")
    cfg = CalibrationConfig(model=model, output=out, corpus=corpus(tmp_path), max_tokens=3000, seq_len=128,
                            interval=2, epochs=2, dtype="float32", kl_bound=2.0, target_agreement=0.5,
                            max_ppl_increase=10.0, select_tokens=256, answer_tokens=64, checkpoint_cost=0.0)
    first = calibrate(cfg)
    assert first.extra["presets"]["default"] is not None
    old = RouterCheckpoint.load(out)
    for key in ("presets", "unpaid", "propagated"):
        old.extra.pop(key, None)
    old.suggested_threshold, old.suggested_min_layer = 1.0, 0
    old.save(out)
    again = add_presets(cfg, out)
    back = RouterCheckpoint.load(out)
    assert again.extra["presets"] == first.extra["presets"] == back.extra["presets"]
    assert (back.suggested_threshold, back.suggested_min_layer) == (first.suggested_threshold, first.suggested_min_layer)
    assert back.extra["propagated"] == back.extra["presets"]["default"]
