#!/usr/bin/env bash
# The GPU check in ONE call of the device machine (a lent GPU comes with ~15 min of device time in all,
# starts included): build ibkd._C with the CUDA kernels for that GPU, run the GPU tests, then the GPU
# benchmarks, each under its own time limit, so a hang in one still returns the others' results.
#
#   device run:  command="bash scripts/gpu-check.sh", timeout_s=580   (carry=[".whl"] if a wheel is needed)
#   anywhere:    bash scripts/gpu-check.sh            # results in ./gpu-results instead of $OUT
#
# Writes to $OUT: gpu.txt (the GPU, driver, torch/CUDA/Triton versions, backends), build.log, tests.log and
# tests.xml (junit), bench.log and the benchmark JSON of benchmarks/results/. Commit them with the GPU's name.
# Limits in seconds: BUILD_S (default 200), TESTS_S (150), BENCH_S (200); IBKD_BENCH_QUICK=1 for small sizes.
# The device image's python3 holds a CUDA torch, Triton, pytest and pytest-benchmark. If its setuptools is
# older than 77 (the build says so in one line), carry a wheel: pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl "setuptools>=77"  (and `echo /.whl/ >> .git/info/exclude`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false IBKD_FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

t=$(date +%s)
# --no-build-isolation: compiled against the image's torch; --no-index/--no-deps: the machine has no network
timeout "${BUILD_S:-200}" "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - t ))s"
grep -h "ibkd build:" "$OUT/build.log"
"$PY" -c "import ibkd; [print('backend', b.name, b.available, b.reason) for b in ibkd.backends()]" | tee -a "$OUT/gpu.txt"

t=$(date +%s)
timeout "${TESTS_S:-150}" "$PY" -m pytest tests/ -m gpu -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    >"$OUT/tests.log" 2>&1
echo "gpu tests rc=$? in $(( $(date +%s) - t ))s"
tail -n 3 "$OUT/tests.log"

t=$(date +%s)
timeout "${BENCH_S:-200}" "$PY" -m pytest benchmarks/test_bench_infonce.py benchmarks/test_bench_hsic.py -m gpu -q \
    -p no:cacheprovider >"$OUT/bench.log" 2>&1
echo "gpu benchmarks rc=$? in $(( $(date +%s) - t ))s"
tail -n 3 "$OUT/bench.log"
find benchmarks/results -name "*.json" -newer "$OUT/gpu.txt" -exec cp {} "$OUT/" \;  # this run's results only
