#!/usr/bin/env bash
# Weight-sync check on a GPU machine (UNRUN so far: the project has had no GPU).
#   bash cluster/gpu_check.sh [--size wan2.1-1.3b] [--repeats 3]
# 1. the GPU tests of the sync path (object store into a GPU follower; NCCL broadcast with >= 2 GPUs),
# 2. sync seconds at the given size (default the 1.3B shape, bf16): the object-store path from buckets
#    packed on cuda:0, and with >= 2 GPUs the NCCL broadcast; one JSON object on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv
python -m pytest tests/ray/test_weightsync_gpu.py -q -rs
python -m cluster.gpu_check "$@"
