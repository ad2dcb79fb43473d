#!/usr/bin/env bash
# The GPU check in ONE call of the device machine (a lent GPU comes with ~15 min of device time in all,
# starts included): build ibkd._C with the CUDA kernels for that GPU, run the GPU tests, then the GPU
# benchmarks, each under its own time limit and all under one deadline, so a hang in one still returns the
# others' results.
#
#   device run:  command="bash scripts/gpu-check.sh", carry=[".whl"], timeout_s=595
#   anywhere:    bash scripts/gpu-check.sh            # results in ./gpu-results instead of $OUT
#
# Writes to $OUT: gpu.txt (the GPU, driver, clocks before/after, torch/CUDA/Triton versions, backends),
# build.log, tests.log and tests.xml (junit), bench.log and the benchmark JSON of benchmarks/results/.
# Commit them with the GPU's name. The device tool returns at most 8 files from $OUT: this script writes 6
# or 7; copying more into $OUT beside it (say every results JSON) loses files, tests.log first.
# Limits in seconds: TOTAL_S (default 570, the deadline for everything), BUILD_S (200), TESTS_S (200),
# BENCH_S (180), LADDER_S (45; 0 skips the ladder). A follow-up call can narrow the steps: TESTS_K and
# BENCH_K are pytest -k expressions (default: every GPU test; every benchmark case but the ladder), BENCH_FILES
# the benchmark files in the order they run, TESTS_N the pytest-xdist workers (default 8; 1 runs serially).
# The benchmark grid is the headline one (InfoNCE B in {16384, 65536},
# HSIC n = 16384, D = 768, bf16 then fp32, fwd+bwd); IBKD_BENCH_GPU_* (benchmarks/bench_common.py) widen it.
# The device image's python3 holds a CUDA torch, Triton, pytest and pytest-benchmark. If its setuptools is
# older than 77 the build says so in one line; carry a wheel: pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl "setuptools>=77" (.whl/ is git-ignored, so name it in carry).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false IBKD_FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
deadline=$(( $(date +%s) + ${TOTAL_S:-570} ))
stamp=$(mktemp)  # results written after this are this run's
export IBKD_BENCH_NOTE="${IBKD_BENCH_NOTE:-scripts/gpu-check.sh, one call of a lent GPU}"
limit() {  # the smaller of a step's own limit and the time left before the deadline (at least 1 s)
    local left=$(( deadline - $(date +%s) ))
    (( left < 1 )) && left=1
    echo $(( $1 < left ? $1 : left ))
}
clocks() { nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu --format=csv; }

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    echo "clocks at start:"; clocks
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

t=$(date +%s)
# --no-build-isolation: compiled against the image's torch; --no-index/--no-deps: the machine has no network
timeout "$(limit "${BUILD_S:-200}")" "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - t ))s"
grep -h "ibkd build:" "$OUT/build.log"
"$PY" -c "import ibkd; [print('backend', b.name, b.available, b.reason) for b in ibkd.backends()]" | tee -a "$OUT/gpu.txt"

t=$(date +%s)
# -v: a run cut off by its limit still shows which tests passed; --timeout (where pytest-timeout is
# installed): one hang costs 90 s, not the rest
per_test=(); "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=90)
# -n (pytest-xdist, where installed): most of the tests' time is Triton compiling kernels on the CPU, and the
# device machine has 16 cores; the first run spent its 170 s on one of them and never reached 20 tests
"$PY" -c "import xdist" 2>/dev/null && [ "${TESTS_N:-8}" -gt 1 ] && per_test+=(-n "${TESTS_N:-8}")
# Only the files that hold GPU tests: the image lacks the training extras (datasets, model2vec, the teacher),
# and a module that fails to import must not stop the others (--continue-on-collection-errors).
timeout "$(limit "${TESTS_S:-200}")" "$PY" -m pytest tests/test_cuda_backend.py tests/test_triton_backend.py \
    tests/test_numerics.py -m gpu -k "${TESTS_K:-gpu or not gpu}" -v --tb=short --durations=15 -p no:cacheprovider \
    --continue-on-collection-errors "${per_test[@]}" \
    --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
echo "gpu tests rc=$? in $(( $(date +%s) - t ))s"
tail -n 3 "$OUT/tests.log"

t=$(date +%s)
export IBKD_BENCH_GPU_INFONCE_B="${IBKD_BENCH_GPU_INFONCE_B:-16384,65536}" \
    IBKD_BENCH_GPU_INFONCE_D="${IBKD_BENCH_GPU_INFONCE_D:-768}" IBKD_BENCH_GPU_HSIC_N="${IBKD_BENCH_GPU_HSIC_N:-16384}" \
    IBKD_BENCH_GPU_HSIC_D="${IBKD_BENCH_GPU_HSIC_D:-768}" IBKD_BENCH_GPU_MODES="${IBKD_BENCH_GPU_MODES:-fwd+bwd}"
timeout "$(limit "${BENCH_S:-180}")" "$PY" -m pytest ${BENCH_FILES:-benchmarks/test_bench_infonce.py benchmarks/test_bench_hsic.py} -m gpu \
    -k "${BENCH_K:-not largest}" -v --tb=short -p no:cacheprovider >"$OUT/bench.log" 2>&1
echo "gpu benchmarks rc=$? in $(( $(date +%s) - t ))s"
grep -cE "PASSED|SKIPPED" "$OUT/bench.log" | sed 's/^/benchmark cases done: /'

t=$(date +%s)
[ "${LADDER_S:-45}" -gt 0 ] && IBKD_BENCH_BACKENDS="${LADDER_BACKENDS:-cuda,triton,reference}" timeout "$(limit "${LADDER_S:-45}")" \
    "$PY" -m pytest benchmarks/test_bench_infonce.py -m gpu -k largest -v -p no:cacheprovider >>"$OUT/bench.log" 2>&1
echo "largest-batch ladder rc=$? in $(( $(date +%s) - t ))s"
{ echo "clocks at end:"; clocks; } | tee -a "$OUT/gpu.txt"
find benchmarks/results -name "*.json" -newer "$stamp" -exec cp {} "$OUT/" \;  # this run's results only
