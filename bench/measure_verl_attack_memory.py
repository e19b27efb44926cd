"""Peak memory of the verl actor's attack against a training step on the same rows (CPU).

The model is a random-weight Qwen2.5-VL patched by verl's ``apply_monkey_patch``
(``use_remove_padding=False``), fed as verl's engine feeds it (verl's position ids), with
Hugging Face gradient checkpointing as ``enable_gradient_checkpointing`` turns it on. Three
measurements on one group of ``--rows`` responses:

- training step: forward with the engine's inputs, log-probs of the response tokens from the
  logits (verl's non-fused path), backward into the parameters;
- attack: the worker method's body (``saei_attack_on``), checkpointing as in training;
- attack as before issue 23: the same with the checkpointing layers left in eval mode
  (verl's ``eval_mode``), so nothing is checkpointed.

Peak: the highest total of bytes held by PyTorch's CPU allocator between operators, from
``torch.profiler``'s memory records; parameter gradients are allocated beforehand, so the
training step's peak is its activations. See ``tests/verl/test_verl_attack_memory.py``.

    python bench/measure_verl_attack_memory.py --rows 6 --completion 256 --layers 8
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "verl"))

from _verl_models import peak_cpu_bytes, verl_patched, verl_position_ids
from verl import DataProto
from verl.utils.torch_functional import logprobs_from_logits

from saei_fast import pixels
from saei_fast.attack import AttackConfig
from saei_fast.integrations.verl import worker
from saei_fast.tools.testing import (
    random_images,
    tiny_qwen2_5_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()

    model = tiny_qwen2_5_vl(
        hidden_size=args.hidden, num_layers=args.layers, vocab_size=args.vocab, seed=0
    )
    processor = tiny_qwen_image_processor()
    batch = vlm_batch(
        model, processor, random_images(1, (56, 56), seed=1), group_size=args.rows, seed=1,
        completion_lengths=(args.completion, args.completion),
    )  # fmt: skip
    inputs = {key: value for key, value in batch.inputs.items() if key != "mm_token_type_ids"}
    inputs["position_ids"] = verl_position_ids(model, batch.inputs)
    group = {
        **inputs,
        "completion_mask": batch.completion_mask,
        "image_rows": inputs["pixel_values"].shape[0] // args.rows,
    }
    space = pixels.from_processor(processor)
    column = np.empty(1, dtype=object)
    column[:] = [group]
    data = DataProto.from_dict(
        non_tensors={"saei_group": column},
        meta_info={"saei_space": space, "saei_config": AttackConfig(), "saei_mode": "attack"},
    )

    def attack():
        model.eval()  # verl's eval_mode
        worker.saei_attack_on(model, data)

    def training_step():
        model.train()
        logits = model(**inputs, use_cache=False).logits
        log_probs = logprobs_from_logits(logits[:, :-1], inputs["input_ids"][:, 1:])
        mask = batch.completion_mask[:, 1:]
        (-(log_probs * mask).sum() / mask.sum()).backward()
        model.eval()

    rows = {}
    with verl_patched(model, use_remove_padding=False):
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for name, function in (
            ("training step, checkpointing on", training_step),
            ("attack, checkpointing on", attack),
        ):
            started = time.perf_counter()
            rows[name] = (peak_cpu_bytes(function), time.perf_counter() - started)
        # the worker without its checkpointing step: verl's eval_mode leaves no layer training
        no_checkpointing = mock.patch.object(
            worker, "checkpointing_as_in_training", lambda model: contextlib.nullcontext()
        )
        with no_checkpointing:
            started = time.perf_counter()
            rows["attack as before issue 23"] = (
                peak_cpu_bytes(attack),
                time.perf_counter() - started,
            )
    tokens = int(batch.completion_mask.sum())
    print(
        f"Qwen2.5-VL-shaped, {args.layers} layers of hidden {args.hidden}, vocabulary "
        f"{args.vocab}; {args.rows} rows of {inputs['input_ids'].shape[1]} tokens "
        f"({tokens} completion tokens); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| | peak (MiB) | time with profiler (s) |\n|---|---|---|")
    for name, (peak, seconds) in rows.items():
        print(f"| {name} | {peak / 2**20:.1f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
