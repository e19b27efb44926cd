#!/usr/bin/env bash
# Two SaEI steps end to end on one GPU with verl 0.9.1 + vLLM (the CPU tests cannot run the
# engine). Needs, on the GPU machine: verl[verl-core]==0.9.1, vllm, this package
# (pip install --no-deps -e .), a local Qwen2.5-VL checkpoint ($MODEL: a directory, e.g.
# Qwen2.5-VL-3B-Instruct; nothing is downloaded) and geo3k parquet files ($DATA, made with
# verl's examples/data_preprocess/geo3k.py). Logs go to $OUT (or ./saei-verl-check).
# Passes when the packed-rows attack agrees with the padded one (bench/gpu_verl_attack.py)
# and both steps finish.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a local Qwen2.5-VL directory}"
: "${DATA:?set DATA to the geo3k parquet directory}"
OUT="${OUT:-saei-verl-check}"
mkdir -p "$OUT"

python3 -c "import verl, vllm; from saei_fast.integrations.verl import plugin; \
assert not plugin.REGISTRATION_ERRORS, plugin.REGISTRATION_ERRORS; print('verl', verl.__version__, 'vllm', vllm.__version__)"

# The actor attack with packed rows through flash-attn's varlen kernel (the CPU tests run a
# float64 stand-in for it), against the padded layout.
timeout 600 python3 bench/gpu_verl_attack.py 2>&1 | tee "$OUT/verl_attack.log"

timeout 1500 bash examples/verl/qwen2_5_vl_7b_geo3k_saei.sh \
    actor_rollout_ref.model.path="$MODEL" \
    data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
    data.train_batch_size=4 data.val_max_samples=8 \
    data.max_prompt_length=1024 data.max_response_length=256 \
    actor_rollout_ref.actor.ppo_mini_batch_size=4 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
    actor_rollout_ref.rollout.agent.num_workers=2 \
    trainer.n_gpus_per_node=1 trainer.total_training_steps=2 trainer.save_freq=-1 \
    trainer.test_freq=-1 trainer.val_before_train=False \
    2>&1 | tee "$OUT/verl_check.log"

grep -q "step:2" "$OUT/verl_check.log" && echo "PASS: two SaEI steps" || { echo "FAIL: no step 2"; exit 1; }
