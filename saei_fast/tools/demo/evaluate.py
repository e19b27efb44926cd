"""Held-out evaluation at the sampling temperature: sampled accuracy, pass@k, policy entropy.

Greedy accuracy ignores what SaEI acts on (the spread of the sampled answers), so every
held-out image gets ``k`` answers sampled as in training (same temperature, no top-k or
top-p, clean image) and the evaluation reports:

- ``accuracy``: the fraction of the sampled answers that are right;
- ``pass_at_k``: the fraction of images with at least one right answer among the ``k``;
- ``entropy``: the policy's mean per-token entropy (nats, at the sampling temperature) over
  the sampled answer tokens, end-of-turn token included, on the clean image;
- ``distinct``: the mean number of different answers per image.

The samples are drawn from a generator seeded by the caller, so two arms evaluated with the
same seed differ only by their weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saei_fast.ops import entropy
from saei_fast.tools.demo.task import Example, answer_reward


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    processor,
    examples: Sequence[Example],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    images_per_batch: int = 32,
) -> dict[str, float]:
    """Sampled metrics of ``model`` on ``examples`` (see the module docstring); the model's
    train/eval mode and the global random state are left as they were."""
    from saei_fast.tools.demo.model import prompt_text, vision_token_ids

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    rewards, entropy_sum, token_count, distinct = [], 0.0, 0, 0
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for first in range(0, len(examples), images_per_batch):
                chunk = examples[first : first + images_per_batch]
                inputs = processor(
                    images=[[e.image] for e in chunk],
                    text=[prompt_text(processor, e.question) for e in chunk],
                    padding=True,
                    padding_side="left",
                    return_tensors="pt",
                ).to(device)
                output = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=samples,
                    suppress_tokens=vision_token_ids(model),
                    pad_token_id=tokenizer.pad_token_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
                answers = processor.batch_decode(tokens, skip_special_tokens=True)
                expected = [e.answers for e in chunk for _ in range(samples)]
                rewards += answer_reward(answers, expected)
                for start in range(0, len(answers), samples):
                    distinct += len(set(answers[start : start + samples]))
                mask = _answer_mask(tokens, _end_ids(model, tokenizer))
                logits = torch.stack(output.logits, dim=1)[:, : tokens.shape[1]]
                values = entropy(logits.float(), temperature=temperature, mask=mask)
                entropy_sum += float(values.sum())
                token_count += int(mask.sum())
    finally:
        model.train(was_training)
    per_image = torch.tensor(rewards).view(len(examples), samples)
    return {
        "accuracy": float(per_image.mean()),
        "pass_at_k": float((per_image.max(dim=1).values > 0).double().mean()),
        "entropy": entropy_sum / max(token_count, 1),
        "distinct": distinct / len(examples),
    }


def _end_ids(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """The token ids that end generation (the model's generation config, else the
    tokenizer's end-of-sequence token)."""
    ids = model.generation_config.eos_token_id
    ids = tokenizer.eos_token_id if ids is None else ids
    return torch.tensor(ids if isinstance(ids, list) else [ids])


def _answer_mask(tokens: torch.Tensor, end_ids: torch.Tensor) -> torch.Tensor:
    """True on each row's generated tokens up to and including its first end token."""
    is_end = torch.isin(tokens, end_ids.to(tokens.device))
    ended_before = (is_end.long().cumsum(dim=1) - is_end.long()) > 0
    return ~ended_before
