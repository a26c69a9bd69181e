#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one call on a lent H100 (measured on
# 2026-11-27: 343 s, installs included; the machine's start about 35 s more):
#   run(command="bash benchmarks/gpu_run.sh", carry=[".gpu"], timeout_s=600)
# Build .gpu/wheels first with benchmarks/gpu_wheels.sh. Check the script on the CPU first,
# same commands at toy sizes (fp32, a minute or two):
#   bash benchmarks/gpu_run.sh --cpu
#
# 1. SFT, a 1.0B-parameter Llama-style model (hidden 2048, MLP 8192, 16 layers, 32 heads,
#    8 key/value heads; Llama-3.2-1B's body with the task's vocabulary), bf16, packed rows of
#    2048 tokens, FlashAttention-2 when installed (sdpa otherwise; the JSON says which):
#    tokens/s, model-FLOP utilisation (6 x params x tokens / 989 TFLOP/s) and the held-out
#    loss, ours beside TRL's SFTTrainer.
# 2. PPO, the same 1.0B model as policy (and reference; value and reward models made from
#    it), 64 prompts x 128 new tokens per step: episodes/s, ours beside TRL's PPOTrainer, and
#    our split of a step (sampling + scoring, updates).
# 3. `rlhf plan` of configs/llama-8b-zero3.yaml (8 GPUs), as a record beside the measurements.
# With PART=floor (a second call, 236 s): our SFT step beside the bare-torch floor on the GPU.
# With PART=alloc (191 s): packed SFT with the default CUDA allocator and expandable segments.
# With PART=vllm (a second call, when device time is left): PPO and GRPO on the same 1.0B
# policy with vLLM against HF generate as the rollout engine (generation time, episodes/s).
# It needs vllm there: the lent image has none and its CUDA wheel is over what a call can
# carry (64 MiB), so on that image it cannot run.
# With PART=grpo (a call of its own, at most about 330 s with the setup; run it with
#   run(command="PART=grpo bash benchmarks/gpu_run.sh", carry=[".gpu"], timeout_s=360)):
#    first benchmarks/decoding.py on the same body (128 rows x 128 tokens: our decoding
#    loop beside HF generate, ms a step) -> $OUT/decoding_1b.json; then
#    GRPO on the same 1.0B body (random init, bench_grpo.py --body), bf16, 16 prompts x 8
#    responses of up to 256 new tokens a step, micro-batches of 16, 4 steps, lr 1e-6: ours
#    beside TRL's GRPOTrainer (episodes/s, median step, first step, generation time a step;
#    no held-out gold, meaningless for a random policy) -> $OUT/grpo_1b.json and .log; then
#    PPO as in the main call but 3 steps, for our first step since the allocator fix
#    (first_step_s) -> $OUT/ppo_1b_first.json and .log. Each is cut off with `timeout`
#    (decoding 60 s, GRPO 200 s, PPO what is left of 300 s, skipped under 40 s): if PPO's
#    TRL child is cut, our run's line in its .log still has first_step_s (the JSON is
#    written only when both children are done).
#    Dry run: PART=grpo bash benchmarks/gpu_run.sh --cpu
# Writes JSON and each part's full log under $OUT (benchmarks/results/gpu when run by hand).
set -uo pipefail
MODE=gpu
if [[ "${1:-}" == "--cpu" || "${1:-}" == "--dry" ]]; then MODE=cpu; fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [[ $MODE == gpu ]]; then
    OUT=${OUT:-benchmarks/results/gpu}
    bash benchmarks/gpu_setup.sh 2>&1 | tail -1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    MODEL=(--hidden 2048 --intermediate 8192 --layers 16 --heads 32 --kv-heads 8)
    SFT=(--batch 8 --max-length 2048 --long 80 --rows 480 --lr 3e-4 --precision bf16 --packing)
    FLOOR_ROWS=1600
    PPO=(--rollout 64 --micro 16 --response-length 128 --steps 5 --lr 1e-6 --precision bf16)
    PLAN=(configs/llama-8b-zero3.yaml --num-gpus 8 --stages sft)
    VLLM=("${MODEL[@]}" --rollout 64 --micro 16 --response-length 256 --steps 4 --precision bf16)
    GRPO=(--prompts 16 --group 8 --micro 16 --response-length 256 --steps 4 --lr 1e-6 --precision bf16)
    WORK=/tmp/rlhf-gpu
    # Each part is cut off at its share of the call's 10 minutes (setup about 40 s): a part
    # that runs over still prints the runs it finished.
    SFT_LIMIT=(timeout 210) PPO_LIMIT=(timeout 180) PLAN_LIMIT=(timeout 60)
    # PART=grpo: about 30 s setup + 60 + 200, then PPO with what is left of 320 s.
    DECODE=(--rows 128 --new-tokens 128) DECODE_LIMIT=(timeout 60) GRPO_LIMIT=(timeout 200)
