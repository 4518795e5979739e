"""Calibration end to end on tiny models built here; labels checked against an independent computation."""
import os

import pytest
import torch

from conftest import DEFAULT_MODEL
from helpers import make_tiny_model
from vllm_tide.calibrate import CalibrationConfig, auc, calibrate, cosine_labels, top1_labels
from vllm_tide.checkpoint import RouterCheckpoint
from vllm_tide.errors import TideConfigError

needs_tokenizer = pytest.mark.skipif(not os.path.isdir(DEFAULT_MODEL), reason="needs the default model's tokenizer (make setup)")


def corpus(tmp_path):
    words = ("the state of the union is strong and the people are free to work and to build a nation "
             "where every child can learn and every family can hope for a better future together ").split()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        idx = torch.randint(0, len(words), (600,), generator=g)
        (tmp_path / f"doc{i}.txt").write_text(" ".join(words[j] for j in idx))
    return [str(tmp_path)]


@needs_tokenizer
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_calibration_end_to_end(tmp_path, family):
    model = make_tiny_model(family, str(tmp_path / "m"), DEFAULT_MODEL, num_layers=6)
    out = str(tmp_path / "r.safetensors")
    ckpt = calibrate(CalibrationConfig(model=model, output=out, corpus=corpus(tmp_path), max_tokens=3000,
                                       seq_len=128, interval=2, epochs=2, dtype="float32",
                                       exit_projection="affine" if family == "qwen3" else "identity"))
    back = RouterCheckpoint.load(out)
    assert back.layers == [1, 3] and 5 not in back.layers          # never the final layer
    assert back.tokens == ckpt.tokens >= 2500
    assert 0 < back.suggested_threshold <= 1.0 and back.suggested_min_layer in (1, 3)
    rows = back.extra["validation"]
    assert [r["layer"] for r in rows] == [1, 3] and all(0 <= r["positive_rate"] <= 1 for r in rows)


def test_labels_match_independent_computation():
    """top1: the exit's argmax equals the final argmax; cosine: cos(exit, final) > 0.98 after the final norm."""
    g = torch.Generator().manual_seed(1)
    n, d, v = 200, 16, 50
    z, final = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    final[:80] = z[:80] + 0.01 * torch.randn(80, d, generator=g)
    w = torch.randn(v, d, generator=g)
    final_top1 = (final @ w.T).argmax(-1)
    want = torch.tensor([int(torch.argmax(w @ z[i])) == int(final_top1[i]) for i in range(n)])
    assert torch.equal(top1_labels(z, None, w, final_top1, chunk=33), want)
    proj = {"weight": torch.eye(d) * 2, "bias": torch.zeros(d)}
    assert torch.equal(top1_labels(z, proj, w, final_top1), want)        # argmax is scale-invariant
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
