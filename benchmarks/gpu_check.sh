#!/usr/bin/env bash
# The GPU runbook: on a machine with an NVIDIA GPU, from the repository root,
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
#
# builds the extensions in place (_cuda required, for TENSOR_PEFT_CUDA_ARCHS, default the
# GPU's own; _cuda_emulated, the same kernels under the CPU emulation of CUDA), runs the
# tests of the ops, backends and layers (they then run every backend on CUDA tensors too:
# cuda, triton, reference), runs the CUDA kernels on the GPU and under the emulation side
# by side on the same inputs, and runs the benchmark suites on the GPU, writing everything
# into RESULTS_DIR (default benchmarks/results/<gpu-name>/): build.log, info.txt, tests.log,
# cuda-vs-emulated.log (each op's largest difference between the two), floors.log (each
# memory-bound op's time against its bytes at 3.0 and 4.8 TB/s), bench.log, bench.json,
# bench.md. Each step has a time limit so that the whole fits in 10 minutes; a failing
# step is reported and the next one still runs. The exit status is that of the first
# failing step (0 when all passed).
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
export TENSOR_PEFT_CUDA=1 TENSOR_PEFT_CUDA_EMULATION=1 TENSOR_PEFT_CUDA_ARCHS=${TENSOR_PEFT_CUDA_ARCHS:-$arch}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
parallel=()  # the tests in parallel processes where pytest-xdist is installed
if "$python" -c "import xdist" 2>/dev/null; then parallel=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))"); fi
step build 150 build.log "$python" setup.py build_ext --inplace || exit "$status"
step info 20 info.txt "$python" -m tensor_peft info
step tests 210 tests.log "$python" -m pytest tests/ops tests/backends tests/nn -q -p no:cacheprovider -rs "${parallel[@]}"
step cuda-vs-emulated 60 cuda-vs-emulated.log "$python" -m pytest tests/ops/test_cuda_matches_emulation.py -q -s \
    -p no:cacheprovider
step floors 45 floors.log "$python" -m tensor_peft.gpu_report.floors && cat "$results/floors.log"
step bench 110 bench.log "$python" -m tensor_peft bench --name bench --out "$results"
echo "gpu_check: $gpu: done, status $status; results in $results"
exit "$status"
