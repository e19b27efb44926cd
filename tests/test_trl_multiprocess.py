"""SaEIGRPOTrainer in 2 CPU processes (gloo, DDP): two SaEI steps of a tiny Qwen2.5-VL, one
whole group per process per step, with ``gradient_checkpointing=True`` and
``saei_fused_loss=True``, launched the way ``saei-fast demo --num-processes 2`` launches
(``torch.distributed.run`` underneath).

Each rank writes the values it computed before any gathering (tests/trl_multiprocess_worker.py);
the checks: every rank attacks through its DDP-wrapped policy, rows of a group stay on one
process, advantages are those of each whole group's rewards (TRL gathers rewards from every
process, normalises per group and hands each process its slice), and every logged ``saei/*``
metric is the mean over ranks of the local values (a median / fraction over all groups for
the per-group ones).

FSDP is refused at construction (tests/test_trl_parallel.py), and could not run here anyway:
accelerate (1.15) turns a trainer's FSDP settings into FSDP only for
accelerator device types (MULTI_GPU, NPU, XPU, ...); with ``use_cpu=True`` the state stays
MULTI_CPU and the model is wrapped in DDP, so no CPU run can exercise it.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import torch
from trl_helpers import GROUP, N_CLEAN

import saei_fast
from saei_fast.tools.demo.model import demo_model, demo_processor
from saei_fast.tools.demo.processes import launch
from saei_fast.tools.demo.task import task_words

TESTS = Path(__file__).parent
STEPS = 2
# Metrics each rank logs through SaEIGRPOTrainer._saei_log, one value per step.
PER_PROCESS = (
    "entropy_before",
    "entropy_after",
    "entropy_gain",
    "selected_tokens",
    "attack_peak_memory_mb",
    "attack_seconds",
    "distinct_clean",
    "distinct_adv",
)


def _train_two_processes(out: Path, policy: str) -> list[dict]:
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    launch(
        "trl_multiprocess_worker",
        [str(out), policy],
        2,
        timeout=600,
        env={**os.environ, "PYTHONPATH": path},
    )
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _train_two_processes(tmp_path_factory.mktemp("two-processes"), "full")


def test_a_lora_policy_trains_through_ddp_with_checkpointing_and_the_fused_loss(
    tmp_path_factory,
):
    """The same two steps with a LoRA policy (peft): DDP wraps the peft model, the attack
    reads through the adapters with the trainer's checkpointing, the fused loss trains the
    adapters, and every rank ends with the same adapters."""
    ranks = _train_two_processes(tmp_path_factory.mktemp("two-processes-lora"), "lora")
    for rank, record in enumerate(ranks):
        assert record["rank"] == rank and record["world_size"] == 2
        assert record["local"]["attack_model"] == ["DistributedDataParallel"] * STEPS
        assert record["local"]["attack_checkpointing"] == [True] * STEPS
        assert record["local"]["fused_loss"] == [True] * STEPS
        assert record["lora_b_count"] > 0 and record["lora_b_abs_sum"] > 0
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]
    assert ranks[0]["lora_b_abs_sum"] == ranks[1]["lora_b_abs_sum"]


def test_every_rank_attacks_through_its_ddp_wrapped_policy(ranks):
    for rank, record in enumerate(ranks):
        assert record["rank"] == rank and record["world_size"] == 2
        assert record["distributed_type"] == "DistributedType.MULTI_CPU"
        assert record["local"]["attack_model"] == ["DistributedDataParallel"] * STEPS
        # gradient_checkpointing=True: the attack checkpoints too (TRL's generation
        # context turns it off), and the fused loss trains every micro-batch through DDP.
        assert record["local"]["attack_checkpointing"] == [True] * STEPS
        assert record["local"]["fused_loss"] == [True] * STEPS
    # DDP averaged the gradients: the ranks end with the same, updated weights.
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]
    assert ranks[0]["weights_abs_sum"] == ranks[1]["weights_abs_sum"]
    initial = demo_model(demo_processor(task_words()), hidden_size=32, seed=0)
    initial_abs = sum(float(p.detach().double().abs().sum()) for p in initial.parameters())
    assert ranks[0]["weights_abs_sum"] != pytest.approx(initial_abs, rel=1e-9, abs=0)


def test_each_process_samples_whole_groups(ranks):
    for step in range(STEPS):
        images = []
        for record in ranks:
            rows = record["local"]["rows"][step]
            assert len(rows["image"]) == GROUP and len(set(rows["image"])) == 1
            assert rows["is_adversarial"] == [False] * N_CLEAN + [True] * (GROUP - N_CLEAN)
            images.append(rows["image"][0])
        assert images[0] != images[1]  # the processes got different prompts


def test_advantages_are_each_whole_groups_after_gathering(ranks):
    for record in ranks:
        for step in range(STEPS):
            rewards = torch.tensor(record["rewards"][step], dtype=torch.float64)
            # TRL: (r - mean) / (std + 1e-4) per group of the gathered rewards.
            expected = saei_fast.group_advantages(rewards, GROUP, eps=1e-4)
            advantages = torch.tensor(record["local"]["rows"][step]["advantages"])
            torch.testing.assert_close(advantages, expected.float(), rtol=1e-5, atol=1e-6)


def test_logged_saei_metrics_are_means_over_ranks(ranks):
    logs = ranks[0]["logs"]
    assert len(logs) == STEPS
    for mine, theirs in zip(logs, ranks[1]["logs"], strict=True):
        saei = {key for key in mine if key.startswith("saei/")}
        assert saei >= {f"saei/{name}" for name in PER_PROCESS}
        # Every process logs the gathered values (step_time is each process's own).
        assert {key: mine[key] for key in saei} == {key: theirs[key] for key in saei}
    for step, logged in enumerate(logs):
        for name in PER_PROCESS:
            local = [record["local"]["metrics"][name][step] for record in ranks]
            assert logged[f"saei/{name}"] == pytest.approx(statistics.fmean(local), rel=1e-6)
        # One group per process and step.
        gains = [record["local"]["relative_gain"][step] for record in ranks]
        assert logged["saei/entropy_gain_relative"] == pytest.approx(statistics.median(gains))
        negative = sum(gain < 0 for gain in gains) / len(gains)
        assert logged["saei/gain_negative_fraction"] == pytest.approx(negative)
        clean, adv = [], []
        for record in ranks:
            flags = record["local"]["rows"][step]["is_adversarial"]
            for reward, is_adv in zip(record["rewards"][step], flags, strict=True):
                (adv if is_adv else clean).append(reward)
        assert logged["saei/reward_clean"] == pytest.approx(statistics.fmean(clean))
        assert logged["saei/reward_adv"] == pytest.approx(statistics.fmean(adv))
