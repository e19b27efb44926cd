"""``saei-fast demo``: vanilla GRPO and SaEI, same model, seed and data, side by side.

Both arms go through :class:`saei_fast.integrations.trl.SaEIGRPOTrainer` (vanilla is
``saei_enabled=False``), start from identical weights and see the same prompts in the same
order. Each is scored on held-out examples (greedy decoding, exact match) before training,
every ``eval_every`` steps and at the end. The output folder receives:

- ``metrics.json``: settings, every logged step of both arms, the held-out evaluations and
  the summary;
- ``metrics.csv``: the same steps, one row per (arm, step);
- ``entropy_reward.png``: policy entropy, training reward and held-out accuracy per step;
- ``summary.txt``: the summary printed at the end.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saei_fast.demo.options import ARMS, DemoOptions
from saei_fast.demo.task import (
    QUESTION,
    Example,
    chance_level,
    colour_examples,
    exact_answer_reward,
    load_jsonl,
    task_words,
    to_dataset,
)


@dataclass
class Recipe:
    """Training settings of one demo setup (the built-in tiny model, or a local VLM)."""

    learning_rate: float
    prompts_per_step: int
    num_generations: int
    max_completion_length: int
    lr_scheduler_type: str = "constant"
    temperature: float = 1.0
    extra: dict = field(default_factory=dict)


# The tiny model learns from scratch: a large step size decaying linearly to 0 (at a
# constant one, Adam keeps pushing a collapsed policy around on near-zero gradients),
# single-token answers, 8 prompts x 8 responses per step (SaEI: 4 clean + 4 adversarial).
TINY_RECIPE = Recipe(
    learning_rate=2e-3,
    prompts_per_step=8,
    num_generations=8,
    max_completion_length=1,
    lr_scheduler_type="linear",
)
# A pretrained VLM is fine-tuned: the usual GRPO step size and room for a short answer.
LOCAL_MODEL_RECIPE = Recipe(
    learning_rate=1e-6, prompts_per_step=2, num_generations=8, max_completion_length=32
)


@dataclass
class Setup:
    """Everything both arms share."""

    make_model: Callable[[], torch.nn.Module]
    processor: object
    train: list[Example]
    heldout: list[Example]
    chance: float
    recipe: Recipe
    description: str


def build_setup(options: DemoOptions) -> Setup:
    """The model factory, processor, data and recipe the options ask for."""
    from saei_fast.demo.model import demo_model, demo_processor, load_local_vlm

    if options.dataset is not None:
        examples = load_jsonl(options.dataset)
        held = max(1, min(options.eval_size, len(examples) // 5))
        generator = torch.Generator().manual_seed(options.seed)
        order = torch.randperm(len(examples), generator=generator).tolist()
        heldout = [examples[i] for i in order[:held]]
        train = [examples[i] for i in order[held:]]
        task = f"{Path(options.dataset).name} ({len(train)} train / {len(heldout)} held-out)"
    else:
        train = colour_examples(4096, seed=options.seed + 1)
        heldout = colour_examples(options.eval_size, seed=options.seed + 2)
        task = f'synthetic "{QUESTION}" ({len(heldout)} held-out images)'
    if not train:
        raise ValueError(f"--dataset {options.dataset} leaves no training examples")
    chance = chance_level([example.answer for example in train + heldout])

    if options.model is not None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model, processor = load_local_vlm(options.model, dtype=dtype)
        state = {key: value.detach().clone() for key, value in model.state_dict().items()}

        def make_model():  # identical start for both arms: reload the saved weights
            model.load_state_dict(state)
            return model

        return Setup(make_model, processor, train, heldout, chance, LOCAL_MODEL_RECIPE, task)

    words = task_words() if options.dataset is None else _words(train + heldout)
    processor = demo_processor(words)
    return Setup(
        lambda: demo_model(processor, seed=options.seed),
        processor,
        train,
        heldout,
        chance,
        TINY_RECIPE,
        task,
    )


def _words(examples: Sequence[Example]) -> list[str]:
    from saei_fast.demo.model import word_tokenizer

    text = " ".join(f"{example.question} {example.answer}" for example in examples)
    splitter = word_tokenizer([]).backend_tokenizer.pre_tokenizer
    return [word for word, _ in splitter.pre_tokenize_str(text)]


# -------------------------------------------------------------------------------------------
# Evaluation
# -------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_accuracy(
    model, processor, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int = 32
) -> float:
    """Exact-match accuracy of greedy answers on ``examples`` (model mode is restored)."""
    from saei_fast.demo.model import vision_token_ids

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    tokenizer = getattr(processor, "tokenizer", processor)
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            texts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, _text(e.question)]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for e in chunk
            ]
            inputs = processor(
                images=[[e.image] for e in chunk], text=texts, padding=True, return_tensors="pt"
            ).to(device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                suppress_tokens=vision_token_ids(model),
                pad_token_id=tokenizer.pad_token_id,
            )
            answers = processor.batch_decode(
                output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            correct += sum(a.strip() == e.answer for a, e in zip(answers, chunk, strict=True))
    finally:
        model.train(was_training)
    return correct / len(examples)


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


# -------------------------------------------------------------------------------------------
# One arm
# -------------------------------------------------------------------------------------------

# Logged values kept per step (TRL's names and SaEI's).
STEP_KEYS = (
    "reward",
    "entropy",
    "step_time",
    "saei/entropy_before",
    "saei/entropy_after",
    "saei/entropy_gain",
    "saei/reward_clean",
    "saei/reward_adv",
    "saei/attack_seconds",
    "saei/attack_peak_memory_mb",
)


def train_arm(arm: str, setup: Setup, options: DemoOptions, workdir: Path) -> dict:
    """Train one arm; returns its per-step log, held-out evaluations and wall time."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from saei_fast.demo.model import vision_token_ids
    from saei_fast.integrations.trl import SaEIConfig, SaEIGRPOTrainer

    recipe = setup.recipe
    torch.manual_seed(options.seed)
    model = setup.make_model()
    rows = recipe.prompts_per_step * recipe.num_generations
    args = SaEIConfig(
        output_dir=str(workdir / arm),
        saei_enabled=arm == "saei",
        saei_alpha=options.alpha,
        max_steps=options.steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        per_device_train_batch_size=rows,
        num_generations=recipe.num_generations,
        max_completion_length=recipe.max_completion_length,
        temperature=recipe.temperature,
        loss_type="grpo",
        beta=0.0,
        generation_kwargs={"suppress_tokens": vision_token_ids(model)},
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        seed=options.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **recipe.extra,
    )

    def evaluate() -> float:
        return heldout_accuracy(
            model, setup.processor, setup.heldout, max_new_tokens=recipe.max_completion_length
        )

    log = {"steps": [], "heldout": [{"step": 0, "accuracy": evaluate()}]}
    start = log["heldout"][0]["accuracy"]
    print(f"[{arm:<7}] step   0/{options.steps}  held-out accuracy {start:.2f}", flush=True)
    started = time.perf_counter()

    class Progress(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            if not logs or "reward" not in logs:
                return
            step = state.global_step
            entry = {"step": step, **{key: float(logs[key]) for key in STEP_KEYS if key in logs}}
            log["steps"].append(entry)
            if step % options.eval_every and step != options.steps:
                return
            log["heldout"].append({"step": step, "accuracy": evaluate()})
            recent = log["steps"][-options.eval_every :]
            reward = sum(e["reward"] for e in recent) / len(recent)
            entropy = sum(e["entropy"] for e in recent) / len(recent)
            elapsed = time.perf_counter() - started
            print(
                f"[{arm:<7}] step {step:>3}/{options.steps}  held-out accuracy "
                f"{log['heldout'][-1]['accuracy']:.2f}  train reward {reward:.2f}  policy entropy "
                f"{entropy:.2f}  ({elapsed / step:.1f} s/step)",
                flush=True,
            )

    trainer = SaEIGRPOTrainer(
        model=model,
        reward_funcs=exact_answer_reward,
        args=args,
        train_dataset=to_dataset(setup.train),
        processing_class=setup.processor,
        callbacks=[Progress()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    log["seconds"] = time.perf_counter() - started
    return log


# -------------------------------------------------------------------------------------------
# The whole demo
# -------------------------------------------------------------------------------------------


def run_demo(options: DemoOptions) -> dict:
    """Train every arm, write the output folder, print and return the summary."""
    _check_options(options)
    import transformers

    transformers.logging.set_verbosity_error()  # keep the progress lines readable
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    setup = build_setup(options)
    parameters = sum(p.numel() for p in setup.make_model().parameters())
    print(
        f"saei-fast demo: {setup.description}; {parameters / 1e3:.0f}k-parameter model, "
        f"chance {setup.chance:.2f}; {options.steps} steps per arm"
    )
    logs = {}
    threads = torch.get_num_threads()
    if options.model is None and not torch.cuda.is_available():
        # The tiny model's matrices are far too small to gain from intra-op threads, and on
        # a busy machine spinning OpenMP threads slow every op down several times over.
        torch.set_num_threads(1)
    # Nothing is checkpointed; the trainers get a scratch folder so that the output folder
    # holds only the results.
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
        # TRL warns once per run about settings the demo chose on purpose.
        warnings.filterwarnings("ignore", category=UserWarning, module="trl")
        # transformers deprecates TrainingArguments names that TRL still sets.
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        for arm in options.arms:
            logs[arm] = train_arm(arm, setup, options, Path(scratch))
    torch.set_num_threads(threads)
    summary = summarize(logs, setup, options, parameters)
    summary["total_seconds"] = time.perf_counter() - started
    text = summary_text(summary)
    _write_outputs(output_dir, options, setup, logs, summary, text)
    print(text)
    return summary


def _check_options(options: DemoOptions) -> None:
    for name in ("steps", "eval_every", "eval_size"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if not options.arms or any(arm not in ARMS for arm in options.arms):
        raise ValueError(f"arms must be a non-empty subset of {ARMS}, got {options.arms!r}")
    if not (
        isinstance(options.alpha, float) and math.isfinite(options.alpha) and options.alpha > 0
    ):
        raise ValueError(f"--alpha must be a float > 0, got {options.alpha!r}")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(logs: dict, setup: Setup, options: DemoOptions, parameters: int) -> dict:
    """Numbers of the summary: accuracy start/end, late reward, entropy early/late/mean."""
    window = max(1, min(10, options.steps // 4))
    # "Above chance" means beyond what a policy blind to the image can score (a uniform
    # guess, or always the held-out set's most frequent answer) by two standard errors on
    # this many examples, so that luck on a small set does not count.
    n = len(setup.heldout)
    blind = max(Counter(e.answer for e in setup.heldout).values()) / n
    base = max(setup.chance, blind)
    threshold = base + 2 * math.sqrt(base * (1 - base) / n)
    arms = {}
    for arm, log in logs.items():
        steps = log["steps"]
        entropy = [e["entropy"] for e in steps]
        reward = [e["reward"] for e in steps]
        arm_summary = {
            "heldout_accuracy_start": log["heldout"][0]["accuracy"],
            "heldout_accuracy_end": log["heldout"][-1]["accuracy"],
            "train_reward_last": _mean(reward[-window:]),
            "policy_entropy_first": _mean(entropy[:window]),
            "policy_entropy_last": _mean(entropy[-window:]),
            "policy_entropy_mean": _mean(entropy),
            "seconds": log["seconds"],
        }
        if arm == "saei":
            before = [e["saei/entropy_before"] for e in steps if "saei/entropy_before" in e]
            after = [e["saei/entropy_after"] for e in steps if "saei/entropy_after" in e]
            arm_summary.update(
                attack_entropy_before=_mean(before),
                attack_entropy_after=_mean(after),
                attack_seconds=_mean([e.get("saei/attack_seconds", 0.0) for e in steps]),
                attack_peak_memory_mb=max(
                    (e.get("saei/attack_peak_memory_mb", 0.0) for e in steps), default=0.0
                ),
                reward_clean=_mean([e["saei/reward_clean"] for e in steps]),
                reward_adv=_mean([e["saei/reward_adv"] for e in steps]),
            )
        arm_summary["above_chance"] = arm_summary["heldout_accuracy_end"] > threshold
        arms[arm] = arm_summary
    return {
        "task": setup.description,
        "model_parameters": parameters,
        "chance": setup.chance,
        "most_frequent_answer_accuracy": blind,
        "above_chance_threshold": threshold,
        "steps": options.steps,
        "window": window,
        "arms": arms,
    }


def summary_text(summary: dict) -> str:
    """The human-readable summary (also ``summary.txt``)."""
    window = summary["window"]
    lines = [
        f"saei-fast demo summary: {summary['task']}",
        f"{summary['steps']} steps per arm; chance accuracy {summary['chance']:.2f} (always "
        f"the most frequent held-out answer: {summary['most_frequent_answer_accuracy']:.2f}); "
        f"'last'/'first' average the last/first {window} steps",
        "",
        f"{'arm':<8} {'held-out acc':>15} {'train reward':>13} {'policy entropy (nats)':>27} "
        f"{'time':>7}",
        f"{'':<8} {'start -> end':>15} {'last':>13} {'first -> last  (mean)':>27}",
    ]
    for arm, s in summary["arms"].items():
        lines.append(
            f"{arm:<8} {s['heldout_accuracy_start']:>6.2f} -> {s['heldout_accuracy_end']:<5.2f} "
            f"{s['train_reward_last']:>13.2f} {s['policy_entropy_first']:>9.2f} -> "
            f"{s['policy_entropy_last']:<5.2f} ({s['policy_entropy_mean']:.2f}) "
            f"{s['seconds']:>6.0f}s"
        )
    saei = summary["arms"].get("saei")
    if saei:
        gain = saei["attack_entropy_after"] - saei["attack_entropy_before"]
        lines += [
            "",
            f"SaEI attack: band-selected entropy {saei['attack_entropy_before']:.3f} -> "
            f"{saei['attack_entropy_after']:.3f} nats on average (gain {gain:+.4f}); "
            f"{saei['attack_seconds']:.2f} s per step; extra peak memory "
            f"{saei['attack_peak_memory_mb']:.0f} MB",
            f"SaEI rewards over the run: clean rows {saei['reward_clean']:.2f}, adversarial rows "
            f"{saei['reward_adv']:.2f}",
        ]
    vanilla = summary["arms"].get("vanilla")
    if saei and vanilla:
        difference = saei["policy_entropy_mean"] - vanilla["policy_entropy_mean"]
        late = saei["policy_entropy_last"] - vanilla["policy_entropy_last"]
        lines.append(
            f"Policy entropy, SaEI minus vanilla: {difference:+.3f} nats over the run, {late:+.3f} "
            "over the last steps (one seed: a difference this size may be noise)"
        )
    verdict = ", ".join(
        f"{arm} {'yes' if s['above_chance'] else 'NO'}" for arm, s in summary["arms"].items()
    )
    lines.append(
        f"Held-out accuracy above chance at the end (> {summary['above_chance_threshold']:.2f}, "
        f"the better image-blind score + 2 standard errors): {verdict}"
    )
    lines.append(f"Total time {summary['total_seconds']:.0f} s")
    return "\n".join(lines)


def _write_outputs(output_dir, options, setup, logs, summary, text) -> None:
    record = {
        "options": asdict(options),
        "recipe": asdict(setup.recipe),
        "arms": logs,
        "summary": summary,
    }
    (output_dir / "metrics.json").write_text(json.dumps(record, indent=1))
    heldout = {(arm, e["step"]): e["accuracy"] for arm, log in logs.items() for e in log["heldout"]}
    with (output_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arm", "step", *STEP_KEYS, "heldout_accuracy"])
        for arm, log in logs.items():
            for entry in log["steps"]:
                writer.writerow(
                    [
                        arm,
                        entry["step"],
                        *(entry.get(key, "") for key in STEP_KEYS),
                        heldout.get((arm, entry["step"]), ""),
                    ]
                )
    plot(logs, setup.chance, output_dir / "entropy_reward.png")
    (output_dir / "summary.txt").write_text(text + "\n")


def plot(logs: dict, chance: float, path: Path) -> None:
    """Policy entropy, training reward (raw and smoothed) and held-out accuracy per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {"vanilla": "tab:blue", "saei": "tab:red"}
    for arm, log in logs.items():
        steps = [e["step"] for e in log["steps"]]
        colour = colours[arm]
        axes[0].plot(steps, [e["entropy"] for e in log["steps"]], color=colour, label=arm)
        reward = [e["reward"] for e in log["steps"]]
        axes[1].plot(steps, reward, color=colour, alpha=0.25)
        axes[1].plot(steps, _smooth(reward), color=colour, label=f"{arm} (moving mean of 5)")
        heldout = log["heldout"]
        axes[2].plot(
            [e["step"] for e in heldout],
            [e["accuracy"] for e in heldout],
            "o-",
            color=colour,
            label=arm,
        )
    for axis in axes[1:]:
        axis.axhline(chance, color="grey", linestyle="--", label=f"chance {chance:.2f}")
        axis.set_ylim(-0.02, 1.02)
    titles = (
        "policy entropy (nats, clean images)",
        "training reward",
        "held-out accuracy (greedy)",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _smooth(values: list[float], width: int = 5) -> list[float]:
    return [
        sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1])
        for i in range(len(values))
    ]
