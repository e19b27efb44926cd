"""SaEI inside TRL's GRPOTrainer, runnable on a CPU in about a minute: a tiny Qwen2.5-VL
(random weights, built from a config) learns to name the colours in synthetic images.

    python examples/trl_grpo_saei.py [--steps 2]

With a real model, swap the two marked lines for
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")
    processor = AutoProcessor.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")
and drop `use_cpu=True` / `bf16=False` on a GPU.
"""

import argparse

from datasets import Dataset

from saei_fast.integrations.trl import SaEIConfig, SaEIGRPOTrainer
from saei_fast.tools.demo.model import demo_model, demo_processor
from saei_fast.tools.demo.task import colour_examples, task_words

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--output-dir", default="saei-trl-example")
args = parser.parse_args()

processor = demo_processor(task_words())  # <- your AutoProcessor
model = demo_model(processor, hidden_size=32)  # <- your VLM

# TRL's conversational image format: a `prompt` conversation and an `image` column; every
# other column (here `answers`) reaches the reward functions as a keyword argument.
examples = colour_examples(16, seed=0)
dataset = Dataset.from_dict(
    {
        "prompt": [[{"role": "user", "content": e.question}] for e in examples],
        "image": [e.image for e in examples],
        "answers": [list(e.answers) for e in examples],
    }
)


def reward_fn(completions, answers, **kwargs):
    """1.0 when the answer is one of the right ones. TRL passes conversational completions
    as lists of messages; the text is in the last message's content."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(t.strip() in a) for t, a in zip(texts, answers, strict=True)]


config = SaEIConfig(
    output_dir=args.output_dir,
    num_generations=4,  # a group: 2 clean + 2 adversarial responses per prompt
    saei_n_clean=2,
    saei_n_adv=2,
    saei_alpha=2 / 255,
    saei_band=[1 / 3, 2 / 3],
    saei_scope="group",
    per_device_train_batch_size=8,  # whole groups: a multiple of num_generations
    max_completion_length=8,
    max_steps=args.steps,
    learning_rate=1e-3,
    beta=0.0,
    use_cpu=True,  # remove on a GPU
    bf16=False,  # TRL defaults to bf16, which needs a GPU
    report_to="none",
    logging_steps=1,
    save_strategy="no",
)
trainer = SaEIGRPOTrainer(
    model=model,
    args=config,
    reward_funcs=reward_fn,
    train_dataset=dataset,
    processing_class=processor,
)
trainer.train()  # saei_enabled=False runs vanilla GRPO with the same script
for record in trainer.state.log_history:
    if "saei/entropy_before" in record:
        print(
            f"step {record['step']}: band entropy {record['saei/entropy_before']:.4f} -> "
            f"{record['saei/entropy_after']:.4f}, reward clean {record['saei/reward_clean']:.2f} "
            f"adversarial {record['saei/reward_adv']:.2f}"
        )