else
    OUT=${OUT:-/tmp/rlhf-gpu-dry/results}
    MODEL=(--hidden 64 --intermediate 128 --layers 2 --heads 4 --kv-heads 2)
    SFT=(--batch 4 --max-length 256 --long 8 --rows 32 --lr 3e-4 --precision fp32 --packing)
    FLOOR_ROWS=64
    PPO=(--rollout 8 --micro 4 --response-length 8 --steps 2 --lr 1e-6 --precision fp32)
    PLAN=(configs/quickstart.yaml --device cpu --stages sft)
    VLLM=("${MODEL[@]}" --rollout 8 --micro 4 --response-length 8 --steps 2 --precision fp32)
    GRPO=(--prompts 4 --group 4 --micro 8 --response-length 8 --steps 2 --lr 1e-6 --precision fp32)
    WORK=/tmp/rlhf-gpu-dry
    SFT_LIMIT=() PPO_LIMIT=() PLAN_LIMIT=() GRPO_LIMIT=() PPO_FIRST_LIMIT=() DECODE_LIMIT=()
    DECODE=(--rows 16 --new-tokens 16)
fi
SFT_PADDED=()
for a in "${SFT[@]}"; do [[ $a == --packing ]] || SFT_PADDED+=("$a"); done
mkdir -p "$OUT"
start=$SECONDS
if [[ ${PART:-main} == main ]]; then
echo "== SFT ($MODE)"
"${SFT_LIMIT[@]}" $PY benchmarks/bench_sft.py --work $WORK --repeats 1 "${MODEL[@]}" "${SFT[@]}" \
    --out "$OUT/sft_1b.json" 2>&1 | tee "$OUT/sft_1b.log" | grep -E "^\||run |Error|error" ; echo "sft: $((SECONDS - start)) s"
echo "== PPO ($MODE)"
"${PPO_LIMIT[@]}" $PY benchmarks/bench_ppo.py --work $WORK --repeats 1 "${MODEL[@]}" "${PPO[@]}" --phases \
    --out "$OUT/ppo_1b.json" 2>&1 | tee "$OUT/ppo_1b.log" | grep -E "^\||run |Error|error" ; echo "ppo: $((SECONDS - start)) s"
echo "== plan"
"${PLAN_LIMIT[@]}" $PY -m rlhf.cli plan "${PLAN[@]}" 2>&1 \
    | grep -v -i warn | tee "$OUT/plan_llama8b.txt" ; echo "total: $((SECONDS - start)) s"
elif [[ ${PART} == floor ]]; then
# PART=floor (a second call): our SFT step beside the floor on the GPU (the same
# micro-batches through the bare model in bf16, fused AdamW, no DeepSpeed), packed rows
# and padded rows, more steps than the main call: where the time of a step goes.
echo "== SFT against the floor, packed ($MODE)"
"${SFT_LIMIT[@]}" $PY benchmarks/bench_sft.py --work $WORK --repeats 1 --who ours,floor "${MODEL[@]}" \
    "${SFT[@]}" --rows $FLOOR_ROWS --out "$OUT/sft_1b_floor.json" 2>&1 | tee "$OUT/sft_1b_floor.log" \
    | grep -E "^\||run |Error|error" ; echo "packed: $((SECONDS - start)) s"
