"""Generation of the TRL integration: SaEI's replacement of ``_generate_single_turn``.

Every group of ``num_generations`` rows is sampled as SaEI prescribes (clean rows, the
attack on their responses, adversarial rows from the perturbed image) through
:func:`saei_fast.rollout.saei_rollout`, with TRL's own single-turn generation for each arm
and, with vLLM, the check of the prompt the engine reports (:mod:`.vllm_prompts`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import trl

from saei_fast.attack import entropy_attack
from saei_fast.integrations.shared.checkpointing import model_for_attack
from saei_fast.integrations.shared.rows import (
    RowImage,
    adversarial_images,
    merge_rows,
    model_batch,
    split_rows,
)
from saei_fast.integrations.trl.vllm_prompts import (
    ReportedPrompts,
    double_expansion_message,
    length_mismatches,
)
from saei_fast.rollout import saei_rollout


@dataclass
class _Completion:
    ids: list[int]
    logprobs: list[float] | None


class SaEISampling:
    """The generation hooks of :class:`~saei_fast.integrations.trl.trainer.SaEIGRPOTrainer`.

    A mixin placed before ``GRPOTrainer`` in the trainer's bases, so ``super()`` here is
    TRL's ``GRPOTrainer``; it uses the trainer's ``_saei_*`` attributes set in its
    ``__init__`` and its ``_saei_log``.
    """

    # ---- when SaEI samples ---------------------------------------------------------------

    def _saei_sampling(self) -> bool:
        return self.args.saei_enabled and self.model.training

    def _saei_generator(self) -> torch.Generator:
        """The random signs of ``saei_perturbation="random"``: reproducible from the seed,
        different at every step and on every process."""
        seed = (self.args.seed * 1_000_003 + self.state.global_step) * 65_537
        seed += self.accelerator.process_index
        return torch.Generator().manual_seed(seed % 2**63)

    # ---- generation ----------------------------------------------------------------------

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        self._saei_last_adversarial = None
        if not self._saei_sampling():
            return self._saei_backend_generate(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if images is None or any(not row for row in images):
            raise ValueError(
                "saei_enabled=True needs at least one image in every prompt (an 'image' or "
                "'images' column in the dataset)"
            )
        num_rows = len(prompt_ids)
        if num_rows % num_generations:
            raise ValueError(
                f"SaEI got {num_rows} rows to generate, not a multiple of num_generations "
                f"({num_generations})"
            )
        row_fields = split_rows(multimodal_fields, images, num_rows)
        clean = [
            RowImage(pil=list(images[row]), fields=row_fields[row])
            for row in range(0, num_rows, num_generations)
        ]
        prompts = [list(prompt_ids[row]) for row in range(0, num_rows, num_generations)]
        _check_groups(prompt_ids, row_fields, num_generations)

        rollout = saei_rollout(
            prompts,
            clean,
            n_clean=self.args.saei_n_clean,
            n_adv=self.args.saei_n_adv,
            generate=self._saei_generate,
            attack=self._saei_attack,
        )
        self._saei_last_adversarial = rollout.is_adversarial
        self._saei_log("attack_seconds", rollout.attack_seconds)
        completion_ids = [completion.ids for completion in rollout.completions]
        distinct_clean, distinct_adv = _distinct_per_group(
            completion_ids, rollout.is_adversarial.tolist(), rollout.group_size
        )
        self._saei_log("distinct_clean", distinct_clean)
        self._saei_log("distinct_adv", distinct_adv)
        logprobs = [completion.logprobs for completion in rollout.completions]
        return completion_ids, None if logprobs[0] is None else logprobs

    def _saei_generate(
        self, prompts: list, images: list[RowImage], copies: int
    ) -> list[_Completion]:
        """TRL's own single-turn generation for runs of ``copies`` identical rows."""
        completion_ids, logprobs = self._saei_backend_generate(
            prompts,
            [image.pil for image in images],
            merge_rows([image.fields for image in images]),
            copies,
        )
        logprobs = logprobs or [None] * len(completion_ids)
        return [
            _Completion(list(ids), lps) for ids, lps in zip(completion_ids, logprobs, strict=True)
        ]

    def _saei_backend_generate(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        """TRL's single-turn generation; with vLLM, checked against the prompt the engine
        reports (see :mod:`saei_fast.integrations.trl.vllm_prompts`)."""
        if not self.use_vllm:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        backend = self.vllm_generation
        if not isinstance(backend, ReportedPrompts):
            backend = self.vllm_generation = ReportedPrompts(backend)
        backend.reported = None
        output = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        mismatches = length_mismatches(prompt_ids, backend.reported)
        # Every process raises together: a lone failing rank would leave the others waiting
        # in the next collective.
        counts = torch.tensor([len(mismatches)], device=self.accelerator.device)
        if self.accelerator.gather(counts).sum().item():
            raise RuntimeError(
                double_expansion_message(
                    mismatches, len(prompt_ids), trl.__version__, self.vllm_mode
                )
            )
        return output

    def _saei_attack(
        self,
        prompts: list,
        images: list[RowImage],
        completions: list[_Completion],
        group_size: int,
    ) -> list[RowImage]:
        """One adversarial image per group of ``group_size`` clean rows."""
        device = self.accelerator.device
        batch, completion_mask = model_batch(
            prompts,
            [completion.ids for completion in completions],
            [image.fields for image in images],
            pad_token_id=self._tokenizer.pad_token_id,
            device=device,
        )
        generator = self._saei_generator() if self.args.saei_perturbation == "random" else None
        with model_for_attack(self) as model:
            result = entropy_attack(
                model,
                batch,
                completion_mask,
                space=self._saei_space,
                config=self._saei_attack_config,
                generator=generator,
            )
        self._saei_log_attack(result)
        return adversarial_images(images, result.pixel_values, result.images, group_size)

    def _saei_log_attack(self, result) -> None:
        self._saei_log("entropy_before", result.entropy_before)
        self._saei_log("entropy_after", result.entropy_after)
        self._saei_log("entropy_gain", result.entropy_after - result.entropy_before)
        self._saei_log("selected_tokens", float(result.num_selected))
        self._saei_log("attack_peak_memory_mb", result.peak_memory_bytes / 2**20)
        # Per group, gathered from every process (each holds the same number of groups).
        relative = result.group_entropy_after / result.group_entropy_before - 1.0
        relative = self.accelerator.gather(relative.to(self.accelerator.device))
        relative = relative[torch.isfinite(relative)]  # groups with a selected token
        if relative.numel():
            self._metrics["train"]["saei/entropy_gain_relative"].append(
                statistics.median(relative.tolist())
            )
            self._metrics["train"]["saei/gain_negative_fraction"].append(
                float((relative < 0).double().mean())
            )


def _distinct_per_group(
    completion_ids: list, is_adversarial: list[bool], group_size: int
) -> tuple[float, float]:
    """Mean over groups of the number of distinct completions among its clean rows and
    among its adversarial rows."""
    clean, adv = [], []
    for first in range(0, len(completion_ids), group_size):
        rows = range(first, first + group_size)
        clean.append(len({tuple(completion_ids[r]) for r in rows if not is_adversarial[r]}))
        adv.append(len({tuple(completion_ids[r]) for r in rows if is_adversarial[r]}))
    return sum(clean) / len(clean), sum(adv) / len(adv)


def _check_groups(prompt_ids, row_fields: list[dict], group_size: int) -> None:
    """Rows of a group must share prompt and image: the sampler repeats each prompt
    ``num_generations`` times contiguously, and SaEI relies on it."""
    for first in range(0, len(prompt_ids), group_size):
        for row in range(first + 1, first + group_size):
            same_prompt = list(prompt_ids[row]) == list(prompt_ids[first])
            same_image = all(
                torch.equal(value, row_fields[first][key])
                if torch.is_tensor(value)
                else value == row_fields[first][key]
                for key, value in row_fields[row].items()
            )
            if not (same_prompt and same_image):
                raise ValueError(
                    f"rows {first} and {row} are in one group of {group_size} but differ in "
                    "prompt or image; SaEI needs each prompt repeated num_generations times in a "
                    "row (TRL's RepeatSampler)"
                )
