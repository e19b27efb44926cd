"""Pieces the trainer tests that vary lengths, padding and micro-batches share: the loss
forward's entropies computed the plain way, a record of every ``generate`` call, of every
loss call and of every attack beside its naive objective."""

from __future__ import annotations

import torch

import saei_fast.integrations.trl.sampling as integration
from saei_fast.reference import entropy_reference, naive_attack_objective


@torch.no_grad()
def plain_entropies(model, inputs: dict, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (float64) of the next-token distribution at every completion position of a
    TRL loss batch (``prompt_ids`` / ``completion_ids`` and their masks, the image fields),
    from a plain forward of ``model`` over the full logits."""
    completion = inputs["completion_ids"]
    batch = {
        "input_ids": torch.cat([inputs["prompt_ids"], completion], 1),
        "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
        "pixel_values": inputs["pixel_values"],
        "image_grid_thw": inputs["image_grid_thw"],
    }
    if "mm_token_type_ids" in inputs:
        batch["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    logits = model(**batch).logits[:, -completion.shape[1] - 1 : -1]
    return entropy_reference(logits, temperature=temperature)


def trimmed(ids: torch.Tensor, eos: int) -> tuple[int, ...]:
    """A completion up to and including its first end token (all of it without one)."""
    ids = ids.tolist()
    return tuple(ids[: ids.index(eos) + 1] if eos in ids else ids)


def generate_rows_batch(generate_inputs: dict, completions: torch.Tensor, eos: int, pad: int):
    """The rows of one ``generate`` call as a model batch built from the call's own (padded)
    inputs: prompt + completion cut after its first end token, right-padded, and the bool
    completion mask ``[B, L]``."""
    prompt = generate_inputs["input_ids"]
    rows = [list(trimmed(row, eos)) for row in completions]
    width = max(map(len, rows))
    tail = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    real = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    batch = {
        "input_ids": torch.cat([prompt, tail], 1),
        "attention_mask": torch.cat([generate_inputs["attention_mask"], real], 1),
        "pixel_values": generate_inputs["pixel_values"],
        "image_grid_thw": generate_inputs["image_grid_thw"],
        "mm_token_type_ids": torch.cat(
            [generate_inputs["mm_token_type_ids"], torch.zeros_like(tail)], 1
        ),
    }
    mask = torch.cat([torch.zeros_like(prompt, dtype=torch.bool), real.bool()], 1)
    return batch, mask


class GenerateRecorder:
    """Records every ``generate`` call of ``model`` (this instance only): its tensor inputs
    and the completions it returned, after ``edit(call_index, output, prompt_width)`` when
    given (which may change the output in place)."""

    def __init__(self, model, edit=None) -> None:
        self.inputs: list[dict] = []
        self.completions: list[torch.Tensor] = []
        original = model.generate

        def generate(*args, **kwargs):
            output = original(*args, **kwargs).clone()
            prompt = kwargs["input_ids"].shape[1]
            if edit is not None:
                edit(len(self.completions), output, prompt)
            self.completions.append(output[:, prompt:].clone())
            self.inputs.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)})
            return output

        model.generate = generate


def record_loss_calls(trainer, temperature: float = 1.0) -> list[dict]:
    """Wraps ``trainer.compute_loss``: per call, the tensor inputs, the plain entropies of
    the loss batch at ``temperature`` (:func:`plain_entropies`, taken before the loss) and
    the loss."""
    records = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        record = {k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)}
        record["entropies"] = plain_entropies(trainer.model, inputs, temperature)
        loss = compute_loss(model, inputs, *args, **kwargs)
        record["loss"] = loss.detach().clone()
        records.append(record)
        return loss

    trainer.compute_loss = recording
    return records


def attack_beside_naive(recorder: GenerateRecorder, eos: int, pad: int, records: list):
    """A stand-in for ``integration.entropy_attack`` (to monkeypatch in) that runs the real
    attack and appends ``{"naive", "result", "mask"}`` to ``records``: ``naive`` is the
    naive full-logits objective of the rows of ``recorder``'s last generate call
    (:func:`generate_rows_batch`, mask ``mask``), with the model as the attack finds it."""
    original = integration.entropy_attack

    def attack(model, inputs, completion_mask, *, config, **kwargs):
        batch, mask = generate_rows_batch(recorder.inputs[-1], recorder.completions[-1], eos, pad)
        training = model.training
        model.eval()
        with torch.no_grad():
            naive, _ = naive_attack_objective(
                model, batch, mask, band=config.band, scope=config.scope,
                group_size=config.group_size, temperature=config.temperature,
            )  # fmt: skip
        model.train(training)
        result = original(model, inputs, completion_mask, config=config, **kwargs)
        records.append({"naive": float(naive), "result": result, "mask": mask})
        return result

    return attack
