"""Smoke runs of the benchmark scripts, so they cannot rot. Assertions are on the shape and validity of
the results, plus what must hold exactly: with exits off TIDE is stock."""
import json
import os
import subprocess
import sys

import pytest

from conftest import DEFAULT_MODEL, ROOT, requires_engine
from helpers import synthetic_router

pytestmark = [pytest.mark.e2e, requires_engine]


def run(script, *args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_quality_benchmark_smoke(tmp_path):
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {27: "some"}, seed=2)
    res = tmp_path / "q.json"
    run("quality.py", "--model", DEFAULT_MODEL, "--router", router, "--split", "dev", "--tokens", "300",
        "--chunk", "128", "--gen-prompts", "3", "--gen-tokens", "6", "--thresholds", "0.5", "1.0", "--json", str(res))
    rows = {r["threshold"]: r for r in json.loads(res.read_text())["rows"]}
    off = rows[1.0]
    assert off["top1_agreement"] == 1.0 and off["ppl_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert off["gen_exact_match"] == 1.0 and off["text_partial_layer_fraction"] == 0.0
    on = rows[0.5]
    assert 0 < on["text_exits_per_layer"]["27"] and 0 < on["text_partial_layer_fraction"] < 1
    assert 0 <= on["top1_agreement"] <= 1 and on["ppl_ratio"] > 0 and on["tokens"] == off["tokens"] > 250


def test_speed_benchmark_smoke(tmp_path):
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {15: "all"})
    res = tmp_path / "s.json"
    run("speed.py", "--model", DEFAULT_MODEL, "--router", router, "--threshold", "0.5", "--repeats", "1",
        "--modes", "decode_b1", "--json", str(res))
    m = json.loads(res.read_text())["modes"]["decode_b1"]
    assert m["stock_tok_s"] > 0 and m["tide_tok_s"] > 0 and m["ratio"] > 0
    assert m["skipped_layer_fraction"] == pytest.approx(14 / 30)     # every token exits at 15
