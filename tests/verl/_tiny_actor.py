"""A tiny actor worker for the Ray tests: verl's worker machinery, saei-fast's worker method.

:class:`TinyActorWorker` is :class:`SaEIActorRolloutRefWorker` with ``init_model`` replaced:
instead of verl's FSDP engine (which needs an accelerator), each rank builds the same tiny
Qwen2.5-VL (the vocabulary of :mod:`_tiny_chat`, so it reads the agent loop's prompts) and
prepares it as verl's engine does on a CPU-capable path: verl's own ``apply_monkey_patch``
(``use_remove_padding=False``: packed rows need flash-attn), gradient checkpointing as
``enable_gradient_checkpointing`` turns it on, PyTorch FSDP2 over a gloo process group
(every decoder layer and the root, as verl's FSDP2 engine wraps them), and the ``actor``
dispatch mesh with one data-parallel rank per worker, which is what verl's engine registers
for pure FSDP. ``saei_attack``, its registered dispatch and the unwrapping of the sharded
model are the plugin's own code, unchanged. Lives in a module of its own (not a test file)
so that Ray's worker processes can import it.
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from verl.single_controller.base.decorator import Dispatch, register

from saei_fast.integrations.verl.worker import SaEIActorRolloutRefWorker

MODEL_SEED = 0


class _Engine:
    """What ``saei_attack`` reads of verl's FSDP engine: ``module``, ``eval_mode`` (which
    puts the module in eval mode, as verl's does), ``use_remove_padding`` and the Ulysses
    size."""

    use_remove_padding = False
    ulysses_sequence_parallel_size = 1

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.eval_mode_calls = 0

    @contextlib.contextmanager
    def eval_mode(self):
        self.eval_mode_calls += 1
        self.module.eval()
        yield


class TinyActorWorker(SaEIActorRolloutRefWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        if not dist.is_initialized():
            # verl's Worker put RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment.
            dist.init_process_group("gloo")
        torch.set_num_threads(1)  # two workers share the CI machine's cores
        import _tiny_chat
        from verl.models.transformers.monkey_patch import apply_monkey_patch

        model = _tiny_chat.model(_tiny_chat.processor(), seed=MODEL_SEED)
        apply_monkey_patch(model, use_remove_padding=False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        model.train()  # the worker method must restore it
        self.actor = SimpleNamespace(engine=_Engine(model))
        self.set_dispatch_collect(
            mesh_name="actor",
            dispatch_dp_rank={"actor": self.rank},
            collect_dp_rank={"actor": True},
        )

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def probe(self) -> dict:
        """What the tests check after a call: mode, sharding, gradients, engine use."""
        model = self.actor.engine.module
        return {
            "pid": os.getpid(),
            "rank": dist.get_rank(),
            "training": all(module.training for module in model.modules()),
            "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
            "requires_grad": all(p.requires_grad for p in model.parameters()),
            "no_grads": all(p.grad is None for p in model.parameters()),
            "eval_mode_calls": self.actor.engine.eval_mode_calls,
            "patched": type(model).forward.__module__,
        }
