"""Two SaEI steps of SaEIGRPOTrainer in one of several CPU processes (gloo), run by
tests/test_trl_multiprocess.py through ``saei_fast.tools.demo.processes.launch``.

Usage: ``python -m trl_multiprocess_worker OUT`` under ``torch.distributed.run``
(with tests/ on ``PYTHONPATH``). Each rank writes what it saw to ``OUT/rank<r>.json``: the
values it computed locally before any gathering (attack metrics, rewards, per-group gains),
the rows it generated, the advantages TRL gave them, the logs and a checksum of the final
weights. The test compares these across ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from transformers import TrainerCallback
from trl_helpers import GROUP, Rewards, make_config, no_stop_tokens

from saei_fast.integrations.trl import SaEIGRPOTrainer
from saei_fast.tools.demo.model import demo_model, demo_processor
from saei_fast.tools.demo.processes import close_process_group
from saei_fast.tools.demo.task import colour_examples, task_words, to_dataset


class RecordingTrainer(SaEIGRPOTrainer):
    """Keeps this process's values of every ``saei/*`` metric before they are gathered."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.local = {
            "metrics": {},
            "relative_gain": [],
            "attack_model": [],
            "rows": [],
            "fused_loss": [],
            "attack_checkpointing": [],
        }

    def _saei_log(self, name, value):
        self.local["metrics"].setdefault(name, []).append(float(value))
        super()._saei_log(name, value)

    def _saei_log_attack(self, result):
        relative = result.group_entropy_after / result.group_entropy_before - 1.0
        self.local["relative_gain"] += relative.tolist()
        super()._saei_log_attack(result)

    def _saei_attack(self, *args, **kwargs):
        self.local["attack_model"].append(type(self.model_wrapped).__name__)
        # The first decoder layer, through a peft wrapper too.
        layer = next(m for m in self.model.modules() if type(m).__name__.endswith("DecoderLayer"))
        checkpointed = []

        # Inside the layer's checkpointed forward: does the attack's gradient pass checkpoint?
        def record(_module, _args):
            checkpointed.append(
                torch.is_grad_enabled() and layer.gradient_checkpointing and layer.training
            )

        handle = layer.self_attn.register_forward_pre_hook(record)
        try:
            return super()._saei_attack(*args, **kwargs)
        finally:
            handle.remove()
            self.local["attack_checkpointing"].append(any(checkpointed))

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        # The fused loss ran and passed its value check (it raises otherwise).
        self.local["fused_loss"].append(self._saei_fused_loss and loss.requires_grad)
        return loss

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.local["rows"].append(
            {
                "image": [_digest(row["image"]) for row in inputs],
                "advantages": output["advantages"].tolist(),
                "is_adversarial": output["saei_is_adversarial"].tolist(),
            }
        )
        return output


class KeepLogs(TrainerCallback):
    def __init__(self) -> None:
        self.logs = []

    def on_log(self, _args, _state, _control, logs=None, **_):
        if logs and "loss" in logs:
            self.logs.append({k: v for k, v in logs.items() if isinstance(v, int | float)})


def _digest(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()[:12]


LORA = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])


def train_and_record(out: str, policy: str) -> None:
    """Two SaEI steps of a full (``policy="full"``) or LoRA (``"lora"``) policy; this rank's
    record saved to ``out``."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    processor = demo_processor(task_words())
    model = demo_model(processor, hidden_size=32, seed=0)  # the same weights on every rank
    config = make_config(
        out,
        # One group per process per step: rewards and advantages must be gathered.
        per_device_train_batch_size=GROUP,
        generation_kwargs={"suppress_tokens": no_stop_tokens(model, processor)},
        # What large runs use: the fused loss through DDP, and activation checkpointing,
        # which the attack must apply too.
        saei_fused_loss=True,
        gradient_checkpointing=True,
    )
    rewards, logs = Rewards(), KeepLogs()
    trainer = RecordingTrainer(
        model=model,
        reward_funcs=rewards,
        args=config,
        train_dataset=to_dataset(colour_examples(8, seed=3)),
        processing_class=processor,
        callbacks=[logs],
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
        if policy == "lora"
        else None,
    )
    trainer.train()
    # LoRA's B factors start at zero: nonzero after training means the adapters trained.
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    weights = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
    record = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "local": trainer.local,
        "rewards": rewards.calls,
        "logs": logs.logs,
        "weights_sum": float(weights.double().sum()),
        "weights_abs_sum": float(weights.double().abs().sum()),
        "lora_b_abs_sum": sum(float(p.detach().double().abs().sum()) for p in lora_b),
        "lora_b_count": len(lora_b),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def main(out: str, policy: str = "full") -> None:
    train_and_record(out, policy)  # its trainer and DDP wrapper are freed when it returns...
    close_process_group()  # ...before the process group goes (see close_process_group)


if __name__ == "__main__":
    main(*sys.argv[1:])
