#!/usr/bin/env bash
# The GPU runbook: on a machine with an NVIDIA GPU, from the repository root,
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
#
# builds both extensions in place (_cuda required, for TENSOR_PEFT_CUDA_ARCHS, default the
# GPU's own), runs the whole test suite (the op tests then run every backend on CUDA
# tensors too: cuda, triton, reference), and runs the benchmark suites on the GPU, writing
# everything into RESULTS_DIR (default benchmarks/results/<gpu-name>/): build.log, info.txt,
# tests.log, floors.log (each memory-bound op's time against its bytes at 3.0 and 4.8 TB/s),
# bench.log, bench.json, bench.md. Each step has a time limit so that the
# whole fits in 10 minutes; a failing step is reported and the next one still runs.
# The exit status is that of the first failing step (0 when all passed).
set -uo pipefail

python=${PYTHON:-python3}
gpu=$("$python" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null) || {
    echo "gpu_check: torch sees no CUDA GPU here" >&2
    exit 2
}
name=$(echo "$gpu" | tr -cs 'A-Za-z0-9' '-' | tr 'A-Z' 'a-z' | sed 's/^-//;s/-$//')
results=${1:-benchmarks/results/$name}
mkdir -p "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

step() {  # step NAME LIMIT_SECONDS LOG COMMAND...: run, log, and remember the first failure
    local label=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS
    timeout "$limit" "$@" >"$results/$log" 2>&1
    local rc=$?
    echo "gpu_check: $label: exit $rc in $((SECONDS - start)) s (log: $results/$log)"
    tail -n 3 "$results/$log"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
    return "$rc"
}

arch=$("$python" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
export TENSOR_PEFT_CUDA=1 TENSOR_PEFT_CUDA_ARCHS=${TENSOR_PEFT_CUDA_ARCHS:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)}
step build 240 build.log "$python" setup.py build_ext --inplace || exit "$status"
step info 60 info.txt "$python" -m tensor_peft info
step tests 270 tests.log "$python" -m pytest tests -q -p no:cacheprovider -rs
step floors 60 floors.log "$python" -m tensor_peft.gpu_report.floors && cat "$results/floors.log"
step bench 240 bench.log "$python" -m tensor_peft bench --name bench --out "$results"
echo "gpu_check: $gpu: done, status $status; results in $results"
exit "$status"
