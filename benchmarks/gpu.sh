#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine (about 5 minutes on one GPU, at
# most 10 with the timeouts below), run from the repository root:
#
#     bash benchmarks/gpu.sh [CLOUDS_TRAIN_DIR]
#
# 1. `pytest -m gpu` (tests/test_gpu.py): bf16 autocast trains to finite, sane numbers; BatchNorm on
#    CUDA becomes torch's SyncBatchNorm; with 2+ GPUs, NCCL DDP (one process per GPU) holds the
#    same BatchNorm statistics on every rank and ends where one process does, in the Trainer and
#    in the real `ratchet train` with train.nproc = the GPU count.
# 2. benchmarks/bench_image.py --device cuda on the clouds training tree, at the course's batch 16
#    and at 256: the trainer against the hand-optimised raw loop over GPU-resident uint8 arrays
#    (goal >= 0.97), and the pipeline's images/s over the same training step on a fixed
#    GPU-resident batch (goal >= 0.8), the raw and the course loop's ratios beside it. Each run
#    ends with one JSON line of its ratios.
#
# Setup: it uses .venv when it exists, else runs `make setup` first (the pinned set from
# constraints.txt; ~2 minutes on a fresh machine, on top of the above). The clouds tree is the
# argument, else $CLOUDS, else the first of ../shared/data/clouds/clouds_train and
# shared/data/clouds/clouds_train that exists. With $OUT set, the output is also kept in
# $OUT/gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

clouds="${1:-${CLOUDS:-}}"
if [ -z "$clouds" ]; then
    for dir in ../shared/data/clouds/clouds_train shared/data/clouds/clouds_train; do
        if [ -d "$dir" ]; then clouds="$dir"; break; fi
    done
fi
log="${OUT:-}"; log="${log:+$log/gpu.txt}"; log="${log:-/dev/null}"

test -x .venv/bin/python || make setup
py=.venv/bin/python
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.device_count(), 'GPU(s)')"

    echo "== pytest -m gpu"
    timeout 300 "$py" -m pytest -m gpu -q -rs tests/test_gpu.py || echo "pytest -m gpu failed (exit $?)"

    if [ -z "$clouds" ]; then
        echo "no clouds tree found: pass its path (clouds/clouds_train) as the argument"; exit 1
    fi
    for batch in 16 256; do
        echo "== bench_image.py --device cuda --batch-size $batch"
        timeout 240 "$py" benchmarks/bench_image.py --root "$clouds" --device cuda --batch-size "$batch" \
            --rounds 5 --epochs 3 || echo "bench_image.py at batch $batch failed (exit $?)"
    done
} 2>&1 | tee "$log"
