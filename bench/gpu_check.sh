#!/usr/bin/env bash
# The GPU checks, on one GPU in under 5 minutes: the throughput benchmark (step time in float32 and bf16 autocast,
# padding, a trial through Ray against the same loop in-process, start-up), DenseLoRA's cost against LoRA's (step,
# memory, forward pass) and a short DenseLoRA trial of SmolLM2-135M, evaluated before and after. Run from anywhere, on
# a machine set up as the README says (with a CUDA build of torch); the figures go in docs/PERFORMANCE.md.
#
#     bash bench/gpu_check.sh 2>&1 | tee gpu_check.log
#
# Each step runs under a time limit and whatever happens the next one runs: one failure must not cost the figures
# of the others. A table at the end gives each step's status and seconds; the exit status is 1 if any step was not ok.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python  # the README's set-up (make)
fi
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
STORAGE=${STORAGE:-$(mktemp -d)}
# A step past its limit gets SIGTERM, then SIGKILL this much later.
GRACE=5
ROWS=()
FAILED=0
BUDGET=0

# finish NAME LIMIT EXIT_CODE STARTED: one row of the table.
finish() {
    local status=ok
    case $3 in
        0) ;;
        124 | 137) status="timed out (${2} s)" ;;
        *) status="failed (exit $3)" ;;
    esac
    [[ $status == ok ]] || FAILED=1
    echo "== $1: $status"
    ROWS+=("$(printf '| %s | %s | %d |' "$1" "$status" $((SECONDS - $4)))")
    BUDGET=$((BUDGET + $2 + GRACE))
}

# step NAME LIMIT COMMAND...
step() {
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "== $name (at most $limit s)"
    timeout -k "$GRACE" "$limit" "$@"
    finish "$name" "$limit" $? "$started"
}

# The limits, with the grace after each, add up to 300 s: the whole check fits in 5 minutes however its steps end.
step nvidia-smi 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step "torch sees the GPU" 20 "$PYTHON" -c \
    "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'; print('torch', torch.__version__, torch.cuda.get_device_name())"

# ARC-Easy where the data folders hold it (densetune.data.loading.data_dirs: $DENSETUNE_DATA, ../shared/data/llm-adapters),
# else the built-in task, which a fresh machine has.
started=$SECONDS
DATASETS=$(timeout -k "$GRACE" 20 "$PYTHON" -c \
    "from densetune.data import find_in_data_dirs; print('ARC-Easy' if find_in_data_dirs('ARC-Easy') else 'synthetic')")
code=$?
[[ $code == 0 ]] || DATASETS=synthetic
finish "data: $DATASETS" 20 $code "$started"

# Fewer interleaved steps than on a CPU, since each is short.
step "bench/throughput.py" 95 "$PYTHON" bench/throughput.py --datasets "$DATASETS" --steps 40 --pairs 1 \
    --step-samples 10 --repeats 1 --storage-path "$STORAGE/bench"

# DenseLoRA against LoRA at r = 32 and the usual dropout; each memory cell loads the model afresh.
step "bench/adapter_cost.py" 65 "$PYTHON" bench/adapter_cost.py --ranks 32 --dropouts 0.05 --steps 10

# The paper's batch of 16 in one micro-batch, bf16 (dtype auto).
step "trial" 60 "$PYTHON" -m densetune.trial --model smollm2-135m --method denselora --rank 32 --datasets synthetic \
    --max-steps 150 --warmup-steps 15 --batch-size 16 --micro-batch-size 16 --no-train-on-inputs \
    --eval-mode loglik --eval-limit 200 --eval-batch-size 64 --eval-at-start --report-every 25 \
    --storage-path "$STORAGE/trial" --name gpu-check

echo
echo "| step | status | seconds |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "$SECONDS s in all (the limits allow $BUDGET s); outputs under $STORAGE"
exit $FAILED
