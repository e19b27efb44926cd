"""Peak extra memory and time of one entropy attack on the CPU: ours vs the naive way.

Model: a random-weight Qwen2.5-VL-shaped model (Qwen's 151936-token vocabulary, text hidden
512 in 4 layers of 8 heads with a 2048 MLP, vision tower hidden 256 in 4 blocks), float32,
sdpa attention. Batch: one group of ``--rows`` responses to one 112x112 image (16 image
tokens), random prompts of 24-40 tokens, completions of ``--completion`` tokens.

- naive: ``model(**inputs).logits`` for every position, softmax entropy, the band by
  sorting, ``loss.backward()`` with the parameters requiring grad (as a trainer's policy
  has them), then the signed step from ``pixel_values.grad``.
- ours: ``saei_fast.entropy_attack`` (one group), and the same with ``micro_batch_size``.
- ``-ckpt`` variants of ours: the same with the model in training mode and Hugging Face's
  activation checkpointing on, as inside a trainer with ``gradient_checkpointing=True``
  (the attack keeps the checkpointing layers' training flag and puts the rest in eval mode).

Each provider runs in a fresh interpreter, so allocator reuse cannot hide memory; peak extra
memory is the RSS high-water mark above the RSS once the model and the batch exist (the
first call), time the median of the next ``--repeats`` calls.

    python bench/measure_attack_memory.py
"""

from __future__ import annotations

import argparse
import time

from saei_fast.memory import run_isolated

_WORKER = """
import json, sys, time, torch
import saei_fast
from saei_fast import AttackConfig, entropy_attack, pixels
from saei_fast.memory import peak_memory_of
from saei_fast.reference import naive_attack_objective
from saei_fast.tools.testing import (
    random_images, tiny_qwen2_5_vl, tiny_qwen_image_processor, vlm_batch,
)

provider, rows, completion, repeats, layers = sys.argv[1], *map(int, sys.argv[2:6])
model = tiny_qwen2_5_vl(
    hidden_size=512, num_layers=layers, num_heads=8, intermediate_size=2048, vocab_size=151936,
    vision_hidden_size=256, vision_depth=4, vision_num_heads=4,
)
if provider.endswith("-ckpt"):
    from saei_fast.integrations.shared.checkpointing import switch_checkpointing
    model.train()
    switch_checkpointing(model, True)
    provider = provider[: -len("-ckpt")]
processor = tiny_qwen_image_processor(max_side=112)
space = pixels.from_processor(processor)
batch = vlm_batch(
    model, processor, random_images(1, (112, 112)), group_size=rows,
    prompt_lengths=(24, 40), completion_lengths=(completion, completion),
)
inputs, mask = batch.inputs, batch.completion_mask
fields = space.image_batch_fields(inputs)
alpha = 2 / 255

if provider == "naive":
    def run():
        model.zero_grad(set_to_none=True)
        clean = inputs["pixel_values"]
        leaf = clean.detach().clone().requires_grad_(True)
        objective, _ = naive_attack_objective(
            model, {**inputs, "pixel_values": leaf}, mask, group_size=rows
        )
        objective.backward()
        group_grad = leaf.grad.reshape(rows, -1, clean.shape[1]).sum(0).repeat(rows, 1)
        adv = space.project(space.step(clean, group_grad, alpha, **fields), clean, **fields)
        return adv
else:
    micro = None if provider == "ours" else int(provider.split("-mb")[1])
    config = AttackConfig(alpha=alpha, group_size=rows, micro_batch_size=micro)
    def run():
        return entropy_attack(model, inputs, mask, space=space, config=config).pixel_values

peak = peak_memory_of(run)  # the first call: nothing reused yet
times = []
for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
times.sort()
tokens = int(inputs["input_ids"].numel())
print(json.dumps({
    "peak": peak, "median_s": times[len(times) // 2], "times": times,
    "length": int(inputs["input_ids"].shape[1]), "completion_tokens": int(mask.sum()),
    "params": sum(p.numel() for p in model.parameters()),
    "logits_bytes": tokens * model.config.text_config.vocab_size * 4,
    "threads": torch.get_num_threads(),
}))
"""


def measure(provider: str, rows: int, completion: int, repeats: int, layers: int) -> dict:
    return run_isolated(_WORKER, provider, rows, completion, repeats, layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4, help="text decoder layers")
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help="naive, ours, ours-mbK, each of ours with a -ckpt suffix (default: naive, ours, "
        "ours-mbK with --micro-batch K)",
    )
    args = parser.parse_args()

    providers = args.providers or ["naive", "ours", f"ours-mb{args.micro_batch}"]
    rows = {p: measure(p, args.rows, args.completion, args.repeats, args.layers) for p in providers}
    info = rows[providers[0]]
    print(
        f"# entropy attack, CPU, {args.layers} layers, {args.rows} rows x {info['length']} tokens "
        f"({info['completion_tokens']} completion), {info['params'] / 1e6:.0f}M params, "
        f"V=151936, float32, {info['threads']} threads, {time.strftime('%F')}"
    )
    print(
        f"# full logits of the naive way: {info['logits_bytes'] / 2**20:.0f} MiB; "
        f"parameters: {info['params'] * 4 / 2**20:.0f} MiB"
    )
    # Ratios against the first provider (naive by default).
    first = providers[0]
    print(
        f"| provider | median time (s) | peak extra memory (MiB) | time / {first} "
        f"| memory / {first} |"
    )
    print("|---|---|---|---|---|")
    base = rows[first]
    for provider, row in rows.items():
        print(
            f"| {provider} | {row['median_s']:.2f} | {row['peak'] / 2**20:.0f} | "
            f"{row['median_s'] / base['median_s']:.2f} | {row['peak'] / base['peak']:.3f} |"
        )


if __name__ == "__main__":
    main()
