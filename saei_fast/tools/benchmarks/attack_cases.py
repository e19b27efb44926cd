"""The entropy attack on a random-weight Qwen2.5-VL-shaped model: ours vs the naive way.

Shape ``R x C``: one group of R responses to one image, C completion tokens each, with
Qwen's 151936-token vocabulary (what makes full logits expensive). Providers:

  naive     full logits from ``model(**inputs)``, softmax entropy, band by sorting,
            ``loss.backward()`` with the parameters requiring grad, then the signed step
  ours      saei_fast.entropy_attack on the whole group
  ours-mb2  the same with ``micro_batch_size=2``
  ours-ckpt, ours-mb2-ckpt
            the same with the model in training mode and Hugging Face's activation
            checkpointing on, as inside a trainer with ``gradient_checkpointing=True``
            (each provider's peak memory is in the run's ``extra_info``)

Needs transformers (the tiny model); its inputs are built once per shape.
"""

from __future__ import annotations

import torch

from saei_fast.tools.benchmarks.cases import CALL, OpBench, Provider

VOCAB = 151936
# (model size, image side) per device: a 0.5B-class text model on CUDA, a toy on a CPU.
_CUDA_MODEL = dict(hidden_size=896, num_layers=24, num_heads=14, intermediate_size=4864)
_CPU_MODEL = dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024)


def _build(dims, device, dtype) -> dict:
    from saei_fast import pixels
    from saei_fast.tools.testing import (
        random_images,
        tiny_qwen2_5_vl,
        tiny_qwen_image_processor,
        vlm_batch,
    )

    rows, completion = dims
    cuda = device.type == "cuda"
    image = 224 if cuda else 56
    model = tiny_qwen2_5_vl(
        **(_CUDA_MODEL if cuda else _CPU_MODEL),
        vocab_size=VOCAB,
        vision_hidden_size=256,
        vision_depth=4,
        vision_num_heads=4,
        dtype=dtype,
    ).to(device)
    processor = tiny_qwen_image_processor(max_side=image)
    batch = vlm_batch(
        model,
        processor,
        random_images(1, (image, image)),
        group_size=rows,
        prompt_lengths=(24, 40),
        completion_lengths=(completion, completion),
    )
    return {
        "model": model,
        "space": pixels.from_processor(processor),
        "inputs": {k: v.to(device) for k, v in batch.inputs.items()},
        "completion_mask": batch.completion_mask.to(device),
    }


def _naive(model, space, inputs, completion_mask):
    from saei_fast.reference import naive_attack_objective

    rows = completion_mask.shape[0]
    fields = space.image_batch_fields(inputs)
    clean = inputs["pixel_values"]
    model.zero_grad(set_to_none=True)
    leaf = clean.detach().clone().requires_grad_(True)
    objective, _ = naive_attack_objective(
        model, {**inputs, "pixel_values": leaf}, completion_mask, group_size=rows
    )
    objective.backward()
    group_grad = leaf.grad.reshape(rows, -1, clean.shape[1]).sum(0).repeat(rows, 1)
    return space.project(space.step(clean, group_grad, 2 / 255, **fields), clean, **fields)


def _ours(micro_batch_size, checkpointing=False):
    def make():
        from saei_fast import AttackConfig, entropy_attack
        from saei_fast.integrations.shared.checkpointing import checkpointing_state

        def fn(model, space, inputs, completion_mask):
            config = AttackConfig(
                group_size=completion_mask.shape[0], micro_batch_size=micro_batch_size
            )
            if not checkpointing:
                return entropy_attack(model, inputs, completion_mask, space=space, config=config)
            # Hugging Face checkpoints only in training mode; the model is shared by the
            # providers, so its mode and checkpointing are put back.
            training = model.training
            model.train()
            try:
                with checkpointing_state(model, True):
                    return entropy_attack(
                        model, inputs, completion_mask, space=space, config=config
                    )
            finally:
                model.train(training)

        return fn

    return make


PROVIDERS = {
    p.name: p
    for p in (
        Provider("naive", lambda: _naive, module="transformers", note="full logits + param grads"),
        Provider("ours", _ours(None), kind="ours", module="transformers", note="whole group"),
        Provider("ours-mb2", _ours(2), kind="ours", module="transformers", note="micro-batch 2"),
        Provider(
            "ours-ckpt",
            _ours(None, checkpointing=True),
            kind="ours",
            module="transformers",
            note="whole group, activation checkpointing",
        ),
        Provider(
            "ours-mb2-ckpt",
            _ours(2, checkpointing=True),
            kind="ours",
            module="transformers",
            note="micro-batch 2, activation checkpointing",
        ),
    )
}


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    if device.type == "cuda":
        return [(8, 1024)]  # a GRPO group of 8 responses of 1024 tokens
    # CPU: the larger shape is where activations, which checkpointing bounds, show.
    return [(2, 16)] if quick else [(4, 64), (8, 256)]


ATTACK = OpBench(
    name="attack",
    title="Entropy attack (objective + backward to pixels + signed step)",
    dims=("R", "C"),
    modes=(CALL,),
    providers=PROVIDERS,
    shapes=_shapes,
    dtype=lambda device: torch.bfloat16 if device.type == "cuda" else torch.float32,
    build=_build,
    # CPU --quick: one warm-up (where the peak is read) and one timed call; a call is seconds.
    repeats=lambda device, quick: (1, 5) if device.type == "cuda" else (1, 1 if quick else 3),
    describe=lambda inputs: {"completion_tokens": int(inputs["completion_mask"].sum())},
)
