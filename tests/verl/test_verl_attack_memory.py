"""The actor's attack checkpoints activations as the engine's training step does.

verl's engine turns on Hugging Face gradient checkpointing for
``enable_gradient_checkpointing`` (``gradient_checkpointing_enable(use_reentrant=False)``)
and its ``eval_mode`` puts the module in eval mode, where Hugging Face does not checkpoint.
On a tiny Qwen2.5-VL patched by verl's ``apply_monkey_patch``, fed as the engine feeds it,
the attack's peak memory must not exceed a training step's on the same rows (forward with
the engine's inputs, log-probs of the response tokens from the logits as verl's non-fused
path computes them, backward into the parameters), and the adversarial pixels must not
depend on checkpointing.

Peak memory: the highest total of bytes held by PyTorch's CPU allocator between operators,
from ``torch.profiler``'s per-operator memory records (allocations inside one operator that
it frees again are not seen). Parameter gradients are allocated before measuring, so the
training step's peak is its activations, as the attack's is.
"""

import numpy as np
import pytest
import torch
from _verl_models import peak_cpu_bytes, verl_patched, verl_position_ids
from verl import DataProto
from verl.utils.torch_functional import logprobs_from_logits

from saei_fast import pixels
from saei_fast.attack import AttackConfig
from saei_fast.integrations.verl.worker import saei_attack_on
from saei_fast.tools.testing import (
    random_images,
    tiny_qwen2_5_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)

ROWS = 4


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = tiny_qwen2_5_vl(hidden_size=128, num_layers=4, vocab_size=1024, seed=0)
    processor = tiny_qwen_image_processor()
    batch = vlm_batch(
        model,
        processor,
        random_images(1, (56, 56), seed=1),
        group_size=ROWS,
        completion_lengths=(60, 80),
        seed=1,
    )
    inputs = {key: value for key, value in batch.inputs.items() if key != "mm_token_type_ids"}
    inputs["position_ids"] = verl_position_ids(model, batch.inputs)
    group = {
        **inputs,
        "completion_mask": batch.completion_mask,
        "image_rows": inputs["pixel_values"].shape[0] // ROWS,
    }
    return model, pixels.from_processor(processor), inputs, batch.completion_mask, group


def _attack(model, space, group):
    column = np.empty(1, dtype=object)
    column[:] = [group]
    data = DataProto.from_dict(
        non_tensors={"saei_group": column},
        meta_info={"saei_space": space, "saei_config": AttackConfig(), "saei_mode": "attack"},
    )
    model.eval()  # what verl's eval_mode does before the worker method runs
    return saei_attack_on(model, data).non_tensor_batch["saei_result"][0]


def _training_step(model, inputs, completion_mask):
    model.train()
    logits = model(**inputs, use_cache=False).logits
    log_probs = logprobs_from_logits(logits[:, :-1], inputs["input_ids"][:, 1:])
    mask = completion_mask[:, 1:]
    (-(log_probs * mask).sum() / mask.sum()).backward()
    model.eval()


def test_attack_peak_within_the_training_steps_and_same_pixels(setup):
    model, space, inputs, completion_mask, group = setup
    with verl_patched(model, use_remove_padding=False):
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        plain = _attack(model, space, group)
        attack_plain = peak_cpu_bytes(lambda: _attack(model, space, group))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            checkpointed = _attack(model, space, group)
            attack_checkpointed = peak_cpu_bytes(lambda: _attack(model, space, group))
            training = peak_cpu_bytes(lambda: _training_step(model, inputs, completion_mask))
        finally:
            model.gradient_checkpointing_disable()
            for param in model.parameters():
                param.grad = None
    print(
        f"\npeak bytes: attack {attack_plain} without checkpointing, {attack_checkpointed} "
        f"with; training step {training} with"
    )
    assert torch.equal(checkpointed["pixel_values"], plain["pixel_values"])
    assert checkpointed["entropy_before"] == pytest.approx(plain["entropy_before"], rel=1e-6)
    assert attack_checkpointed <= training
    # the measurement tells the two apart: without checkpointing the attack holds more
    assert attack_plain > training
