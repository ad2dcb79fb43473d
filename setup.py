"""Build script for ibkd's compiled extension ``ibkd._C``.

The C++ CPU kernels in ``csrc/cpu`` are always built. The CUDA kernels in ``csrc/cuda`` are built when
torch has CUDA and ``nvcc`` is found, or when forced. Build switches (environment variables):

* ``IBKD_SKIP_EXT=1``   build no extension at all (pure-Python install; backends report why unavailable)
* ``IBKD_FORCE_CUDA=1`` build the CUDA kernels even if torch sees no GPU (needs nvcc and a CUDA torch)
* ``IBKD_SKIP_CUDA=1``  never build the CUDA kernels
* ``TORCH_CUDA_ARCH_LIST`` target architectures (default here: "8.0;9.0")
* ``MAX_JOBS``          parallel compile jobs (ninja)

Install with ``pip install --no-build-isolation -e ".[dev]"``: the extension must be compiled against
the torch that is installed (headers and C++ ABI), which build isolation would replace by a fresh
download of an arbitrary torch build.
"""

import glob
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "ibkd", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("IBKD_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # *.cu kernels plus the host-side *.cpp glue of the CUDA backend (its pybind11 bindings)
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if not cpu_sources:
        return [], {}
    want_cuda = not _flag("IBKD_SKIP_CUDA") and bool(cuda_sources) and (
        _flag("IBKD_FORCE_CUDA") or (torch.cuda.is_available() and CUDA_HOME is not None)
    )
    if want_cuda and torch.version.cuda is None:
        raise RuntimeError("IBKD_FORCE_CUDA=1 but the installed torch has no CUDA support")

    cxx = ["-O3"]  # the C++ standard is torch's own choice (C++20 for recent torch)
    define_macros = []
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define_macros.append(("IBKD_WITH_CUDA", None))
        ext = CUDAExtension(
            "ibkd._C",
            cpu_sources + cuda_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        )
    else:
        ext = CppExtension("ibkd._C", cpu_sources, define_macros=define_macros, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    version=_version(),
    packages=find_packages(include=["ibkd", "ibkd.*"]) + ["ibkd.kernels"],
    package_dir={"ibkd.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
