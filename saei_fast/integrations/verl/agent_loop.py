"""``saei_agent``: verl's single-turn agent loop with SaEI's clean and adversarial rows.

verl runs one agent loop per response; the ``n = n_clean + n_adv`` responses of a prompt
share its ``uid`` and run as coroutines of one agent-loop worker process (the v1 manager
runs a prompt's sessions together; the legacy manager gets whole groups when
``data.train_batch_size`` is a multiple of the agent-loop workers, checked at start-up).
Rows of a uid meet in a per-process :class:`_Group`:

1. rows ``0 .. n_clean - 1`` (``session_id``, or arrival order in the legacy manager)
   generate from the clean image, as ``SingleTurnAgentLoop`` does;
2. the first adversarial row waits for the clean responses and asks the attack client for
   the group's adversarial image: ``perturbation: entropy`` runs
   :func:`saei_fast.entropy_attack` on the actor (``saei_attack`` worker method,
   :mod:`saei_fast.integrations.verl.worker`) and turns its pixel values into an exact uint8
   PIL image with the processor's pixel space; ``perturbation: random`` takes the same step
   with random signs (NoisyRollout-style control), without the actor;
3. rows ``n_clean ..`` generate from that image.

Every row returns the CLEAN image in ``multi_modal_data``, so verl's
``_compute_multi_modal_inputs`` (and with it old/ref log-probs and the policy update) uses
the clean image for all rows, as SaEI prescribes. ``extra_fields["saei_adversarial"]`` marks
the adversarial rows; the group's first adversarial row also carries the attack's numbers
for the trainer's ``saei/`` metrics (:mod:`saei_fast.integrations.verl.metrics`). The
adversarial rows' ``rollout_log_probs`` come from the perturbed image, so the settings that
score rows with them (``algorithm.rollout_correction``) would read the perturbation as
engine mismatch: the start-up check
(:func:`saei_fast.integrations.verl.config.settings_from_trainer_config`) refuses them.

The actor sees the group's image as training will (verl's own ``_compute_multi_modal_inputs``
with the row's ``mm_processor_kwargs``) and the rows with verl's own position ids
(``_compute_position_ids``): the gradient is that of the model the update trains.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import torch
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopBase,
    AgentLoopOutput,
    AgentLoopWorker,
)
from verl.utils.profiler import simple_timer

from saei_fast import pixels
from saei_fast.attack import AttackConfig
from saei_fast.integrations.shared.rows import model_batch
from saei_fast.integrations.verl.client import get_attack_client
from saei_fast.integrations.verl.config import SaEISettings
from saei_fast.integrations.verl.metrics import group_fields

logger = logging.getLogger("saei_fast.integrations.verl")


class _Group:
    """The rows of one uid in this process: clean responses in, one adversarial image out."""

    def __init__(self, n_clean: int, group_size: int) -> None:
        self.n_clean, self.group_size = n_clean, group_size
        self.arrivals = 0
        self.finished = 0
        self.clean: dict[int, list[int]] = {}
        self.prompt_ids: list[int] | None = None
        self.images: list | None = None
        self.clean_done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.adversarial: asyncio.Task | None = None
        self.attack_result: dict | None = None

    def add_clean(self, role: int, prompt_ids: list[int], images: list, response: list[int]):
        self.prompt_ids, self.images = prompt_ids, images
        self.clean[role] = response
        if len(self.clean) == self.n_clean and not self.clean_done.done():
            self.clean_done.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.clean_done.done():
            self.clean_done.set_exception(
                RuntimeError(f"a clean row of this SaEI group failed: {error!r}")
            )


_GROUPS: dict[str, _Group] = {}


class SaEIAgentLoop(AgentLoopBase):
    """Single-turn agent loop sampling SaEI groups (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.settings = SaEISettings.from_mapping(self.config.saei)
        self.prompt_length = self.rollout_config.prompt_length
        self.response_length = self.rollout_config.response_length

    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs):
        uid = str(kwargs["uid"])
        group = _GROUPS.get(uid)
        if group is None:
            group = _GROUPS[uid] = _Group(self.settings.n_clean, self.settings.group_size)
        # The role is taken before the first await: tasks start in row order, so arrival
        # order is row order when the manager gives no session id.
        role = int(kwargs.get("session_id", group.arrivals))
        group.arrivals += 1
        try:
            return await self._run_row(group, role, sampling_params, int(priority), kwargs)
        except BaseException as error:
            if role < self.settings.n_clean:
                group.fail(error)
            raise
        finally:
            group.finished += 1
            if group.finished >= group.arrivals and group.arrivals >= self._rows_expected(group):
                _GROUPS.pop(uid, None)

    def _rows_expected(self, group: _Group) -> int:
        # Validation samples val_kwargs.n <= n_clean clean rows only.
        return group.group_size if group.adversarial is not None else group.arrivals

    async def _run_row(self, group, role, sampling_params, priority, kwargs) -> AgentLoopOutput:
        messages = list(kwargs["raw_prompt"])
        multi_modal_data = await self.process_multi_modal_info(messages)
        images = multi_modal_data.get("images")
        if not images:
            raise ValueError(
                "saei_agent needs at least one image in every prompt (SaEI perturbs images)"
            )
        if multi_modal_data.get("videos") or multi_modal_data.get("audios"):
            raise ValueError("saei_agent supports image prompts only (no video or audio)")
        self._assert_mm_supported(True)
        mm_processor_kwargs = self._get_mm_processor_kwargs(None)
        prompt_ids = await self.ct_build_initial_tokens(messages, images=images, mm_inputs_out={})

        adversarial = role >= self.settings.n_clean
        metrics: dict = {}
        if adversarial:
            if group.adversarial is None:
                group.adversarial = asyncio.ensure_future(
                    self._attack(group, kwargs["uid"], mm_processor_kwargs)
                )
            generation_images = await asyncio.shield(group.adversarial)
        else:
            generation_images = images
        with simple_timer("generate_sequences", metrics):
            request_id = (
                f"det-{priority}-{role}"
                if getattr(self.rollout_config, "full_determinism", False)
                else uuid4().hex
            )
            output = await self.server_manager.generate(
                request_id=request_id,
                prompt_ids=prompt_ids,
                sampling_params=sampling_params,
                image_data=generation_images,
                mm_processor_kwargs=mm_processor_kwargs,
                priority=priority,
            )
        metrics.setdefault(
            "num_preempted", output.num_preempted if output.num_preempted is not None else -1
        )
        if not adversarial:
            group.add_clean(role, list(prompt_ids), images, list(output.token_ids))

        merge_result, response_mask, response_logprobs = await self.ct_merge_assistant_token(
            prompt_ids,
            output.token_ids,
            [],
            [] if output.log_probs else None,
            assistant_logprobs=output.log_probs if output.log_probs else None,
        )
        response_ids = merge_result.token_ids[-len(response_mask) :] if response_mask else []
        prompt_ids = merge_result.token_ids[: len(merge_result.token_ids) - len(response_mask)]
        result = AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response_ids[: self.response_length],
            response_mask=response_mask[: self.response_length],
            response_logprobs=response_logprobs[: self.response_length]
            if response_logprobs
            else None,
            multi_modal_data=multi_modal_data,  # the CLEAN image, for every row
            mm_processor_kwargs=mm_processor_kwargs,
            num_turns=2,
            metrics=metrics,
            extra_fields=dict(output.extra_fields),
        )
        result.extra_fields.update(
            {"turn_scores": [], "tool_rewards": [], "saei_adversarial": adversarial}
        )
        if role == self.settings.n_clean and group.attack_result is not None:
            # The group's attack numbers, once per group, for the trainer's saei/ metrics.
            result.extra_fields.update(group_fields(group.attack_result))
        return result

    # ---- the adversarial image of a group ---------------------------------------------------

    async def _attack(self, group: _Group, uid: str, mm_processor_kwargs: dict) -> list:
        await group.clean_done
        image_inputs = self._image_inputs(group, mm_processor_kwargs)
        space = pixels.from_processor(self.processor)
        fields = {key: image_inputs[key] for key in space.image_fields if key in image_inputs}
        clean = image_inputs["pixel_values"].float()
        if self.settings.perturbation == "random":
            adversarial = random_step(space, clean, self.settings, seed_text=uid, **fields)
        else:
            batch = self._group_batch(group, image_inputs)
            results = await get_attack_client(self.config).attack(
                [batch], space=space, config=self.attack_config()
            )
            group.attack_result = results[0]
            adversarial = results[0]["pixel_values"].to(clean.dtype)
        return space.to_pil(adversarial, **fields)

    def attack_config(self) -> AttackConfig:
        """Entropies at the sampling temperature, as the engine samples."""
        s = self.settings
        return AttackConfig(
            alpha=s.alpha,
            steps=s.steps,
            eps=s.eps,
            band=s.band,
            scope=s.scope,
            temperature=float(self.rollout_config.temperature),
            micro_batch_size=s.micro_batch_size,
        )

    def _image_inputs(self, group: _Group, mm_processor_kwargs: dict) -> dict:
        """The group's image as the actor sees it in training: verl's own
        ``_compute_multi_modal_inputs`` (the processor on the row's text and images, with the
        row's ``mm_processor_kwargs``), run on the prompt."""
        output = SimpleNamespace(
            multi_modal_data={"images": group.images}, mm_processor_kwargs=mm_processor_kwargs
        )
        prompt = torch.tensor([group.prompt_ids], dtype=torch.long)
        return AgentLoopWorker._compute_multi_modal_inputs(self, output, prompt)

    def _group_batch(self, group: _Group, image_inputs: dict) -> dict:
        """The model batch of the group's clean rows (one copy of the image per row), with
        the position ids verl computes for each row (``_compute_position_ids``: text
        positions, then multimodal RoPE's three axes, ``[4, B, L]``; ``[B, L]`` for models
        without multimodal RoPE)."""
        roles = sorted(group.clean)
        image_fields = {
            key: value
            for key, value in image_inputs.items()
            if key not in ("mm_token_type_ids", "images_seqlens")
        }
        pad = self.tokenizer.pad_token_id
        batch, completion_mask = model_batch(
            [group.prompt_ids] * len(roles),
            [group.clean[role] for role in roles],
            [dict(image_fields) for _ in roles],
            pad_token_id=pad if pad is not None else 0,
            device=torch.device("cpu"),
        )
        positions = [
            AgentLoopWorker._compute_position_ids(
                self, input_ids[None], attention_mask[None], dict(image_inputs)
            )[0]
            for input_ids, attention_mask in zip(
                batch["input_ids"], batch["attention_mask"], strict=True
            )
        ]
        # Rows [4, L] (or [L]) stacked as verl's engine stacks them: [4, B, L] (or [B, L]).
        stacked = torch.stack(positions)
        batch["position_ids"] = stacked.transpose(0, 1) if stacked.dim() == 3 else stacked
        batch["completion_mask"] = completion_mask
        batch["image_rows"] = int(image_inputs["pixel_values"].shape[0])
        return batch


def random_step(space, clean: torch.Tensor, settings: SaEISettings, *, seed_text: str, **fields):
    """``steps`` steps of ``alpha`` with random signs (the control arm), projected like the
    attack's; seeded from the uid so a rerun of a prompt gets the same image."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    adversarial = clean
    for _ in range(settings.steps):
        direction = torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
        moved = space.step(adversarial, direction, settings.alpha, **fields)
        adversarial = space.project(moved, clean, settings.eps, **fields)
    return adversarial
