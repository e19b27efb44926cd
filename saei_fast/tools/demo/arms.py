"""One arm of one seed: GRPO through :class:`saei_fast.integrations.trl.SaEIGRPOTrainer`.

The three arms differ only in how the G responses to a prompt are sampled:

- ``vanilla``: all G from the clean image (``saei_enabled=False``);
- ``saei``: G/2 from the clean image, G/2 from the entropy attack's image;
- ``control``: G/2 from the clean image, G/2 from an image moved by a random-sign step of the
  same L-inf size (``saei_perturbation="random"``).

Everything else is shared per seed: the warm-start weights, the order of the prompts (TRL's
sampler is seeded by ``seed``) and the sampling seeds of the held-out evaluations, which run
before the first step, every ``eval_every`` steps and after the last.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

# The module, not its functions: rank / world_size / barrier are looked up at each call, so a
# test can stand in for them.
from saei_fast.tools.demo import processes
from saei_fast.tools.demo.evaluate import evaluate
from saei_fast.tools.demo.setup import Setup
from saei_fast.tools.demo.task import answer_reward, to_dataset
from saei_fast.tools.demo.warmup import load_warm_start


def train_arm(
    setup: Setup, seed: int, arm: str, warm: Path | None, scratch: Path, *, log=print
) -> dict:
    """Train ``arm`` from the warm start of ``seed``; returns every logged step (all numeric
    values TRL and SaEI log), the held-out evaluations and the wall time."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from saei_fast.integrations.trl import SaEIGRPOTrainer

    recipe = setup.recipe
    torch.manual_seed(seed)
    model = load_warm_start(setup.make_model(seed), warm)
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # where the trainer puts it
    args = arm_config(setup, seed, arm, scratch / f"seed{seed}-{arm}", model)
    tag = f"[seed {seed} {arm:<7}]"

    record = {"seed": seed, "arm": arm, "steps": [], "evals": []}

    def held_out(step: int) -> str:
        """Evaluate at ``step`` (rank 0 only) and return the progress text ("" elsewhere)."""
        metrics = held_out_metrics(setup, seed, model, step)
        if metrics is None:
            return ""
        record["evals"].append(metrics)
        return _eval_text(metrics, recipe.samples)

    text = held_out(0)
    log(f"{tag} step   0/{recipe.steps}  {text}")
    started = time.perf_counter()

    class Progress(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            if not logs or "reward" not in logs:
                return
            step = state.global_step
            values = {k: float(v) for k, v in logs.items() if _is_number(v)}
            record["steps"].append({"step": step, **values})
            if step % recipe.eval_every and step != recipe.steps:
                return
            text = held_out(step)
            elapsed = time.perf_counter() - started
            log(
                f"{tag} step {step:>3}/{recipe.steps}  {text}  train reward "
                f"{values['reward']:.2f}  ({elapsed / step:.2f} s/step)"
            )

    trainer = SaEIGRPOTrainer(
        model=model,
        reward_funcs=answer_reward,
        args=args,
        # The prompts the run uses (TRL shuffles them by seed); no need to encode more.
        train_dataset=to_dataset(setup.train[: recipe.steps * recipe.prompts_per_step]),
        processing_class=setup.processor,
        callbacks=[Progress()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    record["seconds"] = time.perf_counter() - started
    return record


def held_out_metrics(
    setup: Setup, seed: int, model: torch.nn.Module, step: int
) -> dict[str, float] | None:
    """The held-out evaluation of ``model`` at ``step``: ``{"step": step, **metrics}`` (see
    :mod:`saei_fast.tools.demo.evaluate`).

    With ``--num-processes N`` every process holds the same weights and only rank 0's
    records are kept, so rank 0 alone evaluates (the others get None and wait for it at a
    barrier). Skipping the evaluation changes nothing else on the other ranks: it samples
    from its own seeded generator and restores the global random state and the model's
    mode, so every process trains exactly as if it had evaluated.
    """
    recipe = setup.recipe
    metrics = None
    if processes.rank() == 0:
        # The same sampling seed for every arm at a given step: paired evaluations.
        values = evaluate(
            model,
            setup.processor,
            setup.heldout,
            samples=recipe.samples,
            temperature=recipe.temperature,
            max_new_tokens=recipe.max_completion_length,
            seed=1_000_003 * seed + step,
        )
        metrics = {"step": step, **values}
    processes.barrier()
    return metrics


def arm_config(setup: Setup, seed: int, arm: str, output_dir: Path, model: torch.nn.Module):
    """The :class:`SaEIConfig` of ``arm``: identical for all arms but the SaEI fields."""
    from saei_fast.integrations.trl import SaEIConfig
    from saei_fast.tools.demo.model import vision_token_ids

    recipe = setup.recipe
    cuda = torch.cuda.is_available()
    # With --num-processes N each process samples its share of a step's prompts (whole
    # groups): a step sees the same prompts as with one process.
    prompts_per_process = recipe.prompts_per_step // processes.world_size()
    return SaEIConfig(
        output_dir=str(output_dir),
        saei_enabled=arm != "vanilla",
        saei_perturbation="random" if arm == "control" else "entropy",
        saei_alpha=setup.options.alpha,
        max_steps=recipe.steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=prompts_per_process * recipe.num_generations,
        num_generations=recipe.num_generations,
        max_completion_length=recipe.max_completion_length,
        temperature=recipe.temperature,
        loss_type="grpo",
        beta=0.0,
        generation_kwargs={"suppress_tokens": vision_token_ids(model)},
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        seed=seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _eval_text(metrics: dict, samples: int) -> str:
    return (
        f"held-out: sampled acc {metrics['accuracy']:.2f}  pass@{samples} "
        f"{metrics['pass_at_k']:.2f}  entropy {metrics['entropy']:.3f}"
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