echo "== SFT against the floor, padded rows ($MODE)"
"${PPO_LIMIT[@]}" $PY benchmarks/bench_sft.py --work $WORK --repeats 1 --who ours,floor "${MODEL[@]}" \
    "${SFT_PADDED[@]}" --out "$OUT/sft_1b_floor_padded.json" 2>&1 | tee "$OUT/sft_1b_floor_padded.log" \
    | grep -E "^\||run |Error|error" ; echo "padded: $((SECONDS - start)) s"
elif [[ ${PART} == alloc ]]; then
# PART=alloc: our packed SFT with torch's default CUDA allocator and with expandable
# segments (each step's time and the allocator's retries in the JSON).
for conf in default expandable_segments:True; do
    echo "== SFT, packed, allocator $conf ($MODE)"
    [[ $conf == default ]] && unset PYTORCH_CUDA_ALLOC_CONF || export PYTORCH_CUDA_ALLOC_CONF=$conf
    "${PPO_LIMIT[@]}" $PY benchmarks/bench_sft.py --work $WORK --repeats 1 --who ours "${MODEL[@]}" "${SFT[@]}" \
        --rows $FLOOR_ROWS --out "$OUT/sft_1b_alloc_${conf%%:*}.json" 2>&1 | tee "$OUT/sft_1b_alloc_${conf%%:*}.log" \
        | grep -E "^\||run |Error|error" ; echo "$conf: $((SECONDS - start)) s"
done
elif [[ ${PART} == grpo ]]; then
# PART=grpo: decoding, GRPO ours / TRL on the 1.0B body, then PPO's first step (see the header).
echo "== decoding ($MODE)"
"${DECODE_LIMIT[@]}" $PY benchmarks/decoding.py "${MODEL[@]}" "${DECODE[@]}" --out "$OUT/decoding_1b.json" 2>&1 \
    | grep -E "a step|Error|error"; echo "decoding: $((SECONDS - start)) s"
echo "== GRPO ($MODE)"
"${GRPO_LIMIT[@]}" $PY benchmarks/bench_grpo.py --work $WORK --repeats 1 --body "${MODEL[@]}" "${GRPO[@]}" \
    --out "$OUT/grpo_1b.json" 2>&1 | tee "$OUT/grpo_1b.log" | grep -E "^\||run |Error|error" ; echo "grpo: $((SECONDS - start)) s"
echo "== PPO, 3 steps: the first step ($MODE)"
left=$((300 - SECONDS))  # of the call's 320 s
[[ $MODE == gpu ]] && PPO_FIRST_LIMIT=(timeout $left)
if [[ $MODE == cpu ]] || ((left > 40)); then
    "${PPO_FIRST_LIMIT[@]}" $PY benchmarks/bench_ppo.py --work $WORK --repeats 1 "${MODEL[@]}" "${PPO[@]}" --steps 3 \
        --phases --out "$OUT/ppo_1b_first.json" 2>&1 | tee "$OUT/ppo_1b_first.log" | grep -E "^\||run |Error|error"
else
    echo "skipped: $left s left"
fi
echo "total: $((SECONDS - start)) s"
else
# PART=vllm (a second call): PPO and GRPO with vLLM against HF generate as the rollout
# engine, on the same 1.0B policy. Needs vllm on the machine (the image or .gpu/wheels);
# without it bench_vllm.py says so.
for stage in ppo grpo; do
    echo "== vLLM against HF generate: $stage ($MODE)"
    "${PPO_LIMIT[@]}" $PY benchmarks/bench_vllm.py --stage $stage "${VLLM[@]}" \
        --out "$OUT/vllm_${stage}.json" 2>&1 | grep -E "^\||run |bench_vllm|Error" ; echo "$stage: $((SECONDS - start)) s"
done
fi
