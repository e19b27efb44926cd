"""The attack inside SaEIGRPOTrainer under the trainer's activation checkpointing: it
checkpoints when training does (TRL's generation context turns checkpointing off), gives
the same pixels as without, puts the model's checkpointing back (also on error), and
needs no more memory at its peak than a training micro-batch on the same rows.

Everything runs the real trainer methods (``_saei_attack``, TRL's ``_compute_loss``) with
Hugging Face's real checkpointing on a tiny Qwen2.5-VL.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from trl_attack_worker import (
    attack_arguments,
    build_trainer,
    enable_training_checkpointing,
)
from trl_helpers import make_config

import saei_fast.integrations.trl.sampling as integration
from saei_fast.integrations.shared.checkpointing import is_checkpointing
from saei_fast.memory import rss_tracking_available, run_isolated
from saei_fast.tools.demo.model import demo_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

TESTS = Path(__file__).parent


def first_layer(model) -> torch.nn.Module:
    return model.model.language_model.layers[0]


def attack_with(processor, examples, tmp_path, model, checkpointing: bool):
    """The trainer's attack on 2 prompts x 2 responses; what the first decoder layer saw."""
    trainer = build_trainer(
        model, processor, examples, tmp_path, gradient_checkpointing=checkpointing
    )
    if checkpointing:
        enable_training_checkpointing(trainer)
    calls = []

    layer = first_layer(model)

    # On the layer's attention, inside the checkpointed forward (Hugging Face keeps the
    # layer's own hooks outside it), before the recompute can stop early.
    def record(_module, _args):
        calls.append((torch.is_grad_enabled(), layer.gradient_checkpointing, layer.training))

    handle = layer.self_attn.register_forward_pre_hook(record)
    try:
        adversarial = trainer._saei_attack(*attack_arguments(model, processor, examples, 6))
    finally:
        handle.remove()
    return trainer, adversarial, calls


def test_attack_checkpoints_with_the_trainer_and_gives_the_same_pixels(
    processor, examples, tmp_path
):
    base = demo_model(processor, hidden_size=32, seed=0)
    plain_model, checked_model = copy.deepcopy(base), copy.deepcopy(base)
    _, plain, plain_calls = attack_with(processor, examples, tmp_path, plain_model, False)
    trainer, checked, checked_calls = attack_with(
        processor, examples, tmp_path, checked_model, True
    )

    # Without checkpointing: the gradient pass and the no-grad measurement, in eval mode.
    assert plain_calls == [(True, False, False), (False, False, False)]
    # With it, the layer checkpoints (Hugging Face does so in training mode only) and runs
    # once more, in the backward, to recompute its activations.
    assert len(checked_calls) == len(plain_calls) + 1
    assert all(checkpointing and training for _, checkpointing, training in checked_calls)
    # Back to the training loop's state once TRL's generation context has exited.
    assert is_checkpointing(trainer.model) and not is_checkpointing(plain_model)
    assert len(plain) == len(checked) == 2
    for ours, theirs in zip(checked, plain, strict=True):
        assert torch.equal(ours.fields["pixel_values"], theirs.fields["pixel_values"])
        assert [image.tobytes() for image in ours.pil] == [image.tobytes() for image in theirs.pil]


def test_checkpointing_is_restored_after_an_attack_error(
    processor, examples, tmp_path, monkeypatch
):
    model = demo_model(processor, hidden_size=32, seed=0)
    trainer = build_trainer(model, processor, examples, tmp_path, gradient_checkpointing=True)
    enable_training_checkpointing(trainer)
    seen = []

    def failing(model, *args, **kwargs):
        seen.append(is_checkpointing(model))
        raise RuntimeError("out of memory")

    monkeypatch.setattr(integration, "entropy_attack", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer._saei_attack(*attack_arguments(model, processor, examples, 4))
    assert seen == [True]  # on for the attack, inside TRL's generation context
    # TRL's context re-enables only on a normal exit; the trainer's guard did it here.
    assert is_checkpointing(trainer.model)


@pytest.mark.parametrize(
    ("rows", "n_clean", "setting", "expected"),
    [
        (8, 2, None, 8),  # whole groups: the training micro-batch's rows
        (8, 3, None, 6),  # rounded down to whole groups of 3
        (4, 6, None, 4),  # no group fits: the micro-batch's rows, band ranked first
        (8, 2, 3, 3),  # an explicit setting wins
    ],
)
def test_attack_passes_hold_a_training_micro_batchs_rows_at_most(
    tmp_path, rows, n_clean, setting, expected
):
    config = make_config(
        tmp_path,
        num_generations=2 * n_clean,
        saei_n_clean=n_clean,
        saei_n_adv=n_clean,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=2 * n_clean,  # whole groups per process
        saei_micro_batch_size=setting,
    )
    assert config.attack_config().micro_batch_size == expected


@pytest.mark.skipif(not rss_tracking_available(), reason="needs Linux's resettable RSS peak")
def test_attack_peak_memory_is_within_a_training_micro_batchs():
    """Peak extra memory (RSS high-water mark, each in a fresh interpreter) of TRL's loss
    forward and backward on a training micro-batch, and of the trainer's attack on the same
    4 rows, both with ``gradient_checkpointing=True`` (tests/trl_attack_worker.py). The
    control, the attack with the trainer's checkpointing off, keeps every layer's
    activations and must exceed the training step's: the model is sized so that the
    comparison can fail."""
    code = "from trl_attack_worker import main; main()"
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    kinds = ("train", "attack", "attack-unchecked")
    # Separate processes measure separately, so they may run side by side.
    with ThreadPoolExecutor(len(kinds)) as pool:
        runs = pool.map(lambda kind: run_isolated(code, kind, env={"PYTHONPATH": path}), kinds)
        peaks = {run["kind"]: run["peak"] for run in runs}
    mib = {kind: round(peak / 2**20) for kind, peak in peaks.items()}
    assert peaks["attack"] <= peaks["train"], mib
    assert peaks["attack-unchecked"] > peaks["train"], mib
