#!/usr/bin/env bash
# The GPU checks of the scale-out work, as one command for a machine with an NVIDIA GPU and PyTorch
# (nothing else needed for the first two), most valuable first, within CHECKS_SECONDS (default 560):
#   1. experiments/benchmarks/mfu.py: tokens/s and MFU of moxin_7b-shaped blocks, eager and compiled
#      (target: >= 45% MFU), with the compiled steps' top kernels in mfu_profile.txt;
#   2. experiments/gpu/fsdp_check.py: bf16 FSDP2 + activation checkpointing + inductor, and generation
#      from the gathered weights (GRPO's rollouts), against a plain bf16-autocast model;
#   3. tests/test_parallel.py -k gpu_strategies, one strategy at a time (bf16 FSDP through run.py,
#      Colossal-AI ZeRO-2, Gemini and hybrid, and on 2 GPUs its tensor parallelism and the pipeline
#      stages), where the project's dependencies are importable (`make install install-colossalai`,
#      or carried wheels on PYTHONPATH).
# Each step gets what is left of the time, up to its own cap; logs and the JSON lines go to $OUT
# (default outputs/gpu_checks). Exits non-zero if a check failed or ran out of time.
# CHECKS (default "mfu fsdp tests") and STRATEGIES (default: all six) choose what runs. Wheels that
# experiments/gpu/fetch_wheels.sh left in .whl/ are installed first, for an image without an index.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-outputs/gpu_checks}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
deadline=${CHECKS_SECONDS:-560}
checks=${CHECKS:-mfu fsdp tests}
# (the one-GPU checks no GPU has passed yet first, then fsdp_bf16, which passed on an H200; the 2-GPU ones last)
strategies=${STRATEGIES:-colossalai_zero2 colossalai_gemini colossalai_hybrid_bf16 fsdp_bf16 colossalai_hybrid_tp_bf16 fsdp_pipeline_bf16}
status=0

rm -f "$out"/{mfu,fsdp_check}.log "$out/results.jsonl"  # no results of an earlier run mixed in

if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d /tmp/moxin_site.XXXX)
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
            > "$out/pip.log" 2>&1; then
        export PYTHONPATH=$PYTHONPATH:$site:$PWD/.whl/extra
    else  # the first two checks need PyTorch alone: they still run
        echo "installing .whl/ failed (see $out/pip.log): the GPU tests will not run"
        status=1
    fi
fi

seconds_for() {  # the step's cap, or what is left of the whole time if that is less
    local left=$((deadline - SECONDS))
    echo $((left < $1 ? (left > 1 ? left : 1) : $1))
}

wanted() {  # whether CHECKS names this step, and time is left for it
    [[ " $checks " == *" $1 "* ]] || return 1
    ((SECONDS < deadline)) && return 0
    echo "$1: not run, no time left of ${deadline}s"
    status=1
    return 1
}

nvidia-smi -L 2>&1 | tee "$out/device.txt"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"

if wanted mfu; then
    timeout "$(seconds_for 300)" "$python" experiments/benchmarks/mfu.py --profile "$out/mfu_profile.txt" 2>&1 \
        | tee "$out/mfu.log" || status=1
fi
if wanted fsdp; then
    timeout "$(seconds_for 150)" "$python" experiments/gpu/fsdp_check.py 2>&1 | tee "$out/fsdp_check.log" || status=1
fi
cat "$out"/mfu.log "$out"/fsdp_check.log 2>/dev/null | grep '^{' > "$out/results.jsonl"

: > "$out/pytest_gpu.log"
if [[ " $checks " == *" tests "* ]]; then
    if "$python" -c "import hydra, lightning, mistral_common, lm_eval, colossalai" 2>/dev/null; then
        # tests/conftest.py's fixtures need `datasets`; the GPU strategies' test uses none of them.
        conftest=$("$python" -c "import datasets" 2>/dev/null || echo --noconftest)
        for name in $strategies; do
            wanted tests || break
            # SIGINT: pytest still prints where it was and its summary.
            timeout -s INT -k 10 "$(seconds_for 200)" "$python" -m pytest -q -rs -p no:cacheprovider $conftest \
                tests/test_parallel.py -k "gpu_strategies and $name" 2>&1 | tee -a "$out/pytest_gpu.log" || status=1
        done
    else
        echo "tests/test_parallel.py -k gpu_strategies not run: the project's dependencies (make install" \
            "install-colossalai, or experiments/gpu/fetch_wheels.sh) are missing" | tee "$out/pytest_gpu.log"
    fi
fi
echo "checks took ${SECONDS}s of ${deadline}s; exit status ${status}"
exit $status
