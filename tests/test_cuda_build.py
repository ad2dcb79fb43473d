"""The CUDA sources compile with nvcc for sm_80 (Ampere) and sm_90 (Hopper), and the torch glue of
the `cuda` backend compiles with the host compiler: CPU-only CI catches breakage of code it cannot run.

Skipped only where nvcc is absent. Each .cu file is compiled once for both architectures (two
-gencode flags), object only (-c). The kernels include no torch headers, so this stays cheap.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CU_SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
BINDINGS = os.path.join(CUDA_DIR, "bindings.cpp")
TIMEOUT_S = 900  # generous: CI machines are small and shared
ARCHS = ("80", "90")


def _find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit)")


def _gencode_flags():
    flags = []
    for arch in ARCHS:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    assert result.returncode == 0, f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-8000:]}"
    return result


def test_cuda_sources_present():
    assert CU_SOURCES, f"no .cu sources under {CUDA_DIR}"
    assert os.path.isfile(BINDINGS)


@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_cu_source_compiles_for_sm80_and_sm90(source, tmp_path):
    obj = tmp_path / (os.path.basename(source) + ".o")
    # the same macros torch's CUDAExtension passes (no implicit half conversions), as setup.py builds
    cmd = [NVCC, "-c", source, "-o", str(obj), "-std=c++17", "-O3", *_gencode_flags()]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)
    cmd += ["-Xptxas", "-v"]  # ptxas names each architecture it assembled for
    result = _run(cmd)
    assert obj.is_file() and obj.stat().st_size > 0
    for arch in ARCHS:
        assert f"for 'sm_{arch}'" in result.stderr, f"no sm_{arch} code was generated for {source}"


def test_bindings_compile_with_torch_headers(tmp_path):
    """Host glue (torch + pybind11 + c10/cuda headers) compiles; nvcc drives the host compiler so the
    CUDA include directory is found. Only a syntax check: nothing here can link against CUDA torch."""
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    defines = [
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    torch_include = cpp_extension.include_paths()[0]
    if not os.path.isfile(os.path.join(torch_include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        # CPU wheels of torch lack this generated header (it only sets export macros)
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    cmd = [NVCC, "-x", "c++", "-c", BINDINGS, "-o", str(tmp_path / "bindings.o"), "-std=c++17"]
    cmd += ["-Xcompiler", "-fsyntax-only", *includes, *defines]
    _run(cmd)
