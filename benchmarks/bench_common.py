"""Shared pieces of the benchmark suite: the cases, how inputs are built, what one timed call runs,
and a description of the machine. Used by the pytest benchmarks, the memory child process
(`memory.py`) and the renderer.

Environment switches:

* ``IBKD_BENCH_QUICK=1``      small sizes (smoke run, minutes); results go to ``results/quick/``.
* ``IBKD_BENCH_BACKENDS=a,b`` backends to compare (default CPU: ``reference,cpu``; GPU:
  ``reference,reference-compile,triton,cuda``). ``dense`` registers :class:`ibkd.testing.DenseKernelBackend`.
* ``IBKD_BENCH_NOTE=...``     free-text note stored in the results JSON (e.g. "shared machine").
* ``IBKD_BENCH_GPU_INFONCE_B=16384,65536`` (likewise ``_GPU_INFONCE_D``, ``_GPU_HSIC_N``, ``_GPU_HSIC_D``,
  ``_GPU_DTYPES``, ``_GPU_MODES``): a GPU grid narrower than the full one, so that a lent GPU's few minutes
  (scripts/gpu-check.sh) go to the headline sizes instead of running out half-way through the full grid.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
from typing import Optional

import torch

from ibkd.experiments._machine import cpu_microarchitecture, cpu_name

QUICK = os.environ.get("IBKD_BENCH_QUICK", "0").lower() in ("1", "true", "yes", "on")


def data_dir() -> str:
    """The shared data folder: ``$IBKD_DATA_DIR``, else ``../shared/data`` beside the checkout. (The package
    itself has no default, ``ibkd.distill.config``; the benchmarks only run from a checkout.)"""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("IBKD_DATA_DIR") or os.path.join(os.path.dirname(checkout), "shared", "data")
TEMPERATURE = 0.05

# --- case grids (the issues' sizes; QUICK shrinks them) ----------------------------------------
CPU_INFONCE_B = [128, 256] if QUICK else [1024, 4096, 16384]
CPU_INFONCE_D = [32, 64] if QUICK else [384, 768]
CPU_HSIC_N = [128, 256] if QUICK else [1024, 4096, 8192]
CPU_HSIC_D = [32] if QUICK else [384, 768]



def _grid(name: str, default: list, cast=int) -> list:
    """``default``, or the comma-separated list in ``$IBKD_BENCH_<name>``."""
    raw = os.environ.get(f"IBKD_BENCH_{name}", "").strip()
    if not raw:
        return default
    try:
        return [cast(v.strip()) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"IBKD_BENCH_{name}={raw!r}: expected a comma-separated list of {cast.__name__}") from None


GPU_INFONCE_B = _grid("GPU_INFONCE_B", [1024, 4096] if QUICK else [4096, 16384, 65536])
GPU_INFONCE_D = _grid("GPU_INFONCE_D", [384] if QUICK else [384, 768, 1024])
GPU_HSIC_N = _grid("GPU_HSIC_N", [1024] if QUICK else [4096, 16384])
GPU_HSIC_D = _grid("GPU_HSIC_D", [384] if QUICK else [384, 768])
GPU_DTYPES = _grid("GPU_DTYPES", ["bfloat16", "float32"], str)
GPU_MODES = _grid("GPU_MODES", ["fwd", "fwd+bwd"], str)
GPU_MAX_BATCH_LADDER = [16384 * 2**i for i in range(7)]  # 16384 … 1048576

# The foundation issue's CPU targets (fp32, forward+backward): fused cpu vs reference.
CPU_TARGETS = [
    dict(op="infonce", size=16384, dim=384, dtype="float32", mode="fwd+bwd", max_time_ratio=1.0, max_mem_ratio=0.10),
    dict(op="hsic", size=8192, dim=384, dtype="float32", mode="fwd+bwd", max_time_ratio=0.5, max_mem_ratio=0.10),
]


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked call. ``size`` is B (= N) for InfoNCE, n for HSIC; ``dim`` is D (both inputs)."""

    op: str  # "infonce" | "hsic"
    backend: str  # an ibkd backend name, or "reference-compile" (reference under torch.compile)
    size: int
    dim: int
    dtype: str = "float32"
    mode: str = "fwd+bwd"  # "fwd" | "fwd+bwd"
    device: str = "cpu"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.backend}-{self.mode}-{self.dtype}-s{self.size}-d{self.dim}-{self.device}"

    @property
    def group(self) -> str:
        """Cases that differ only by backend share a group (their times are compared)."""
        return f"{self.op}-{self.mode}-{self.dtype}-s{self.size}-d{self.dim}-{self.device}"

    @property
    def ibkd_backend(self) -> str:
        return "reference" if self.backend in ("reference-compile", "gradcache") else self.backend

    def flops(self) -> Optional[float]:
        """GEMM FLOPs of InfoNCE with N = B: 2·B·N·D forward, 6·B·N·D forward+backward (dQ and dK)."""
        if self.op != "infonce":
            return None
        return (2.0 if self.mode == "fwd" else 6.0) * self.size * self.size * self.dim


