#!/usr/bin/env bash
# The GPU checks of the scale-out work, as one command for a machine with an NVIDIA GPU and PyTorch
# (nothing else needed for the first two): about 8 minutes on an H100/H200.
#   1. experiments/gpu/fsdp_check.py: bf16 FSDP2 + activation checkpointing + inductor, and generation
#      from the gathered weights (GRPO's rollouts), against a plain bf16-autocast model;
#   2. experiments/benchmarks/mfu.py: tokens/s and MFU of moxin_7b-shaped blocks, eager and compiled
#      (target: >= 45% MFU);
#   3. tests/test_parallel.py -k gpu_strategies (Colossal-AI ZeRO-2 and Gemini, bf16 FSDP through run.py, and
#      on 2 GPUs its pipeline stages), only where the project's dependencies are installed
#      (`make install install-colossalai`).
# Logs and the JSON lines go to $OUT (default outputs/gpu_checks). Exits non-zero if a check failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-outputs/gpu_checks}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0

nvidia-smi -L 2>&1 | tee "$out/device.txt"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"

timeout 180 "$python" experiments/gpu/fsdp_check.py 2>&1 | tee "$out/fsdp_check.log" || status=1
timeout 420 "$python" experiments/benchmarks/mfu.py 2>&1 | tee "$out/mfu.log" || status=1
grep '^{' "$out/fsdp_check.log" "$out/mfu.log" --no-filename > "$out/results.jsonl"

if "$python" -c "import hydra, lightning, datasets, mistral_common, lm_eval, colossalai" 2>/dev/null; then
    timeout 600 "$python" -m pytest -q -rs tests/test_parallel.py -k gpu_strategies 2>&1 | tee "$out/pytest_gpu.log" || status=1
else
    echo "tests/test_parallel.py -k gpu_strategies not run: the project's dependencies (make install install-colossalai) are missing" \
        | tee "$out/pytest_gpu.log"
fi
exit $status
