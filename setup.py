"""Build script for ibkd's compiled extension ``ibkd._C``.

``ibkd._C`` is compiled against the torch that is *installed* (headers, C++ ABI, CUDA version must match
the torch it runs with), so install torch first and then ibkd without build isolation::

    pip install "setuptools>=77" ninja torch
    pip install --no-build-isolation ibkd-<version>.tar.gz      # or: pip install --no-build-isolation .

An isolated build has no torch to compile against (torch is deliberately not a build requirement: pip
would fetch whatever torch is newest, not yours) and stops with a message saying so.

What is built (printed by the build, see ``pip install -v``):

* the C++ CPU kernels (``csrc/cpu``), always;
* the CUDA kernels (``csrc/cuda``) when the installed torch is a CUDA build and ``nvcc`` is found
  (``CUDA_HOME`` or ``PATH``). No GPU has to be visible: a ``docker build`` on a CUDA image builds them.
  Target architectures: ``TORCH_CUDA_ARCH_LIST`` (default here ``8.0;9.0+PTX``: sm_80, sm_90 and PTX
  that newer GPUs compile at load time).

Build switches (environment variables):

* ``IBKD_SKIP_EXT=1``   build no extension: the pure install (``reference`` and ``triton`` backends)
* ``IBKD_FORCE_CUDA=1`` the CUDA kernels must be built: a CPU torch or a missing nvcc is an error
  instead of a CPU-only build
* ``IBKD_SKIP_CUDA=1``  never build the CUDA kernels
* ``IBKD_CPU_OPENMP=0`` compile the CPU kernels without OpenMP: their tile loops then run on one
  thread (only the GEMMs inside use more); for comparison, see ``openmp_flags``
* ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS`` (parallel compile jobs, ninja), ``CUDA_HOME``

A compiler failure ends with one message naming the way out (``IBKD_SKIP_EXT=1``).
"""

import glob
import hashlib
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_SETUPTOOLS = (77, 0)  # PEP 639 license string in pyproject.toml
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
CPU_SOURCES = ("csrc/cpu/*.cpp",)
# *.cu kernels plus the host-side *.cpp glue of the CUDA backend (its pybind11 bindings)
CUDA_SOURCES = ("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
WAY_OUT = (
    "IBKD_SKIP_EXT=1 installs ibkd without the compiled extension (reference and Triton backends), "
    "IBKD_SKIP_CUDA=1 keeps the C++ CPU kernels but skips CUDA"
)


class BuildConfigError(Exception):
    """A build request that cannot be met (reported as one line)."""


def flag(name, env=None):
    env = os.environ if env is None else env
    return str(env.get(name, "0")).strip().lower() in ("1", "true", "yes", "on")


def sources(patterns, root=HERE):
    """Source files matching ``patterns`` as paths relative to ``root`` (setuptools wants relative ones)."""
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join(root, pattern))
    return sorted(os.path.relpath(path, root) for path in found)


