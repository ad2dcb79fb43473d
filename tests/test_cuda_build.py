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


# ----------------------------------------------------------------------- kernels in host emulation
#
# The kernels cannot run without a GPU, but their logic can: csrc/cuda/host_emulation.cuh emulates
# the CUDA features they use on CPU threads (see its header). The real sources are rewritten
# textually (launch syntax, dynamic shared memory), built with the host compiler and run on small
# fuzzed shapes against the dense kernel spec in float64: index math, masking of ragged tiles, a
# D that is no multiple of any tile, the split of D over CTAs (a small shared-memory budget forces
# it), the synchronisation structure and the unwritten-output poisoning are all exercised. The
# tensor-core fragment layout and real-hardware timing are not; the GPU suite covers those.

EMU_SMEM_OPTIN = 140_000  # below the A100's 163 KiB: the backward kernels split D into chunks


def _rewrite_for_emulation(text: str) -> str:
    import re

    text = text.replace("#include <mma.h>\n", "")
    text = text.replace(
        "extern __shared__ __align__(128) unsigned char smem[];", "unsigned char* smem = g_dyn_smem;"
    )
    # kernel<<<grid, block, smem, stream>>>(args)  ->  emu_launch(kernel, grid, block, smem, stream, args)
    return re.sub(r"(\w+(?:<[^<>;]*(?:<[^<>;]*>[^<>;]*)*>)?)<<<(.*?)>>>\(", r"emu_launch(\1, \2, ", text)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    build = tmp_path_factory.mktemp("cuda_emulation")
    for name in ("tile_common.cuh", "infonce.cu", "hsic.cu"):
        with open(os.path.join(CUDA_DIR, name)) as f:
            (build / name).write_text(_rewrite_for_emulation(f.read()))
    (build / "main.cpp").write_text(
        '#include "host_emulation.cuh"\n#include "infonce.cu"\n#include "hsic.cu"\n'
        '#define IBKD_EMULATION_HARNESS\n#include "host_emulation.cuh"\n'
    )
    exe = build / "emulator"
    cmd = [NVCC, "-x", "c++", "-std=c++20", "-O2", "-cudart", "none", "-Xcompiler", "-pthread,-w"]
    cmd += [f"-I{build}", f"-I{CUDA_DIR}", f"-DIBKD_EMU_SMEM_OPTIN={EMU_SMEM_OPTIN}"]
    cmd += list(f for f in cpp_extension.COMMON_NVCC_FLAGS if f.startswith("-D"))
    cmd += [str(build / "main.cpp"), "-o", str(exe), "-lpthread"]
    _run(cmd)
    return str(exe)


def _emulate(exe, workdir, op, dtype, dims, inputs, outputs):
    import numpy as np

    for name, t in inputs.items():
        t.contiguous().view(torch.uint8).numpy().tofile(os.path.join(workdir, name + ".bin"))
    cmd = [exe, op, str(dtype).split(".")[1], str(workdir), *map(str, dims)]
    subprocess.run(cmd, check=True, timeout=TIMEOUT_S)
    got = {}
    for name, (out_dtype, shape) in outputs.items():
        raw = torch.from_numpy(np.fromfile(os.path.join(workdir, name + ".out"), dtype=np.uint8))
        got[name] = raw.view(out_dtype).reshape(shape)
    return got


def _close(name, got, expected, magnitude, tol):
    got = got.to(torch.float64)
    assert torch.isfinite(got).all(), f"{name}: non-finite entries (an output element left unwritten?)"
    err = (got - expected).abs().max().item()
    assert err <= tol * max(magnitude, 1e-30), f"{name}: error {err:.3e} > {tol:g} x {magnitude:.3e}"


