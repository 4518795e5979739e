import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "models", "smollm2-135m-instruct")

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
        return True
    except Exception:
        return False


ENGINE_MISSING = None if (_has_avx2() and _has_vllm() and os.path.isdir(DEFAULT_MODEL)) else \
    "needs vllm-cpu, an AVX2 CPU and the default model (run `make setup`)"


@pytest.fixture
def _engine_tests_must_run():
    pytest.fail(f"CI=true, but this engine test cannot run on this machine: it {ENGINE_MISSING}. "
                f"CI must run the engine tests; fix the runner or its set-up.", pytrace=False)


# Off CI an engine test without an engine skips, with its reason printed (`make test` passes -rs);
# on CI (CI=true, which .ci/run keeps) it fails instead, so a runner that cannot run them cannot pass.
if ENGINE_MISSING and os.environ.get("CI", "").lower() == "true":
    requires_engine = pytest.mark.usefixtures("_engine_tests_must_run")
else:
    requires_engine = pytest.mark.skipif(ENGINE_MISSING is not None, reason=ENGINE_MISSING or "")


def run_stock(script: str, *args: str, timeout: int = 600) -> str:
    """Run a script in a fresh process where the TIDE plugin is not loaded: that is "stock vLLM"."""
    env = {**os.environ, "VLLM_PLUGINS": "none-stock"}
    out = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"stock run failed:\n{out.stderr[-4000:]}")
    return out.stdout
