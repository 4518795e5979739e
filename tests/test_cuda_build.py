"""Compile csrc/ with this machine's nvcc (objects only), so a CUDA compile error cannot land.

The kernels on main are compiled, and so is main + the pending rework in csrc/pending/ (what
scripts/gpu_check.sh will build on the next GPU machine), so that the patch cannot rot unnoticed.
"""
import glob
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PENDING = sorted(glob.glob(os.path.join(ROOT, "csrc", "pending", "*.patch")))
PATCHED_FOLDERS = ("csrc", "tests", "vllm_tide", "benchmarks", "scripts")   # OPS_TREE in scripts/ops_build_lib.sh


def nvcc_compile(source, tmp_path):
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    # CPU wheels of torch ship the c10/cuda headers but not this generated one; a stub suffices to compile.
    stub = tmp_path / "inc" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["nvcc", "-std=c++17", "-c", str(source), "-o", str(tmp_path / "tide_ops.o"),
           "-arch=sm_90", f"-I{tmp_path / 'inc'}", f"-I{inc}", f"-I{inc}/torch/csrc/api/include",
           "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")


@needs_nvcc
def test_cuda_sources_compile(tmp_path):
    nvcc_compile(os.path.join(ROOT, "csrc", "tide_ops.cu"), tmp_path)


@needs_nvcc
@pytest.mark.skipif(not PENDING, reason="no pending CUDA patch")
def test_pending_cuda_patch_applies_and_compiles(tmp_path):
    src = tmp_path / "src"
    for folder in PATCHED_FOLDERS:   # the patches also touch the op tests, dispatch and benchmark
        shutil.copytree(os.path.join(ROOT, folder), src / folder)
    for patch in PENDING:   # tmp_path is outside the repository, so git apply patches this copy only
        out = subprocess.run(["git", "apply", patch], cwd=src, capture_output=True, text=True)
        assert out.returncode == 0, f"{os.path.basename(patch)} no longer applies: {out.stderr}"
    assert (src / "csrc" / "tide_ops.cu").read_text() != open(os.path.join(ROOT, "csrc", "tide_ops.cu")).read()
    nvcc_compile(src / "csrc" / "tide_ops.cu", tmp_path)