EMU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
EMU_FWD_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
EMU_GRAD_TOL = {torch.float64: 1e-11, torch.float32: 5e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
@pytest.mark.parametrize(
    "b,n,d,symmetric", [(1, 1, 1, False), (5, 5, 77, True), (66, 66, 40, True), (70, 133, 700, False)]
)
def test_infonce_kernels_in_host_emulation(emulator, tmp_path, dtype, b, n, d, symmetric):
    import torch.nn.functional as F

    from ibkd.testing import DenseKernelBackend

    f64, acc = torch.float64, (torch.float64 if dtype == torch.float64 else torch.float32)
    gen = torch.Generator().manual_seed(b * 1000 + d)
    q = F.normalize(torch.randn(b, d, generator=gen, dtype=f64), dim=1).to(dtype)
    k = F.normalize(torch.randn(n, d, generator=gen, dtype=f64), dim=1).to(dtype)
    c, w = torch.tensor([20.0], dtype=acc), torch.randn(b, generator=gen).to(acc)
    lse_len = 2 * b if symmetric else b
    got = _emulate(
        emulator, tmp_path, "infonce", dtype, (b, n, d, int(symmetric)), {"q": q, "k": k, "c": c, "w": w},
        {"lse": (acc, (lse_len,)), "pos": (acc, (b,)), "dq": (dtype, (b, d)), "dk": (dtype, (n, d)),
         "dinv": (acc, ())},
    )
    dense, c64 = DenseKernelBackend(), torch.tensor(20.0, dtype=f64)
    rows, lse = dense.infonce_forward(q.to(f64), k.to(f64), c64, symmetric)
    dq, dk, dinv = dense.infonce_backward(w.to(f64), q.to(f64), k.to(f64), c64, lse, symmetric)
    s = q.to(f64) @ k.to(f64).T
    p_row = torch.exp(20.0 * s - lse[:b, None])
    wd = w.to(f64)
    g = (p_row * wd[:, None] / 2 + torch.exp(20.0 * s - lse[None, b:]) * wd[None, :] / 2) if symmetric else p_row * wd[:, None]
    g = g - torch.eye(b, n, dtype=f64) * wd[:, None]
    got_rows = (got["lse"][:b] + got["lse"][b:]) / 2 - got["pos"] if symmetric else got["lse"] - got["pos"]
    scale = 20.0 * s.abs().max().item() + lse.abs().max().item()
    _close("lse", got["lse"], lse, scale, EMU_FWD_TOL[dtype])
    _close("row_loss", got_rows, rows, scale, EMU_FWD_TOL[dtype])
    _close("dq", got["dq"], dq, 20.0 * (g.abs() @ k.to(f64).abs()).max().item(), EMU_GRAD_TOL[dtype])
    _close("dk", got["dk"], dk, 20.0 * (g.abs().T @ q.to(f64).abs()).max().item(), EMU_GRAD_TOL[dtype])
    _close("dinv", got["dinv"], dinv, (g.abs() * s.abs()).sum().item(), EMU_FWD_TOL[acc])


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
@pytest.mark.parametrize("n,dx,dz,kernel", [(2, 1, 1, "rbf"), (67, 300, 130, "rbf"), (67, 300, 130, "linear")])
def test_hsic_kernels_in_host_emulation(emulator, tmp_path, dtype, n, dx, dz, kernel):
    import math

    from ibkd.backend.reference import kernel_matrix
    from ibkd.testing import DenseKernelBackend

    f64, acc = torch.float64, (torch.float64 if dtype == torch.float64 else torch.float32)
    gen = torch.Generator().manual_seed(n + dx)
    x = (torch.randn(n, dx, generator=gen) / math.sqrt(dx)).to(dtype)
    z = (torch.randn(n, dz, generator=gen) / math.sqrt(dz)).to(dtype)
    gammas = torch.tensor([0.7, 0.4], dtype=acc)
    g_sums = (torch.randn(3, generator=gen) / n**2).to(acc)
    g_rk, g_rl = (torch.randn(n, generator=gen) / n).to(acc), (torch.randn(n, generator=gen) / n).to(acc)
    got = _emulate(
        emulator, tmp_path, "hsic", dtype, (n, dx, dz, int(kernel == "rbf")),
        {"x": x, "z": z, "gammas": gammas, "gsums": g_sums, "grk": g_rk, "grl": g_rl},
        {"sums": (acc, (3,)), "rk": (acc, (n,)), "rl": (acc, (n,)), "dx": (dtype, (n, dx)), "dz": (dtype, (n, dz))},
    )
    dense = DenseKernelBackend()
    x64, z64, gam = x.to(f64), z.to(f64), gammas.to(f64)
    sums, rk, rl = dense.hsic_stats(x64, z64, gam, kernel)
    gs = g_sums.to(f64)
    dx_e, dz_e = dense.hsic_stats_backward(gs, g_rk.to(f64), g_rl.to(f64), x64, z64, gam, kernel)
    K, L = kernel_matrix(x64, gam[0], kernel), kernel_matrix(z64, gam[1], kernel)
    tol = 5 * EMU_FWD_TOL[dtype]
    for v, mag in enumerate(((K.abs() * L.abs()).sum(), (K * K).sum(), (L * L).sum())):
        _close(f"sums[{v}]", got["sums"][v], sums[v], mag.item(), tol)
    _close("rowsum_k", got["rk"], rk, K.abs().sum(1).max().item(), tol)
    _close("rowsum_l", got["rl"], rl, L.abs().sum(1).max().item(), tol)
    for name, want, a, M, M_other, g_self, g_row, gamma in (
        ("dx", dx_e, x64, K, L, gs[1], g_rk.to(f64), gam[0]),
        ("dz", dz_e, z64, L, K, gs[2], g_rl.to(f64), gam[1]),
    ):
        W = (2 * gs[0] * M_other + 4 * g_self * M + g_row[:, None] + g_row[None, :]).abs()
        if kernel == "rbf":
            W = W * M
            magnitude = 2 * gamma * (W @ a.abs() + W.sum(1, keepdim=True) * a.abs())
        else:
            magnitude = W @ a.abs()
        _close(name, got[name], want, magnitude.max().item(), EMU_GRAD_TOL[dtype])
