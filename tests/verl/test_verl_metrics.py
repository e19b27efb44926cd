"""The ``saei/`` metrics: from the rows' extra fields (as the agent loop writes them) and
rewards, and through the SaEI trainer's ``_compute_metrics``.

TransferQueue (verl's row store) runs as Ray actors beside verl's GPU trainer; here its
``kv_batch_get`` returns the rows as verl writes them (``list_of_dict_to_tensordict``, what
verl's TQ agent loop puts), so the trainer's reading code runs on verl's own row layout.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from saei_fast.integrations.verl import trainer as saei_trainer
from saei_fast.integrations.verl.metrics import group_fields, step_metrics


def _rows():
    """Two groups of 2 clean + 2 adversarial rows; the first adversarial row of each group
    carries the group's attack numbers."""
    results = [
        {
            "entropy_before": 2.0,
            "entropy_after": 2.5,
            "num_selected": 10,
            "seconds": 0.5,
            "peak_memory_bytes": 2**20,
        },
        {
            "entropy_before": 4.0,
            "entropy_after": 3.0,
            "num_selected": 6,
            "seconds": 0.25,
            "peak_memory_bytes": 3 * 2**20,
        },
    ]
    rows, rewards = [], []
    for result, group_rewards in zip(results, ([1, 0, 1, 1], [0, 0, 0, 1]), strict=True):
        for role, reward in enumerate(group_rewards):
            fields = {"saei_adversarial": role >= 2, "turn_scores": []}
            if role == 2:
                fields.update(group_fields(result))
            rows.append(fields)
            rewards.append(float(reward))
    return rows, rewards


EXPECTED = {
    "saei/reward_clean": 0.25,  # rewards 1, 0, 0, 0
    "saei/reward_adv": 0.75,  # rewards 1, 1, 0, 1
    "saei/entropy_before": 3.0,
    "saei/entropy_after": 2.75,
    "saei/entropy_gain": -0.25,
    "saei/entropy_gain_relative": (0.25 + -0.25) / 2,  # median of 2.5/2-1 and 3/4-1
    "saei/gain_negative_fraction": 0.5,
    "saei/selected_tokens": 16.0,
    "saei/attack_seconds": 0.75,
    "saei/attack_peak_memory_mb": 3.0,
}


def test_step_metrics():
    rows, rewards = _rows()
    assert step_metrics(rows, rewards) == pytest.approx(EXPECTED)


def test_groups_without_selected_tokens_have_no_relative_gain():
    rows, rewards = _rows()
    rows[2]["saei_entropy_before"] = rows[2]["saei_entropy_after"] = 0.0
    metrics = step_metrics(rows, rewards)
    assert metrics["saei/entropy_gain_relative"] == pytest.approx(-0.25)
    assert metrics["saei/gain_negative_fraction"] == 1.0
    assert all(math.isfinite(value) for value in metrics.values())


def test_random_perturbation_logs_rewards_only():
    rows = [{"saei_adversarial": flag} for flag in (False, True)]
    assert step_metrics(rows, [1.0, 0.0]) == {"saei/reward_clean": 1.0, "saei/reward_adv": 0.0}


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="must match"):
        step_metrics([{}], [1.0, 2.0])


def test_the_trainer_adds_the_metrics_to_verls(monkeypatch):
    rows, rewards = _rows()
    rows.append({"saei_adversarial": True})  # a padding row verl added: left out
    rewards.append(100.0)
    lengths = [3, 5, 2, 4, 1, 6, 3, 2, 2]
    stored = [
        {
            "extra_fields": fields,
            # verl's token-level scores: the reward on the last response token
            "rm_scores": torch.cat([torch.zeros(length - 1), torch.tensor([reward])]),
        }
        for fields, reward, length in zip(rows, rewards, lengths, strict=True)
    ]
    keys = [f"uid_{n}" for n in range(len(stored))]
    batch = SimpleNamespace(
        keys=keys,
        partition_id="train",
        tags=[{"is_padding": False}] * 8 + [{"is_padding": True}],
    )

    def kv_batch_get(*, keys, partition_id, select_fields):
        assert partition_id == "train" and keys == batch.keys
        table = list_of_dict_to_tensordict(stored)
        return table.select(*select_fields)

    def verl_compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        metrics["training/global_step"] = global_steps

    monkeypatch.setattr(saei_trainer.tq, "kv_batch_get", kv_batch_get)
    monkeypatch.setattr(PPOTrainerSync, "_compute_metrics", verl_compute_metrics)
    metrics = {}
    trainer = object.__new__(saei_trainer.SaEITrainer)  # the method reads no trainer state
    trainer._compute_metrics(batch, metrics, {}, 7, 0)
    assert metrics.pop("training/global_step") == 7
    assert metrics == pytest.approx(EXPECTED)
