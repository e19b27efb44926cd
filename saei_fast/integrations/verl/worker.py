"""The actor side of SaEI on verl: the band objective's pixel gradient on the FSDP actor.

:class:`SaEIActorRolloutRefWorker` is verl's ``ActorRolloutRefWorker`` plus one worker method,
``saei_attack``, registered with the actor mesh's data-parallel dispatch (the dispatch of
``compute_log_prob``). Its input is a ``DataProto`` with one row per prompt group: a
``non_tensor_batch["saei_group"]`` dict holding the model batch of the group's clean
responses (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ...,
``completion_mask``, ``image_rows``); ``meta_info`` carries the pixel space, the
:class:`saei_fast.AttackConfig` and the mode. Per group it returns (``saei_result``):

- ``mode="attack"``: :func:`saei_fast.entropy_attack` on the group, the adversarial
  ``pixel_values`` of one image (every row of a group shares it) and the objective before and
  after;
- ``mode="gradient"``: :func:`saei_fast.attack.pixel_gradient` summed over the group's rows
  (the gradient whose sign ``entropy_attack`` steps along).

The actor's parameters are frozen for the call and no parameter gradient is made
(``entropy_attack`` does that), rows are micro-batched by ``AttackConfig.micro_batch_size``,
and the module's train/eval mode is restored afterwards. Every rank receives the same
number of groups (the caller pads the call to a multiple of the ranks).

The attack calls the model the engine holds (patched by verl's ``apply_monkey_patch``) with
the inputs the engine's own forward passes: the rows' position ids as verl computed them
(the group batch carries them) and, with ``use_remove_padding``, the rows packed into one
(:mod:`saei_fast.integrations.verl.engine_model`); Ulysses sequence parallelism is refused.
Layers the engine gradient-checkpoints (``enable_gradient_checkpointing``) checkpoint in the
attack too, so its activation memory is bounded as the training step's is.

Groups marked ``saei_pad`` only fill a rank's share of a call (the dispatch splits rows
evenly): with FSDP2, or no sharding, every unit is gathered before the passes, so a rank may
run fewer passes than the others and skips them; with FSDP1 the decoder layers gather in
their hooks, every rank must run the same passes, and a padding group is computed and
dropped.

verl installs the worker through its trainer's resource-pool hook: the SaEI trainer
(:mod:`saei_fast.integrations.verl.trainer`) maps the actor role to this class in
``_init_resource_pool_mgr``, as verl's own ``PPOTrainerSeparateAsync`` does for its worker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from verl import DataProto
from verl.single_controller.base.decorator import make_nd_compute_dataproto_dispatch_fn, register
from verl.workers.engine_workers import ActorRolloutRefWorker

from saei_fast.attack import AttackConfig, entropy_attack, pixel_gradient
from saei_fast.integrations.verl.engine_model import EngineModel, check_engine
from saei_fast.pixels.base import PixelSpace

MODES = ("attack", "gradient")


def run_groups(
    model: torch.nn.Module,
    groups: Sequence[dict],
    *,
    space: PixelSpace,
    config: AttackConfig,
    mode: str,
    run_padding: bool = False,
) -> list[dict | None]:
    """Attack (or take the pixel gradient of) each group on ``model`` (a Hugging Face VLM,
    or the engine's model as :class:`~saei_fast.integrations.verl.engine_model.EngineModel`
    presents it).

    Every group is one call of the attack with ``group_size`` = its rows, so all rows of a
    group get one image; the result holds the first row's ``image_rows`` rows of
    ``pixel_values`` (one copy of the group's image), the attack's seconds and peak memory.
    A group marked ``saei_pad`` gives ``None`` (computed only when ``run_padding``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = next(model.parameters()).device
    results = []
    for group in groups:
        if group.get("saei_pad") and not run_padding:
            results.append(None)
            continue
        started = time.perf_counter()
        inputs = {
            key: value.to(device)
            for key, value in group.items()
            if key not in ("completion_mask", "image_rows", "saei_pad")
        }
        completion_mask = group["completion_mask"].to(device)
        rows, image_rows = completion_mask.shape[0], int(group["image_rows"])
        group_config = AttackConfig(
            **{**_config_fields(config), "group_size": rows, "measure_after": mode == "attack"}
        )
        if mode == "attack":
            result = entropy_attack(
                model, inputs, completion_mask, space=space, config=group_config
            )
            results.append(
                {
                    "pixel_values": result.pixel_values[:image_rows].detach().cpu(),
                    "entropy_before": result.entropy_before,
                    "entropy_after": result.entropy_after,
                    "num_selected": result.num_selected,
                    "peak_memory_bytes": result.peak_memory_bytes,
                    "seconds": time.perf_counter() - started,
                }
            )
        else:
            gradient = pixel_gradient(
                model, inputs, completion_mask, space=space, config=group_config
            )
            grad = gradient.grad.reshape(rows, image_rows, *gradient.grad.shape[1:]).sum(0)
            results.append(
                {
                    "grad": grad.detach().cpu(),
                    "objective": gradient.objective,
                    "num_selected": int(gradient.band_mask.sum()),
                }
            )
    return results


def _config_fields(config: AttackConfig) -> dict:
    return {name: getattr(config, name) for name in AttackConfig.__dataclass_fields__}


@contextlib.contextmanager
def restored_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode inside (no dropout in the attack), the module's own mode restored after."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for child, training in modes:
            child.training = training


@contextlib.contextmanager
def unwrapped_actor(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The HF model inside verl's FSDP wrapping, ready for the attack.

    FSDP2 (``fully_shard``): every FSDP unit is gathered once, in module order, and kept
    gathered through the whole call (no reshard after forward or backward), then resharded
    and its reshard settings restored. The attack's passes depend on the data (a chunk
    without selected tokens has no backward), so per-layer gathers in the hooks would run a
    different number of all-gathers on different ranks, and the ranks would wait on each
    other for ever; gathered up front, the hooks issue no collective at all. The cost is the
    full model's weights on every rank for the duration of the call.

    FSDP1: only the root unit (embeddings, final norm, head) is gathered
    (``summon_full_params(recurse=False)``; FSDP1 refuses a forward inside a recursive
    one), so the decoder layers still gather in their hooks and every rank must run the
    same passes.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(module, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
            yield module.module
        return
    units = [m for m in module.modules() if callable(getattr(m, "_get_fsdp_state", None))]
    if not units:
        yield module
        return
    # The settings set_reshard_after_forward/backward overwrite, to put them back as found.
    saved = []
    for unit in units:
        state = unit._get_fsdp_state()
        saved.append((state, state._auto_reshard_after_forward))
        for group in state._fsdp_param_groups:
            saved.append((group, group.post_forward_mesh_info, group.reshard_after_backward))
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.set_reshard_after_backward(False, recurse=False)
    try:
        for unit in units:
            unit.unshard()
        yield module
    finally:
        for item in saved:
            if len(item) == 2:
                item[0]._auto_reshard_after_forward = item[1]
            else:
                item[0].post_forward_mesh_info, item[0].reshard_after_backward = item[1:]
        for unit in units:
            unit.reshard()


@contextlib.contextmanager
def checkpointing_as_in_training(model: torch.nn.Module) -> Iterator[None]:
    """Layers set up to gradient-checkpoint (Hugging Face's ``gradient_checkpointing_enable``,
    which verl's engine calls for ``enable_gradient_checkpointing``) checkpoint inside, as in
    the training step.

    Hugging Face checkpoints a layer only while the layer itself is in training mode, and
    verl's ``eval_mode`` puts the whole module in eval mode; without this the attack's
    backward would keep every layer's activations. Only the checkpointing layers' own flag
    is set: their submodules (attention, dropout) stay in eval mode, so the function is the
    same; the flags are restored on exit.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [
        module
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing
    ]
    saved = [layer.training for layer in layers]
    try:
        for layer in layers:
            layer.training = True
        yield
    finally:
        for layer, training in zip(layers, saved, strict=True):
            layer.training = training


def saei_attack_on(
    model: torch.nn.Module,
    data: DataProto,
    *,
    remove_padding: bool = False,
    run_padding: bool = False,
) -> DataProto:
    """The worker method's body on the engine's unwrapped model (shared by the FSDP worker
    and the tests): eval mode with the engine's checkpointing, inputs in the engine's layout
    (``remove_padding``: verl's ``use_remove_padding``)."""
    meta = data.meta_info
    groups = list(data.non_tensor_batch["saei_group"])
    with restored_mode(model), checkpointing_as_in_training(model):
        results = run_groups(
            EngineModel(model, remove_padding=remove_padding),
            groups,
            space=meta["saei_space"],
            config=meta["saei_config"],
            mode=meta.get("saei_mode", "attack"),
            run_padding=run_padding,
        )
    column = np.empty(len(results), dtype=object)
    column[:] = results
    return DataProto.from_dict(non_tensors={"saei_result": column})


class SaEIActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's ``ActorRolloutRefWorker`` with the ``saei_attack`` worker method."""

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def saei_attack(self, data: DataProto) -> DataProto:
        engine = self.actor.engine
        remove_padding = check_engine(engine)  # refuses Ulysses SP before any work
        # eval_mode loads offloaded parameters onto the device (and offloads them again).
        with engine.eval_mode(), unwrapped_actor(engine.module) as model:
            return saei_attack_on(
                model,
                data,
                remove_padding=remove_padding,
                run_padding=_is_fsdp1(engine.module),
            )


def _is_fsdp1(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)
