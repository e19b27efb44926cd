"""Entropy attack on a random-weight Qwen2.5-VL-shaped model: ours vs the naive way.

- naive: full logits from ``model(**inputs)``, softmax entropy, band by sorting,
  ``loss.backward()`` with the parameters requiring grad, then the signed step.
- ours: ``saei_fast.entropy_attack`` on the whole group, and micro-batched.

``extra_info`` holds the peak extra memory of one call, measured in this process (allocator
reuse can hide some of it; ``bench/measure_attack_memory.py`` measures each provider in a
fresh interpreter for the figures in RESULTS.md).
"""

from __future__ import annotations

import functools

import pytest
import torch
from benchutil import DEVICE, record, run_benchmark

from saei_fast import AttackConfig, entropy_attack, pixels
from saei_fast.memory import peak_memory_of
from saei_fast.reference import naive_attack_objective
from saei_fast.testing import random_images, tiny_qwen2_5_vl, tiny_qwen_image_processor, vlm_batch

VOCAB = 151936  # Qwen's vocabulary: what makes full logits expensive
if DEVICE.type == "cuda":
    # A 0.5B-class text model, a group of 8 responses of 1024 tokens, bf16.
    MODEL = dict(hidden_size=896, num_layers=24, num_heads=14, intermediate_size=4864)
    ROWS, COMPLETION, IMAGE, DTYPE = 8, 1024, 224, torch.bfloat16
else:
    # Small enough that the file runs in a few minutes on 2 cores.
    MODEL = dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024)
    ROWS, COMPLETION, IMAGE, DTYPE = 4, 64, 56, torch.float32


@functools.cache
def _setup():
    model = tiny_qwen2_5_vl(
        **MODEL,
        vocab_size=VOCAB,
        vision_hidden_size=256,
        vision_depth=4,
        vision_num_heads=4,
        dtype=DTYPE,
    ).to(DEVICE)
    processor = tiny_qwen_image_processor(max_side=IMAGE)
    batch = vlm_batch(
        model,
        processor,
        random_images(1, (IMAGE, IMAGE)),
        group_size=ROWS,
        prompt_lengths=(24, 40),
        completion_lengths=(COMPLETION, COMPLETION),
    )
    inputs = {k: v.to(DEVICE) for k, v in batch.inputs.items()}
    return model, pixels.from_processor(processor), inputs, batch.completion_mask.to(DEVICE)


def _naive(model, space, inputs, mask):
    fields = space.image_batch_fields(inputs)
    clean = inputs["pixel_values"]

    def run():
        model.zero_grad(set_to_none=True)
        leaf = clean.detach().clone().requires_grad_(True)
        objective, _ = naive_attack_objective(
            model, {**inputs, "pixel_values": leaf}, mask, group_size=ROWS
        )
        objective.backward()
        group_grad = leaf.grad.reshape(ROWS, -1, clean.shape[1]).sum(0).repeat(ROWS, 1)
        return space.project(space.step(clean, group_grad, 2 / 255, **fields), clean, **fields)

    return run


def _ours(micro_batch_size):
    def make(model, space, inputs, mask):
        config = AttackConfig(group_size=ROWS, micro_batch_size=micro_batch_size)
        return lambda: entropy_attack(model, inputs, mask, space=space, config=config)

    return make


PROVIDERS = {"naive": _naive, "ours": _ours(None), "ours-mb2": _ours(2)}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_entropy_attack(benchmark, provider):
    model, space, inputs, mask = _setup()
    benchmark.group = f"entropy-attack {ROWS}x{inputs['input_ids'].shape[1]} V={VOCAB}"
    call = PROVIDERS[provider](model, space, inputs, mask)
    peak = peak_memory_of(call, DEVICE)
    run_benchmark(benchmark, call)
    record(
        benchmark,
        provider=provider,
        rows=ROWS,
        length=int(inputs["input_ids"].shape[1]),
        completion_tokens=int(mask.sum()),
        dtype=str(DTYPE),
        peak_extra_memory_bytes=peak,
    )
