#!/usr/bin/env bash
# SaEI GRPO on geo3k with Qwen2.5-VL-7B-Instruct, verl 0.9.1 + vLLM, one 8-GPU node.
#   pip install 'saei-fast[verl]' vllm     # the verl plugin registers itself at `import verl`
#   python3 examples/data_preprocess/geo3k.py --local_save_dir ~/data/geo3k   (verl's repo)
# The paper's set-up: rollout n = 6 clean + 6 adversarial, alpha 2/255, one step, middle third
# of the token entropies, lr 1e-6, no KL, vision tower frozen.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${DATA:-$HOME/data/geo3k}"
MODEL="${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}"

python3 -m verl.trainer.main_ppo \
    --config-path="$HERE" --config-name=qwen2_5_vl_7b_geo3k_saei_trainer \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=128 \
    data.max_prompt_length=1024 \
    data.max_response_length=2048 \
    data.image_key=images \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.freeze_vision_tower=True \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=12 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.rollout.val_kwargs.n=1 \
    actor_rollout_ref.rollout.agent.default_agent_loop=saei_agent \
    actor_rollout_ref.rollout.agent.num_workers=8 \
    trainer.v1.trainer_mode=saei_sync \
    trainer.critic_warmup=0 \
    trainer.logger='["console"]' \
    trainer.project_name=saei_verl \
    trainer.experiment_name=qwen2_5_vl_7b_geo3k_saei \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.save_freq=50 \
    trainer.test_freq=10 \
    trainer.total_epochs=15 "$@"
