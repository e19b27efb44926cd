"""The SaEI attack and a training micro-batch of SaEIGRPOTrainer on the same rows, for
tests/test_trl_attack_memory.py: the pieces both sides share, and ``main``, which measures
the peak extra memory of one of them in a fresh interpreter (``saei_fast.memory``).

Usage: ``python -c "from trl_attack_worker import main; main()" KIND`` with tests/ on
``PYTHONPATH``; KIND is ``train`` (TRL's loss forward and backward of one training
micro-batch, activation checkpointing on as the training loop turns it on), ``attack``
(the trainer's attack with ``gradient_checkpointing=True``) or ``attack-unchecked`` (the
attack with the trainer's checkpointing off, the control). Prints one JSON object.
"""

from __future__ import annotations

import json
import sys

import torch
from trl_helpers import Rewards, make_config, no_stop_tokens

from saei_fast.integrations.shared.checkpointing import switch_checkpointing
from saei_fast.integrations.shared.rows import RowImage, model_batch, split_rows
from saei_fast.integrations.trl import SaEIGRPOTrainer
from saei_fast.integrations.trl.sampling import _Completion
from saei_fast.tools.demo.model import demo_model, demo_processor, prompt_text
from saei_fast.tools.demo.task import colour_examples, task_words, to_dataset

# Rows of the measured micro-batch: 2 prompts x 2 clean responses, the training
# micro-batch's 4 rows. Long completions and deep, narrow layers: activations, which
# checkpointing bounds, dominate the parameters and their gradients.
PROMPTS, N_CLEAN = 2, 2
MEMORY_MODEL = dict(hidden_size=64, num_layers=16)
MEMORY_COMPLETION = 1024


def build_trainer(model, processor, examples, tmp_path, **overrides) -> SaEIGRPOTrainer:
    trainer = SaEIGRPOTrainer(
        model=model,
        reward_funcs=Rewards(),
        args=make_config(tmp_path, per_device_train_batch_size=PROMPTS * N_CLEAN, **overrides),
        train_dataset=to_dataset(examples),
        processing_class=processor,
    )
    trainer.model.train()
    return trainer


def attack_arguments(model, processor, examples, completion_length: int, seed: int = 0):
    """``_saei_attack``'s arguments for ``N_CLEAN`` random completions of
    ``completion_length`` ordinary words to each example: per-row prompts, images and
    completions, and the group size."""
    text = prompt_text(processor, examples[0].question)
    images = [[example.image] for example in examples]
    encoded = processor(text=[text] * len(examples), images=images, return_tensors="pt")
    fields = {
        "pixel_values": encoded["pixel_values"],
        "image_grid_thw": encoded["image_grid_thw"],
        "mm_token_type_ids": encoded["mm_token_type_ids"].tolist(),
    }
    per_prompt = split_rows(fields, images, len(examples))
    words = sorted(set(range(len(processor.tokenizer))) - set(no_stop_tokens(model, processor)))
    gen = torch.Generator().manual_seed(seed)
    prompts, rows, completions = [], [], []
    for index, example in enumerate(examples):
        for _ in range(N_CLEAN):
            prompts.append(encoded["input_ids"][index].tolist())
            rows.append(RowImage(pil=[example.image], fields=per_prompt[index]))
            picks = torch.randint(len(words), (completion_length,), generator=gen)
            completions.append(_Completion([words[i] for i in picks], None))
    return prompts, rows, completions, N_CLEAN


def loss_inputs(trainer, prompts, rows, completions, seed: int = 0) -> dict:
    """What TRL's ``_compute_loss`` receives for the same rows (``attack_arguments``)."""
    batch, completion_mask = model_batch(
        prompts,
        [c.ids for c in completions],
        [row.fields for row in rows],
        pad_token_id=trainer._tokenizer.pad_token_id,
        device=torch.device("cpu"),
    )
    width = max(len(c.ids) for c in completions)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    gen = torch.Generator().manual_seed(seed)
    return {
        "prompt_ids": ids[:, :-width],
        "prompt_mask": attention[:, :-width],
        "completion_ids": ids[:, -width:],
        "completion_mask": completion_mask[:, -width:].long(),
        "advantages": torch.randn(len(rows), generator=gen),
        "pixel_values": batch["pixel_values"],
        "image_grid_thw": batch["image_grid_thw"],
        "num_images": [1] * len(rows),
        "mm_token_type_ids": batch["mm_token_type_ids"],
        "num_items_in_batch": completion_mask.sum(),
    }


def enable_training_checkpointing(trainer) -> None:
    """Activation checkpointing on, as ``Trainer.train`` turns it on before the first step."""
    switch_checkpointing(trainer.model, True, trainer.args.gradient_checkpointing_kwargs)


def main() -> None:
    import tempfile

    from saei_fast.memory import peak_memory_of

    kind = sys.argv[1]
    torch.set_num_threads(1)
    processor = demo_processor(task_words())
    examples = colour_examples(PROMPTS, seed=3)
    model = demo_model(processor, seed=0, **MEMORY_MODEL)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(
            model, processor, examples, out, gradient_checkpointing=kind != "attack-unchecked"
        )
        arguments = attack_arguments(model, processor, examples, MEMORY_COMPLETION)
        if trainer.args.gradient_checkpointing:
            enable_training_checkpointing(trainer)
        if kind == "train":
            inputs = loss_inputs(trainer, *arguments[:3])
            trainer.current_gradient_accumulation_steps = 1

            def step():
                trainer._compute_loss(trainer.model, inputs).backward()

        else:

            def step():
                trainer._saei_attack(*arguments)

        peak = peak_memory_of(step)  # the first call: nothing reused from earlier work
    print(json.dumps({"kind": kind, "peak": peak}))


if __name__ == "__main__":
    main()
