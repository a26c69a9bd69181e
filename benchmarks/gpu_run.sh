#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, in one call on a lent GPU machine:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".gpu"])
# Writes JSON results under $OUT (or benchmarks/results/gpu when run by hand).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
bash benchmarks/gpu_setup.sh 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# SFT: a ~150M-parameter Llama-style model, ~270-token sequences, bf16.
python3 benchmarks/bench_sft.py --repeats 2 --hidden 1024 --layers 16 --heads 16 --batch 32 --long 20 \
    --rows 2000 --max-length 320 --lr 3e-4 --precision bf16 --out "$OUT/sft_gpu.json" 2>&1 | grep -E "^\||run "
# PPO: a ~40M-parameter policy, 128 prompts x 64 new tokens per step, bf16.
python3 benchmarks/bench_ppo.py --repeats 1 --hidden 512 --layers 8 --heads 8 --rollout 128 --micro 64 \
    --response-length 64 --steps 8 --precision bf16 --out "$OUT/ppo_gpu.json" 2>&1 | grep -E "^\||run "
# ZeRO-3 rollouts against ZeRO-0 on the GPU.
python3 benchmarks/bench_rollout.py --hidden 1024 --layers 16 --heads 16 --batch 64 --new-tokens 128 \
    --out "$OUT/rollout_gpu.json" 2>&1 | grep -E "^\||identical"
# vLLM against HF generate as the rollout engine: PPO and GRPO on a ~1B Llama-style policy
# (hidden 2048, 26 layers), bf16. Needs vllm on the machine (the image or .gpu/wheels);
# without it bench_vllm.py says so and this step is skipped.
for stage in ppo grpo; do
    python3 benchmarks/bench_vllm.py --stage $stage --hidden 2048 --layers 26 --heads 32 --precision bf16 \
        --rollout 64 --micro 16 --response-length 256 --steps 4 --out "$OUT/vllm_${stage}_gpu.json" 2>&1 \
        | grep -E "^\||run |bench_vllm"
done