def ensure_backend(name: str) -> Optional[str]:
    """Make ``name`` usable if it is a test-only backend; return why it cannot run here, or None."""
    import ibkd

    name = "reference" if name in ("reference-compile", "gradcache") else name
    if name == "dense":
        from ibkd.backend import registered_names
        from ibkd.testing import DenseKernelBackend

        if "dense" not in registered_names():
            ibkd.register_backend(DenseKernelBackend())
    for info in ibkd.backends():
        if info.name == name:
            return None if info.available else (info.reason or "unavailable")
    return f"no backend named {name!r} is registered"


def make_inputs(case: Case, seed: int = 0):
    """Inputs built directly in their final dtype and device (no transient copies, so a memory
    baseline taken after this is the true footprint of the inputs). Both inputs require grad."""
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(case.size, case.dim, generator=gen, dtype=torch.float32).to(device=case.device, dtype=dtype)
    b = torch.randn(case.size, case.dim, generator=gen, dtype=torch.float32).to(device=case.device, dtype=dtype)
    if case.op == "infonce":  # make the positive pair correlated, as in distillation
        b.mul_(0.5).add_(a)
    needs_grad = case.mode == "fwd+bwd"
    return a.requires_grad_(needs_grad), b.requires_grad_(needs_grad)


def make_step(case: Case):
    """A zero-argument callable running one forward (+ backward) of ``case`` on fixed inputs.
    The backward uses ``torch.autograd.grad`` so no ``.grad`` accumulates between calls."""
    import ibkd.functional as F

    a, b = make_inputs(case)
    backend = case.ibkd_backend
    if case.op == "infonce":

        def loss_fn(q, k):
            return F.infonce(q, k, temperature=TEMPERATURE, backend=backend, check_finite=False)

    else:
        gamma = 0.5 / case.dim  # ‖a_i − a_j‖² ≈ 2D for standard normal rows: K_ij ≈ e^-1

        def loss_fn(x, z):
            return F.hsic(x, z, gamma=gamma, backend=backend, check_finite=False)

    if case.backend == "reference-compile":
        loss_fn = torch.compile(loss_fn, dynamic=False)
    if case.backend == "gradcache":
        return _gradcache_step(case, a, b), (a, b)

    if case.mode == "fwd":

        def step():
            with torch.no_grad():
                return loss_fn(a, b)

    else:

        def step():
            loss = loss_fn(a, b)
            return torch.autograd.grad(loss, (a, b))

    return step, (a, b)


GRADCACHE_MINI_BATCH = int(os.environ.get("IBKD_BENCH_GRADCACHE_MB", "32"))


def _gradcache_step(case: Case, a: torch.Tensor, b: torch.Tensor):
    """The InfoNCE peer that sentence-transformers' cached losses are: the normalised embeddings are
    computed once, the loss in chunks of GRADCACHE_MINI_BATCH query rows against all keys (logits in
    the input dtype, cross-entropy in float32), one backward per chunk accumulating into the
    embeddings' gradients. Peak memory is a chunk × N logit block instead of B × N."""
    if case.op != "infonce":
        raise ValueError("gradcache is an InfoNCE peer")
    import torch.nn.functional as TF

    def step():
        q, k = a.detach().requires_grad_(), b.detach().requires_grad_()
        qn, kn = TF.normalize(q, dim=1), TF.normalize(k, dim=1)
        if case.mode == "fwd":
            with torch.no_grad():
                return sum(TF.cross_entropy((qn[s:s + GRADCACHE_MINI_BATCH] @ kn.T).float() / TEMPERATURE,
                                            torch.arange(s, min(s + GRADCACHE_MINI_BATCH, len(q)), device=q.device),
                                            reduction="sum") for s in range(0, len(q), GRADCACHE_MINI_BATCH)) / len(q)
        # cached gradients of the normalised embeddings, then one backward through the normalisation
        qn_leaf, kn_leaf = qn.detach().requires_grad_(), kn.detach().requires_grad_()
        for s in range(0, len(q), GRADCACHE_MINI_BATCH):
            e = min(len(q), s + GRADCACHE_MINI_BATCH)
            logits = (qn_leaf[s:e] @ kn_leaf.T).float() / TEMPERATURE
            loss = TF.cross_entropy(logits, torch.arange(s, e, device=q.device), reduction="sum") / len(q)
            loss.backward()
        return torch.autograd.grad((qn, kn), (q, k), (qn_leaf.grad, kn_leaf.grad))

    return step


