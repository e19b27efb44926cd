"""The fused loss and the fused head of SaEIGRPOTrainer under DDP, in one of 2 CPU
processes (gloo), run by tests/test_trl_ddp_fused.py through
``saei_fast.tools.demo.processes.launch``.

Usage: ``python -m trl_ddp_worker OUT`` under ``torch.distributed.run`` (with tests/ on
``PYTHONPATH``). Each rank prepares the trainer's model as the training loop does
(accelerate's DDP wrapper, with the trainer's ``find_unused_parameters``) and, on its own
inputs, takes the parameter gradients of:

- ``fused_loss``: TRL's ``_compute_loss`` with ``saei_fused_loss=True`` through the DDP
  wrapper (every call checks the fused value against TRL's), and ``trl_loss``: the same
  with TRL's head;
- ``fused_head``: a loss-like pass of ``_get_per_token_logps_and_entropies`` with
  ``saei_fused_head=True`` through the wrapper, and ``trl_head``: the same with TRL's head;
- ``fused_lora`` / ``trl_lora``: the fused loss and TRL's through DDP for a LoRA (peft)
  policy;
- ``local_*``: TRL's head on the unwrapped model, outside DDP (this rank's own gradient,
  not all-reduced).

It saves them, with the number of fused calls, to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import peft
import torch
from test_trl_fused_head import loss_inputs as head_inputs
from test_trl_fused_loss import loss_inputs, trainer_for
from trl_helpers import Rewards, make_config

import saei_fast.integrations.shared.fused_head as fused_head
import saei_fast.integrations.shared.fused_loss as fused_loss
from saei_fast.integrations.trl import SaEIGRPOTrainer
from saei_fast.tools.demo.model import demo_model, demo_processor
from saei_fast.tools.demo.processes import close_process_group
from saei_fast.tools.demo.task import colour_examples, task_words, to_dataset


def counted(module, name: str) -> list:
    calls, original = [], getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, counting)
    return calls


def gradients(model: torch.nn.Module, run) -> dict[str, torch.Tensor]:
    """``model``'s (the unwrapped module's) parameter gradients after ``run().backward()``."""
    model.zero_grad(set_to_none=True)
    run().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def record_gradients(out: str) -> None:
    """Every rank's gradients, saved to ``out``."""
    torch.set_num_threads(1)
    processor = demo_processor(task_words())
    examples = colour_examples(2, seed=3)
    base = demo_model(processor, hidden_size=32, seed=0)  # the same weights on every rank
    rank = int(os.environ["RANK"])  # torch.distributed.run's; the group starts with the trainer
    loss_calls = counted(fused_loss, "linear_token_loss")
    head_calls = counted(fused_head, "linear_logprobs_and_entropy")
    record = {}

    # The fused loss: a KL term and old log-probs, so that clipping and KL both act.
    trainer = trainer_for(
        copy.deepcopy(base), processor, examples, out, beta=0.04, saei_fused_loss=True
    )
    wrapped = trainer.accelerator.prepare_model(trainer.model)
    record["wrapper"] = type(wrapped).__name__
    record["find_unused_parameters"] = getattr(wrapped, "find_unused_parameters", None)
    # Each rank its own rows, so that the all-reduce changes every gradient.
    inputs = loss_inputs(base, processor, examples, old=True, ref=True, seed=rank)
    record["fused_loss"] = gradients(trainer.model, lambda: trainer._compute_loss(wrapped, inputs))
    record["loss_calls"] = len(loss_calls)
    trainer._saei_fused_loss = trainer._saei_fused_head = False
    record["trl_loss"] = gradients(trainer.model, lambda: trainer._compute_loss(wrapped, inputs))
    record["local_loss"] = gradients(
        trainer.model, lambda: trainer._compute_loss(trainer.model, inputs)
    )

    # The fused head in a loss-like pass (log-probs and entropies both carry gradient).
    batch = head_inputs(base, processor, examples, seed=10 + rank)

    def head_pass(model):
        def run():
            logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
                model, compute_entropy=True, **batch
            )
            weights = torch.linspace(-1, 1, logps.shape[1], dtype=logps.dtype)
            return (logps * weights + 0.5 * entropies).sum()

        return run

    trainer._saei_fused_head = True
    record["fused_head"] = gradients(trainer.model, head_pass(wrapped))
    record["head_calls"] = len(head_calls)
    trainer._saei_fused_head = False
    record["trl_head"] = gradients(trainer.model, head_pass(wrapped))
    record["local_head"] = gradients(trainer.model, head_pass(trainer.model))

    # A LoRA policy (random adapters, so that both factors get gradients): DDP wraps the
    # peft model, and only the adapters train.
    lora = SaEIGRPOTrainer(
        model=copy.deepcopy(base),
        reward_funcs=Rewards(),
        args=make_config(out, saei_fused_loss=True, beta=0.0),
        train_dataset=to_dataset(examples),
        processing_class=processor,
        peft_config=peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    lora.current_gradient_accumulation_steps = 1
    lora.model.train()
    wrapped = lora.accelerator.prepare_model(lora.model)
    calls_before = len(loss_calls)
    record["fused_lora"] = gradients(lora.model, lambda: lora._compute_loss(wrapped, inputs))
    record["lora_calls"] = len(loss_calls) - calls_before
    lora._saei_fused_loss = lora._saei_fused_head = False
    record["trl_lora"] = gradients(lora.model, lambda: lora._compute_loss(wrapped, inputs))
    record["local_lora"] = gradients(lora.model, lambda: lora._compute_loss(lora.model, inputs))

    torch.save(record, Path(out, f"rank{rank}.pt"))


def main(out: str) -> None:
    record_gradients(out)  # its trainers and DDP wrappers are freed when it returns...
    close_process_group()  # ...before the process group goes (see close_process_group)


if __name__ == "__main__":
    main(sys.argv[1])
