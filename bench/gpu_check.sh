#!/usr/bin/env bash
# The GPU checks, on one GPU in under 8 minutes: the throughput benchmark (step time in float32 and bf16 autocast,
# padding, a trial through Ray against the same loop in-process, start-up), DenseLoRA's cost against LoRA's (step,
# memory, forward pass) and a 2-minute DenseLoRA trial of SmolLM2-135M, evaluated before and after. Run from anywhere, in an environment set up as the README says (with a
# CUDA build of torch); the figures go in docs/PERFORMANCE.md.
#
#     bash bench/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
STORAGE=${STORAGE:-$(mktemp -d)}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'; print('torch', torch.__version__, torch.cuda.get_device_name())"

# ~2 minutes on an H100-class GPU: more interleaved steps than on a CPU, since each is short.
timeout 170 "$PYTHON" bench/throughput.py --steps 100 --pairs 1 --step-samples 20 --repeats 2 --storage-path "$STORAGE/bench"

# ~2.5 minutes: DenseLoRA against LoRA at r = 32, with and without dropout; each memory cell loads the model afresh.
timeout 170 "$PYTHON" bench/adapter_cost.py --ranks 32 --steps 20

# The trial: 2 minutes of training at most, the paper's batch of 16 in one micro-batch, bf16 (dtype auto).
timeout 130 "$PYTHON" -m densetune.trial --model smollm2-135m --method denselora --rank 32 --datasets synthetic \
    --max-steps 400 --warmup-steps 40 --batch-size 16 --micro-batch-size 16 --no-train-on-inputs \
    --eval-mode loglik --eval-limit 300 --eval-batch-size 64 --eval-at-start --report-every 50 \
    --storage-path "$STORAGE/trial" --name gpu-check