def cuda_plan(torch_cuda, nvcc, have_cuda_sources, gpu_visible, env=None):
    """Whether to build the CUDA kernels, and why: ``(build, reason)``, ``reason`` one line.

    A pure function of its inputs (tested in tests/test_packaging.py with fake ones):
    ``torch_cuda`` is ``torch.version.cuda`` (None for a CPU torch), ``nvcc`` the path of nvcc or None,
    ``gpu_visible`` whether torch sees a GPU now. A visible GPU is *not* a condition: the kernels are
    built for ``TORCH_CUDA_ARCH_LIST``, not for the machine that builds them.
    Raises :class:`BuildConfigError` when ``IBKD_FORCE_CUDA=1`` cannot be honoured.
    """
    env = os.environ if env is None else env
    force = flag("IBKD_FORCE_CUDA", env)
    if flag("IBKD_SKIP_CUDA", env):
        if force:
            raise BuildConfigError("IBKD_FORCE_CUDA=1 and IBKD_SKIP_CUDA=1 contradict each other: unset one")
        return False, "IBKD_SKIP_CUDA=1"
    if not have_cuda_sources:
        if force:
            raise BuildConfigError("IBKD_FORCE_CUDA=1 but there are no CUDA sources under csrc/cuda")
        return False, "no CUDA sources under csrc/cuda"
    if not torch_cuda:
        if force:
            raise BuildConfigError(
                "IBKD_FORCE_CUDA=1 but the installed torch is a CPU build (torch.version.cuda is None): "
                "install a CUDA build of torch first, or unset IBKD_FORCE_CUDA")
        return False, "the installed torch is a CPU build (torch.version.cuda is None)"
    if not nvcc:
        if force:
            raise BuildConfigError(
                f"IBKD_FORCE_CUDA=1 but nvcc was not found (torch has CUDA {torch_cuda}): "
                "put nvcc on PATH or set CUDA_HOME to the CUDA toolkit")
        return False, (f"torch has CUDA {torch_cuda} but nvcc was not found "
                       "(put nvcc on PATH or set CUDA_HOME; IBKD_FORCE_CUDA=1 makes this an error)")
    archs = env.get("TORCH_CUDA_ARCH_LIST")
    arch_text = f"TORCH_CUDA_ARCH_LIST={archs}" if archs else f"TORCH_CUDA_ARCH_LIST unset, default {DEFAULT_ARCH_LIST}"
    gpu_text = "a GPU is visible" if gpu_visible else "no GPU visible (none is needed to build)"
    why = "IBKD_FORCE_CUDA=1, " if force else ""
    return True, f"{why}torch has CUDA {torch_cuda}, nvcc {nvcc}, {arch_text}; {gpu_text}"


def openmp_flags(torch_has_openmp, platform=None, env=None):
    """(compile flags, link flags, why) that make the CPU kernels' ``at::parallel_for`` parallel.

    ``at::parallel_for`` is a header template: it is only parallel where ``_OPENMP`` is defined when the
    *extension* is compiled, and torch's ``CppExtension`` adds no ``-fopenmp``. Without it every tile
    loop of the CPU kernels ran on the calling thread, one chunk after the other, and only the GEMMs
    inside them (oneDNN's own OpenMP) used the other cores: on the 2-core Zen 4 the HSIC n = 8192
    epilogues ran on one thread and the second spun at oneDNN's barriers (perf, 2026-12-05).
    ``-fopenmp`` links libgomp by its soname, libgomp.so.1, which torch has already loaded (its wheel
    ships one): the loader reuses it, so there is one OpenMP runtime and one thread pool.
    Linux only (gcc and clang take ``-fopenmp``; macOS's clang needs libomp, MSVC ``/openmp``)."""
    platform = sys.platform if platform is None else platform
    env = os.environ if env is None else env
    if str(env.get("IBKD_CPU_OPENMP", "1")).strip().lower() in ("0", "false", "no", "off"):
        return [], [], "no (IBKD_CPU_OPENMP=0)"
    if not torch_has_openmp:
        return [], [], "no (this torch is not built with OpenMP)"
    if not platform.startswith("linux"):
        return [], [], f"no (not set up for {platform})"
    return ["-fopenmp"], ["-fopenmp"], "yes"


def failure_message(exc):
    """The one line printed when compiling ``ibkd._C`` fails."""
    detail = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {detail[-1]}" if detail else type(exc).__name__
    return (f"ibkd: compiling the extension ibkd._C failed ({detail}; the compiler output is above). "
            f"Way out: {WAY_OUT}, e.g. IBKD_SKIP_EXT=1 pip install --no-build-isolation <ibkd>.")


NO_TORCH_MESSAGE = (
    "ibkd: torch is not importable in this build environment, and ibkd._C must be compiled against the "
    "torch you run it with. Install torch first, then build without isolation: "
    "pip install --no-build-isolation <ibkd> (or IBKD_SKIP_EXT=1 for the pure install)."
)


