"""The supervised warm start every arm of a seed begins from, cached on disk.

GRPO from an untrained model starts at maximum entropy, where an image perturbation barely
changes anything and every answer is equally likely; a short supervised phase (teacher
forcing on the training answers, a random right answer per example) brings the tiny model
to partial accuracy and moderate entropy instead. The weights are cached under the cache
folder, keyed by everything that determines them (seed, recipe, model configuration,
vocabulary, training data, torch version), so a second run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import torch

from saei_fast.tools.demo.setup import Setup

CACHE_FORMAT = 1  # bump when the warm start's procedure changes


def warm_start(setup: Setup, seed: int, *, log=print) -> Path | None:
    """The cached warm-start weights of ``seed`` (trained first if not cached yet), or None
    when the recipe has no warm start."""
    recipe = setup.recipe
    if recipe.warmup_steps == 0:
        return None
    model = setup.make_model(seed)
    path = setup.cache_dir / f"warmup-seed{seed}-{_key(setup, seed, model)}.pt"
    if path.is_file():
        log(f"[seed {seed} warm-up] cached: {path}")
        return path
    started = time.perf_counter()
    losses = train_supervised(setup, model, seed, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a demo running at the same time never reads half a file.
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save({"state_dict": model.state_dict(), "losses": losses}, partial)
    os.replace(partial, path)
    seconds = time.perf_counter() - started
    log(f"[seed {seed} warm-up] done in {seconds:.0f} s, loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    return path


def load_warm_start(model: torch.nn.Module, path: Path | None) -> torch.nn.Module:
    """``model`` with the warm-start weights at ``path`` (unchanged for None)."""
    if path is not None:
        model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return model


def train_supervised(setup: Setup, model: torch.nn.Module, seed: int, *, log=print) -> list[float]:
    """``recipe.warmup_steps`` AdamW steps of answer-token cross-entropy; returns the losses."""
    from saei_fast.tools.demo.model import prompt_text

    recipe, processor = setup.recipe, setup.processor
    tokenizer = processor.tokenizer
    rng = random.Random(seed)
    order = list(range(len(setup.train)))
    rng.shuffle(order)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.warmup_lr)
    was_training = model.training
    model.train()
    losses, started = [], time.perf_counter()
    torch.manual_seed(seed)
    for step in range(1, recipe.warmup_steps + 1):
        first = (step - 1) * recipe.warmup_batch
        chunk = [setup.train[order[(first + i) % len(order)]] for i in range(recipe.warmup_batch)]
        # The answer and the end-of-turn token the policy must emit after it.
        targets = [f"{rng.choice(e.answers)} {tokenizer.eos_token}" for e in chunk]
        inputs = processor(
            images=[[e.image] for e in chunk],
            text=[
                prompt_text(processor, e.question) + t for e, t in zip(chunk, targets, strict=True)
            ],
            padding=True,
            return_tensors="pt",
        ).to(device)
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets]
        labels = _answer_labels(inputs["input_ids"], inputs["attention_mask"], lengths)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == recipe.warmup_steps:
            elapsed = time.perf_counter() - started
            log(
                f"[seed {seed} warm-up] step {step:>3}/{recipe.warmup_steps}  answer loss "
                f"{losses[-1]:.3f}  ({elapsed:.0f} s)"
            )
    model.train(was_training)
    return losses


def _answer_labels(input_ids: torch.Tensor, attention: torch.Tensor, lengths: list[int]):
    """``input_ids`` with -100 everywhere but the last ``lengths[i]`` real tokens of row i
    (the answer; works with left or right padding)."""
    after = attention.flip(1).cumsum(1).flip(1)  # real tokens at or after each position
    keep = attention.bool() & (after <= torch.tensor(lengths, device=after.device)[:, None])
    return input_ids.masked_fill(~keep, -100)


def _key(setup: Setup, seed: int, model: torch.nn.Module) -> str:
    """A digest of everything the warm-start weights depend on."""
    recipe = setup.recipe
    digest = hashlib.sha256()
    settings = {
        "format": CACHE_FORMAT,
        "seed": seed,
        "steps": recipe.warmup_steps,
        "batch": recipe.warmup_batch,
        "lr": recipe.warmup_lr,
        "model": setup.options.model,
        "config": model.config.to_json_string(use_diff=False),
        "vocab": sorted(setup.processor.tokenizer.get_vocab().items()),
        "torch": torch.__version__,
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for example in setup.train:
        digest.update(example.image.tobytes())
        digest.update(json.dumps([example.question, example.answers]).encode())
    return digest.hexdigest()[:16]