# --- machine description -----------------------------------------------------------------------


def machine_info(device: str) -> dict:
    info = {
        "cpu_model": cpu_name(),
        "cpu_capability": cpu_capability(),
        "cpu_uarch": cpu_microarchitecture(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except Exception:
            info["driver"] = None
    return info


def transparent_hugepages() -> str:
    """The host's THP mode (``always`` / ``madvise`` / ``never``), or ``unknown``."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return "unknown"


#: Every timed or measured child process of the benchmarks runs with PyTorch's huge-page allocation
#: for CPU buffers of 2 MiB and more (``THP_MEM_ALLOC_ENABLE=1``, read by c10's CPU allocator). Why:
#: the eager peers allocate fresh n×n temporaries every call, and their cost is dominated by page
#: faults when the host's THP mode is ``madvise``: measured 2026-12-04 on the AVX2 AMD EPYC (THP
#: madvise), eager HSIC n=8192 fwd+bwd took 15.5 s with 4 KiB pages and 5.9 s with huge pages, while
#: the fused kernel (no n×n buffer) barely moved. Without this, a host's THP setting would decide the
#: ratios; with it every peer gets the allocator at its best. ``IBKD_BENCH_THP=0`` turns it off.
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def child_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's environment) with the benchmarks' allocator setting."""
    env = dict(os.environ if env is None else env)
    if os.environ.get("IBKD_BENCH_THP", "1") != "0":
        env[THP_ENV] = "1"
    return env


def allocator_settings() -> dict:
    """What the children's memory allocation depends on: recorded with every run."""
    return {"host_thp": transparent_hugepages(),
            "torch_thp_mem_alloc": os.environ.get("IBKD_BENCH_THP", "1") != "0"}


def cpu_capability() -> str:
    """The vector ISA torch dispatches to on this CPU (AVX2, AVX512, ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:
        return "unknown"


def machine_id(device: str) -> str:
    """A file-name-safe id of the machine kind (no hostname): cpu model + cores + vector ISA +
    microarchitecture, or the GPU name.

    One cloud CPU name covers different machines: "AMD EPYC" with 2 cores was an AVX-512 Zen 5 until
    2026-12-03, then an AVX2-only Zen 3 (no oneDNN float32, no native bf16; see csrc/cpu/gemm.cpp),
    and on 2026-12-04 an AVX-512 Zen 4 (double-pumped AVX-512, native bf16), whose ISA alone would not
    tell it from the Zen 5. Older files carry less: ``...-cpu-amd-epyc-2c`` (no ISA) is the Zen 5,
    ``...-cpu-amd-epyc-2c-avx2`` the Zen 3."""
    if device == "cuda" and torch.cuda.is_available():
        base = "gpu-" + torch.cuda.get_device_name(0)
    else:
        uarch = cpu_microarchitecture()
        base = f"cpu-{cpu_name()}-{os.cpu_count()}c-{cpu_capability()}" + (f"-{uarch}" if uarch else "")
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def load_snapshot() -> dict:
    """What else is running: load averages and the busiest other processes (the machine is shared)."""
    snap = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        out = subprocess.run(
            ["ps", "-eo", "pcpu,rss,comm", "--sort=-pcpu", "--no-headers"],
            capture_output=True, text=True, timeout=10,
        ).stdout.splitlines()
        snap["top_processes"] = [" ".join(line.split()) for line in out[:5]]
    except Exception:
        pass
    return snap
