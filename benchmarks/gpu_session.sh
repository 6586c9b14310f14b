#!/usr/bin/env bash
# Every GPU measurement of issue 12, in three parts that each fit one call of a lent GPU machine
# (the `device` tool: 10 minutes a command, 30 minutes of device time a session). Each part writes
# its tables, JSON and log under $OUT (the folder that comes back), and every command in it runs
# under `timeout`, so a part that overruns still returns what it measured.
#
#   bash benchmarks/gpu_session.sh step      # ~9 min: eager step ratios (GPT, ViT), then the workload tests on CUDA
#   bash benchmarks/gpu_session.sh compile   # ~7 min: compiled GPT steps against the eager bare loop
#   bash benchmarks/gpu_session.sh packing   # ~9 min: 1, 2, 4 trials per GPU, without and with CUDA MPS
#   bash benchmarks/gpu_session.sh all       # the three in turn (a machine without a 10-minute limit)
#
# It needs only what the GPU image has (python3 with torch, timm, numpy, scikit-learn, pytest):
# no Ray, MLflow or Optuna, and no install; the checkout is put on PYTHONPATH.
# With --cpu-smoke every command runs at tiny sizes on the CPU instead (the test suite's check that
# the script works; its figures mean nothing) and the tests are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-}
smoke=()
[[ ${2:-} == --cpu-smoke ]] && smoke=(--cpu-smoke)
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

log=$part.log  # one log per call: the machine returns at most 8 files
run() {  # run SECONDS CMD...: the command under timeout, its output shown and kept in $OUT/$log
    local secs=$1
    shift
    echo "== $(date -u +%H:%M:%S) $* (limit ${secs} s)" | tee -a "$OUT/$log"
    timeout --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 124 || $rc == 137 ]] && echo "== timed out after ${secs} s" | tee -a "$OUT/$log"
    [[ $rc != 0 ]] && status=1
    return 0
}

environment() {
    {
        date -u
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
        "$PY" -c 'import sys, torch, timm; print("python", sys.version.split()[0], "torch", torch.__version__,
"timm", timm.__version__, "cuda", torch.cuda.is_available())'
        echo "cpus $(nproc)"
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

step() {
    if [[ ${#smoke[@]} == 0 ]]; then
        run 270 "$PY" benchmarks/gpu_step.py --mode eager --rounds 10 --budget-s 230 --json "$OUT/step.json"
        # the workload tests on CUDA (TrialConfig's device "auto" is the GPU there): the sync-debug
        # test, compile, the stabilizers' and probes' maths, the trial loop (2 min on 2 CPU cores,
        # compile tests included); -v names each test as it ends, should the limit cut the run
        run 270 "$PY" -m pytest -v -p no:cacheprovider tests/test_launch_count.py tests/test_compile.py \
            tests/test_stabilizers.py tests/test_probes.py tests/test_models.py tests/test_trial.py \
            tests/test_divergence.py tests/test_outcome.py tests/test_data.py
    else
        run 300 "$PY" benchmarks/gpu_step.py --mode eager --rounds 1 --steps-per-round 2 \
            --workloads gpt --variants none,weyl "${smoke[@]}" --json "$OUT/step.json"
    fi
}

compile() {
    if [[ ${#smoke[@]} == 0 ]]; then
        run 460 "$PY" benchmarks/gpu_step.py --mode compiled --workloads gpt --rounds 6 \
            --budget-s 400 --json "$OUT/compile.json"
    else
        run 300 "$PY" benchmarks/gpu_step.py --mode compiled --workloads gpt --rounds 1 \
            --steps-per-round 2 --variants none "${smoke[@]}" --json "$OUT/compile.json"
    fi
}

packing() {
    if [[ ${#smoke[@]} == 0 ]]; then
        run 270 "$PY" benchmarks/gpu_packing.py --steps 60 --warmup 5 --timeout 40 \
            --json "$OUT/packing.json"
        run 270 "$PY" benchmarks/gpu_packing.py --steps 60 --warmup 5 --timeout 40 --mps \
            --json "$OUT/packing_mps.json"
    else
        run 300 "$PY" benchmarks/gpu_packing.py --stabilizers weyl --packing 1,2 --steps 3 \
            --warmup 1 --timeout 120 "${smoke[@]}" --json "$OUT/packing.json"
    fi
}

case "$part" in
    step | compile | packing) environment; "$part" ;;
    all) environment; step; compile; packing ;;
    *) echo "usage: bash benchmarks/gpu_session.sh step|compile|packing|all [--cpu-smoke]" >&2; exit 2 ;;
esac
echo "== results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