def _check_setuptools():
    import setuptools

    found = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    if found < MIN_SETUPTOOLS:
        sys.exit(f"ibkd: building needs setuptools>={MIN_SETUPTOOLS[0]} (found {setuptools.__version__}): "
                 f"pip install -U 'setuptools>={MIN_SETUPTOOLS[0]}'")


def _version():
    with open(os.path.join(HERE, "ibkd", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _no_torch_extension(cpu_sources):
    """torch is missing: a placeholder extension (so the sdist and metadata need no torch) whose build
    stops with :data:`NO_TORCH_MESSAGE`."""
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    class NoTorchBuildExt(build_ext):
        def run(self):
            sys.exit(NO_TORCH_MESSAGE)

    return [Extension("ibkd._C", cpu_sources)], {"build_ext": NoTorchBuildExt}


def _extensions():
    """``(ext_modules, cmdclass)`` for this build environment."""
    if flag("IBKD_SKIP_EXT"):
        print("ibkd build: no extension (IBKD_SKIP_EXT=1): the reference and triton backends only")
        return [], {}
    cpu_sources = sources(CPU_SOURCES)
    cuda_sources = sources(CUDA_SOURCES)
    if not cpu_sources:
        sys.exit("ibkd: no C++ sources under csrc/cpu (an incomplete source tree?); "
                 "IBKD_SKIP_EXT=1 installs without the extension")
    try:
        import torch
    except ImportError:
        return _no_torch_extension(cpu_sources)
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc and not os.path.isfile(nvcc):
        nvcc = None
    try:
        gpu_visible = bool(torch.version.cuda) and torch.cuda.is_available()
        with_cuda, why = cuda_plan(torch.version.cuda, nvcc, bool(cuda_sources), gpu_visible)
    except BuildConfigError as exc:
        sys.exit(f"ibkd: {exc}")

    cxx = ["-O3"]  # the C++ standard is torch's own choice (C++20 for recent torch)
    omp_cflags, omp_ldflags, omp_why = openmp_flags(torch.backends.openmp.is_available())
    cxx += omp_cflags
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        ext = CUDAExtension(
            "ibkd._C",
            cpu_sources + cuda_sources,
            define_macros=[("IBKD_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=omp_ldflags,
        )
        built = f"C++ CPU kernels + CUDA kernels ({os.environ['TORCH_CUDA_ARCH_LIST']})"
    else:
        ext = CppExtension("ibkd._C", cpu_sources, extra_compile_args={"cxx": cxx}, extra_link_args=omp_ldflags)
        built = "C++ CPU kernels only"
    summary = f"ibkd build: ibkd._C with {built} against torch {torch.__version__}; CUDA kernels: " + (
        f"yes ({why})" if with_cuda else f"no ({why})") + f"; OpenMP tile loops: {omp_why}"

    class IbkdBuildExt(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                # pip install -e builds in a fresh temporary folder each time; a folder per venv under
                # build/ lets ninja reuse the objects whose compile command and inputs are unchanged
                # (a reinstall with other extras then only links)
                tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
                self.build_temp = os.path.join(HERE, "build", f"editable-{sys.implementation.cache_tag}-{tag}")

        def run(self):
            print(summary, flush=True)
            try:
                super().run()
            except Exception as exc:  # CompileError, LinkError, torch's RuntimeError from ninja, OSError, ...
                sys.exit(failure_message(exc))

    return [ext], {"build_ext": IbkdBuildExt}


def main():
    _check_setuptools()
    from setuptools import find_packages, setup

    ext_modules, cmdclass = _extensions()
    setup(
        version=_version(),
        # configs/ lives at the top of the repository and installs as
        # ibkd.configs (the shipped YAML configs: `ibkd distill --config main-minilm-2layer`).
        packages=find_packages(include=["ibkd", "ibkd.*"]) + ["ibkd.configs"],
        package_dir={"ibkd.configs": "configs"},
        package_data={"ibkd.configs": ["*.yaml"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it
    main()
