"""SaEIGRPOTrainer with gradient accumulation: one generation of 8 rows, shuffled by TRL and
cut into two loss micro-batches of 4, through a real training step on a tiny Qwen2.5-VL.

The other trainer tests feed the whole generation batch to one loss forward, in generation
order. Here each micro-batch holds a shuffled half of the rows, so the clean / adversarial
flag must travel with its row, and ``saei/entropy_clean_rows`` / ``saei/entropy_adv_rows``
are the mean over micro-batches of each one's token mean. The arm of every row is read back
from what the two ``generate`` calls returned; entropies come from a plain forward.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from trl_helpers import GROUP, N_ADV, TRAINER_MARKS, ModelRecorder, make_trainer
from trl_variations import record_loss_calls

from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset

pytestmark = TRAINER_MARKS


def test_adversarial_flags_travel_with_shuffled_rows_into_micro_batches(
    processor, examples, tmp_path
):
    torch.manual_seed(0)
    model = demo_model(processor, hidden_size=32, seed=0)
    with torch.no_grad():  # spread the entropies (a random tiny model is near uniform)
        model.lm_head.weight.mul_(30.0)
    recorder = ModelRecorder(model)
    trainer = make_trainer(
        model,
        processor,
        to_dataset(examples),
        tmp_path,
        per_device_train_batch_size=GROUP,
        gradient_accumulation_steps=2,
        max_steps=1,
    )
    assert trainer.args.steps_per_generation == 2
    micro_batches = record_loss_calls(trainer)
    trainer.train()

    clean_call, adv_call = recorder.generate_calls
    expected = Counter(
        [(tuple(row.tolist()), False) for row in clean_call["completions"]]
        + [(tuple(row.tolist()), True) for row in adv_call["completions"]]
    )
    assert len(micro_batches) == 2
    got, values = Counter(), {"clean": [], "adv": []}
    for record in micro_batches:
        assert record["completion_ids"].shape[0] == GROUP
        assert record["completion_mask"].bool().all()  # full-length completions
        flags = record["saei_is_adversarial"].bool()
        for row, flag in zip(record["completion_ids"], flags, strict=True):
            got[(tuple(row.tolist()), bool(flag))] += 1
        for name, rows in (("clean", ~flags), ("adv", flags)):
            if rows.any():
                values[name].append(float(record["entropies"][rows].mean()))
    # Every row reached a micro-batch once, with the arm it was generated in.
    assert got == expected
    assert sum(n for (_, flag), n in got.items() if flag) == 2 * N_ADV
    (entry,) = [e for e in trainer.state.log_history if "reward" in e]
    for name in ("clean", "adv"):
        want = sum(values[name]) / len(values[name])
        assert entry[f"saei/entropy_{name}_rows"] == pytest.approx(want, rel=1e-5)
