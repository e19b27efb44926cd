"""SaEI as a drop-in for TRL's ``GRPOTrainer``: :class:`SaEIConfig` and :class:`SaEIGRPOTrainer`.

    from saei_fast.integrations.trl import SaEIConfig, SaEIGRPOTrainer

    args = SaEIConfig(output_dir="out", num_generations=12, saei_n_clean=6, saei_n_adv=6)
    trainer = SaEIGRPOTrainer(model=model, processing_class=processor, reward_funcs=reward,
                              args=args, train_dataset=dataset)   # rows with an "image" column
    trainer.train()

With ``saei_enabled=False`` the same script trains vanilla GRPO. With SaEI on, every group of
``num_generations`` rows of a training batch is sampled as SaEI prescribes:

1. rows ``0 .. n_clean - 1`` of the group from the clean image;
2. :func:`saei_fast.entropy_attack` on those responses (band-selected entropy, one signed
   step on the image, shared by the group);
3. rows ``n_clean ..`` from the adversarial image.

Everything after generation is TRL's own: rewards, GRPO advantages over the whole group,
and the old / reference / policy log-probs, which TRL computes from the dataset's (clean)
images for every row. Only the generation hook (``_generate_single_turn``) is replaced, and
two others are extended: reward logging (clean vs adversarial rows) and the vLLM
importance-sampling ratio, which must not treat the adversarial rows as engine mismatch
(see :meth:`SaEIGRPOTrainer._generate_and_score_completions`).

``saei_perturbation="random"`` runs the control arm: the same grouping, with a random-sign
step of the same size instead of the attack's (NoisyRollout-style sampling; the signs are
drawn from a generator seeded by ``seed``, the global step and the process index).

Evaluation generates from clean images only. Supported: TRL 1.16.x with Hugging Face
``generate``, or with vLLM in colocate or server mode: the clean rows and the adversarial
rows are generated in two calls of ``n_clean`` and ``n_adv`` identical rows per prompt, so
the server's deduplication (one image per run of ``num_generations`` rows) sees the right
image for each. The vLLM path is tested against a stand-in backend with the server's
contract (vLLM itself is not part of the test environment). Tools, environments, a custom
``rollout_func`` and continuous batching are refused.

With vLLM, every generation (both arms) checks that the prompt the engine reports has as
many tokens as the trainer's prompt row, and raises a ``RuntimeError`` naming TRL issues
6294 / 6401 when it does not: TRL 1.16 in colocate mode sends vLLM processor-expanded image
tokens, which vLLM expands again (see :mod:`saei_fast.integrations.trl.vllm_prompts`).
"""

from __future__ import annotations

import inspect
import statistics
import warnings
from dataclasses import dataclass, field

import torch
import trl
from accelerate.logging import get_logger
from packaging.version import Version
from transformers import ProcessorMixin
from trl import GRPOConfig, GRPOTrainer

from saei_fast import pixels
from saei_fast.attack import PERTURBATIONS, SCOPES, AttackConfig, entropy_attack
from saei_fast.integrations.shared.checkpointing import model_for_attack
from saei_fast.integrations.shared.fused_head import FusedHead, fused_head_for, unsupported_reason
from saei_fast.integrations.shared.fused_loss import GRPOTokenLoss
from saei_fast.integrations.shared.fused_loss import unsupported_reason as unsupported_loss_reason
from saei_fast.integrations.shared.rows import (
    RowImage,
    adversarial_images,
    merge_rows,
    model_batch,
    split_rows,
)
from saei_fast.integrations.trl.parallel import fused_refusal, parallel_setup
from saei_fast.integrations.trl.parallel import refuse as refuse_setup
from saei_fast.integrations.trl.vllm_prompts import (
    ReportedPrompts,
    double_expansion_message,
    length_mismatches,
)
from saei_fast.rollout import saei_rollout
from saei_fast.validation import (
    check_band,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_temperature,
)

logger = get_logger(__name__)

# The TRL versions this module is tested against; the hooks it overrides are private to TRL.
SUPPORTED_TRL = (Version("1.16"), Version("1.17"))  # [lo, hi)

if not SUPPORTED_TRL[0] <= Version(trl.__version__) < SUPPORTED_TRL[1]:
    warnings.warn(
        f"saei_fast.integrations.trl is tested with trl >= {SUPPORTED_TRL[0]}, < "
        f"{SUPPORTED_TRL[1]}; found trl {trl.__version__}. The GRPOTrainer hooks it overrides "
        "may have changed.",
        stacklevel=2,
    )


@dataclass
class SaEIConfig(GRPOConfig):
    """A ``GRPOConfig`` with the SaEI sampling settings (``saei_*``), validated on construction.

    ``saei_n_clean + saei_n_adv`` must equal ``num_generations``: a GRPO group is the clean
    and the adversarial responses to one prompt together. Left unset, they split
    ``num_generations`` in halves (the paper: 6 + 6).
    """

    saei_enabled: bool = field(
        default=True,
        metadata={"help": "Sample with SaEI; False trains vanilla GRPO with the same settings."},
    )
    saei_n_clean: int | None = field(
        default=None,
        metadata={"help": "Responses per prompt from the clean image (default: half the group)."},
    )
    saei_n_adv: int | None = field(
        default=None,
        metadata={"help": "Responses per prompt from the adversarial image (default: the rest)."},
    )
    saei_alpha: float = field(
        default=2 / 255,
        metadata={"help": "Signed-gradient step in [0, 1] pixel units (paper: 2/255 or 3/255)."},
    )
    saei_steps: int = field(
        default=1,
        metadata={"help": "Attack steps; the paper uses 1 and warns that more collapse accuracy."},
    )
    saei_eps: float | None = field(
        default=None,
        metadata={"help": "Optional L-inf radius around the clean image, [0, 1] units."},
    )
    saei_band: list[float] = field(
        default_factory=lambda: [1 / 3, 2 / 3],
        metadata={"help": "Rank fractions (lo, hi) of the selected entropy band."},
    )
    saei_scope: str = field(
        default="group",
        metadata={"help": "Where entropy ranks are taken: 'sequence', 'group' or 'batch'."},
    )
    saei_micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per attack forward/backward pass (None: per_device_train_batch_size, "
            "rounded down to whole groups of saei_n_clean where one fits, so that the attack's "
            "peak memory stays within a training micro-batch's)."
        },
    )
    saei_perturbation: str = field(
        default="entropy",
        metadata={
            "help": "'entropy' (SaEI's attack) or 'random' (a random-sign step of the same size, "
            "the NoisyRollout-style control)."
        },
    )

    saei_fused_head: bool | None = field(
        default=None,
        metadata={
            "help": "Compute the loss's log-probs and entropies (policy, old and reference "
            "passes) with saei-fast's fused head instead of TRL's; None: on for CPU training, "
            "off on accelerators. Also with saei_enabled=False."
        },
    )

    saei_fused_loss: bool = field(
        default=False,
        metadata={
            "help": "Take the gradient of TRL's training loss with saei_fast.linear_token_loss "
            "while each chunk's logits are in memory (3 GEMMs per completion token at any batch "
            "size); TRL still computes the loss value and its metrics. Token-level GRPO, BNPO, "
            "Dr. GRPO and DAPO losses, in one process or under DDP (FSDP and DeepSpeed are "
            "refused). Also with saei_enabled=False."
        },
    )

    def __post_init__(self) -> None:
        # Before GRPOConfig's own checks, and whatever saei_enabled says: TRL would accept a
        # zero or NaN temperature here and fail later, deep inside the trainer.
        self.temperature = check_temperature(self.temperature)
        if isinstance(self.generation_kwargs, dict) and "temperature" in self.generation_kwargs:
            try:
                check_temperature(self.generation_kwargs["temperature"])
            except (TypeError, ValueError) as error:
                raise type(error)(f"generation_kwargs['temperature']: {error}") from None
        super().__post_init__()
        if not isinstance(self.saei_enabled, bool):
            raise TypeError(f"saei_enabled must be a bool, got {type(self.saei_enabled).__name__}")
        if self.saei_fused_head is not None and not isinstance(self.saei_fused_head, bool):
            raise TypeError(
                f"saei_fused_head must be a bool or None, got {type(self.saei_fused_head).__name__}"
            )
        if not isinstance(self.saei_fused_loss, bool):
            raise TypeError(
                f"saei_fused_loss must be a bool, got {type(self.saei_fused_loss).__name__}"
            )
        self.saei_n_clean, self.saei_n_adv = _group_split(
            self.num_generations, self.saei_n_clean, self.saei_n_adv
        )
        self.saei_alpha = check_positive_float("saei_alpha", self.saei_alpha)
        self.saei_steps = check_positive_int("saei_steps", self.saei_steps)
        if self.saei_eps is not None:
            self.saei_eps = check_positive_float("saei_eps", self.saei_eps)
        try:
            self.saei_band = list(check_band(self.saei_band))
        except (TypeError, ValueError) as error:
            raise type(error)(f"saei_{error}") from None
        check_choice("saei_scope", self.saei_scope, SCOPES)
        check_choice("saei_perturbation", self.saei_perturbation, PERTURBATIONS)
        if self.saei_micro_batch_size is not None:
            check_positive_int("saei_micro_batch_size", self.saei_micro_batch_size)
        if self.saei_enabled:
            check_whole_groups_per_process(
                self.per_device_train_batch_size, self.steps_per_generation, self.num_generations
            )
            if self.use_transformers_continuous_batching:
                raise ValueError(
                    "saei_enabled=True does not support use_transformers_continuous_batching=True: "
                    "continuous batching generates from token ids only, without the images"
                )

    def sampling_temperature(self) -> float:
        """The temperature TRL samples at: ``generation_kwargs["temperature"]`` when given
        (TRL passes it over ``temperature`` to both ``generate`` and vLLM), else
        ``temperature``."""
        if isinstance(self.generation_kwargs, dict) and "temperature" in self.generation_kwargs:
            return check_temperature(self.generation_kwargs["temperature"])
        return self.temperature

    def attack_config(self) -> AttackConfig:
        """The :class:`saei_fast.AttackConfig` of these settings (entropies at the effective
        sampling temperature, one adversarial image per group of ``saei_n_clean`` clean
        rows)."""
        rows = self.saei_micro_batch_size
        if rows is None:
            # A training micro-batch's rows at most: the attack's backward then needs no
            # more memory than the training step's on the same rows (no parameter
            # gradients). Whole groups where one fits, so that no extra pass ranks a
            # group's band across passes.
            rows = self.per_device_train_batch_size
            if rows >= self.saei_n_clean:
                rows -= rows % self.saei_n_clean
        return AttackConfig(
            alpha=self.saei_alpha,
            steps=self.saei_steps,
            eps=self.saei_eps,
            band=tuple(self.saei_band),
            scope=self.saei_scope,
            group_size=self.saei_n_clean,
            temperature=self.sampling_temperature(),
            micro_batch_size=rows,
            measure_after=True,
            perturbation=self.saei_perturbation,
        )


def _group_split(num_generations: int, n_clean: object, n_adv: object) -> tuple[int, int]:
    """``(n_clean, n_adv)``, filling unset ones and checking that they sum to the group."""
    if n_clean is None and n_adv is None:
        n_clean = num_generations // 2
    if n_clean is None:
        n_clean = num_generations - check_positive_int("saei_n_adv", n_adv)
    if n_adv is None:
        n_adv = num_generations - check_positive_int("saei_n_clean", n_clean)
    n_clean = check_positive_int("saei_n_clean", n_clean)
    n_adv = check_positive_int("saei_n_adv", n_adv)
    if n_clean + n_adv != num_generations:
        raise ValueError(
            f"saei_n_clean + saei_n_adv must equal num_generations ({num_generations}): one GRPO "
            f"group holds the clean and the adversarial responses; got {n_clean} + {n_adv}"
        )
    return n_clean, n_adv


def check_whole_groups_per_process(
    per_device_train_batch_size: int, steps_per_generation: int, num_generations: int
) -> None:
    """Every process must generate whole groups: the attack needs all clean responses to a
    prompt, and the adversarial rows need their group's image, on one process."""
    local_rows = per_device_train_batch_size * steps_per_generation
    if local_rows % num_generations:
        raise ValueError(
            f"SaEI needs whole groups on every process: per_device_train_batch_size "
            f"({per_device_train_batch_size}) * steps_per_generation ({steps_per_generation}) "
            f"= {local_rows} rows must be a multiple of num_generations ({num_generations})"
        )


@dataclass
class _Completion:
    ids: list[int]
    logprobs: list[float] | None


class SaEIGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` sampling with SaEI (see the module docstring).

    Takes ``GRPOTrainer``'s arguments; ``args`` must be a :class:`SaEIConfig`. Logs, per
    training step, under ``saei/`` (means over processes; per-group values are gathered
    from every process first):

    - ``entropy_before`` / ``entropy_after``: the band objective on the clean and on the
      perturbed image (same band mask), ``entropy_gain`` their difference;
    - ``entropy_gain_relative``: median over groups of ``after / before - 1``;
      ``gain_negative_fraction``: fraction of groups whose objective went down;
    - ``selected_tokens``: completion tokens in the band; ``attack_seconds``,
      ``attack_peak_memory_mb``;
    - ``entropy_clean_rows`` / ``entropy_adv_rows``: the mean policy entropy of the loss
      forward over the tokens of clean and of adversarial rows (TRL's ``entropy`` averages
      both, and the adversarial rows were sampled from another image);
    - ``reward_clean`` / ``reward_adv``: mean reward of the clean and adversarial rows;
    - ``distinct_clean`` / ``distinct_adv``: distinct completions per group among its clean
      and among its adversarial rows, averaged over groups.

    With vLLM, TRL's ``sampling/importance_sampling_ratio/*`` and
    ``sampling/sampling_logp_difference/*`` metrics are computed inside TRL's scoring,
    before SaEI's correction of the adversarial rows (see
    :meth:`_generate_and_score_completions`): they include the image change of those rows.

    Raises:
        TypeError / ValueError: at construction, for settings SaEI cannot sample with
            (non-SaEIConfig args, text-only processing class, tools, environments, a custom
            ``rollout_func``, a processor without a pixel space, FSDP or DeepSpeed ZeRO-3;
            the fused head or loss with FSDP or DeepSpeed; see
            :mod:`saei_fast.integrations.trl.parallel`).
        RuntimeError: at a vLLM generation whose engine prompt differs in length from the
            trainer's (image tokens expanded twice, TRL issues 6294 / 6401), on every process.
    """

    def __init__(self, *args, **kwargs) -> None:
        bound = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs).arguments
        config = bound.get("args")
        if not isinstance(config, SaEIConfig):
            raise TypeError(
                f"args must be a saei_fast.integrations.trl.SaEIConfig, got {type(config).__name__}"
            )
        if config.saei_enabled:
            for name in ("tools", "rollout_func", "environment_factory"):
                if bound.get(name):
                    raise ValueError(
                        f"saei_enabled=True does not support {name}: SaEI samples single-turn "
                        "responses to one image per prompt"
                    )
            _check_vllm_images(config, bound.get("processing_class"))
        if isinstance(bound.get("model"), torch.nn.Module):
            # A model sharded before it got here (torch's fully_shard), before TRL uses it.
            refuse_setup(parallel_setup(None, bound["model"]), config)
        super().__init__(*args, **kwargs)
        self._saei_space = None
        self._saei_attack_config = None
        if config.saei_enabled:
            if not isinstance(self.processing_class, ProcessorMixin):
                raise ValueError(
                    "saei_enabled=True needs a vision-language model and its processor as "
                    f"processing_class (SaEI attacks images), got "
                    f"{type(self.processing_class).__name__}"
                )
            # Raises a clear error for processors without mean/std or 8-bit rescaling.
            self._saei_space = pixels.from_processor(self.processing_class)
            self._saei_attack_config = config.attack_config()
        self._saei_last_adversarial = None  # is_adversarial of the latest SaEI generation
        self._saei_loss_rows = None  # (is_adversarial, token mask) of the loss forward
        # FSDP / DeepSpeed, read from accelerate's state (see _parallel).
        self._saei_setup = parallel_setup(self.accelerator.state, self.model)
        refuse_setup(self._saei_setup, config)
        self._saei_fused_head = self._saei_resolve_fused_head(config.saei_fused_head)
        if config.saei_fused_loss:
            self._saei_check_fused_loss()
        self._saei_fused_loss = config.saei_fused_loss
        self._saei_pending_loss = None  # the GRPOTokenLoss of the running loss forward

    def _saei_resolve_fused_head(self, setting: bool | None) -> bool:
        if setting is None:
            # Off on accelerators until a GPU benchmark shows ours at least as fast as TRL's,
            # and wherever an explicit True is refused (FSDP, DeepSpeed).
            cpu = self.accelerator.device.type == "cpu"
            setting = cpu and fused_refusal(self._saei_setup) is None
        if not setting:
            return False
        reason = unsupported_reason(self.model)
        if reason is not None:
            logger.warning("saei_fused_head: using TRL's head instead, since %s.", reason)
            return False
        return True

    def _saei_check_fused_loss(self) -> None:
        """saei_fused_loss=True is refused at construction where it cannot be exact."""
        reason = unsupported_loss_reason(self) or unsupported_reason(self.model)
        if reason is not None:
            raise ValueError(f"saei_fused_loss=True is not supported here: {reason}")

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

    # ---- after generation: importance sampling, rewards ----------------------------------

    def _generate_and_score_completions(self, inputs):
        """TRL's scoring, then the explicit treatment of the adversarial rows' vLLM
        importance-sampling correction.

        The correction (``vllm_importance_sampling_correction``) reweights each token by
        ``p_trainer / p_vllm`` to undo the numerical mismatch of the two engines. For an
        adversarial row the trainer's log-prob is on the clean image (as the whole update
        is) while vLLM sampled it from the adversarial one, so that ratio measures the
        image change, and in ``*_mask`` modes would drop the row. SaEI trains on these rows
        as samples for the clean-image policy (as the paper does), so their ratio is set to
        1 and their sampling log-probs to the clean-image ones (which also keeps the
        off-policy sequence mask from dropping them for the image change). What the ratio
        would have been is logged: ``saei/adv_sampling_logp_shift`` (mean over tokens of
        ``log p_sampling - log p_clean``) and ``saei/adv_is_dropped_fraction``. TRL's own
        ``sampling/*`` metrics are logged inside TRL's scoring, before this correction.

        The batch also carries ``saei_is_adversarial`` (bool ``[B]``), which TRL shuffles
        with the other per-row tensors, so the loss can log clean and adversarial rows apart.
        """
        output = super()._generate_and_score_completions(inputs)
        adversarial = self._saei_last_adversarial
        if adversarial is None:
            return output
        adversarial = adversarial.to(output["completion_mask"].device)
        output["saei_is_adversarial"] = adversarial
        if "importance_sampling_ratio" not in output:
            return output
        mask = output["completion_mask"].bool()
        if "tool_mask" in output:
            mask &= output["tool_mask"].bool()
        adv_tokens = mask & adversarial[:, None]
        sampling = output["sampling_per_token_logps"]
        old = output["old_per_token_logps"]
        shift = torch.nan_to_num(sampling - old, nan=0.0)[adv_tokens]
        ratio = output["importance_sampling_ratio"]
        dropped = (ratio == 0).expand_as(mask)[adv_tokens]
        self._saei_log("adv_sampling_logp_shift", _mean(shift))
        self._saei_log("adv_is_dropped_fraction", _mean(dropped.float()))

        ratio = ratio.clone()
        ratio[adversarial] = 1.0
        output["importance_sampling_ratio"] = ratio
        sampling = sampling.clone()
        sampling[adversarial] = old[adversarial]
        output["sampling_per_token_logps"] = sampling
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        adversarial = self._saei_last_adversarial
        if adversarial is None:
            return rewards_per_func
        # Rewards are gathered from every process; each holds whole groups, same layout.
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        adversarial = adversarial.to(rewards.device).repeat(rewards.numel() // adversarial.numel())
        self._metrics["train"]["saei/reward_clean"].append(rewards[~adversarial].mean().item())
        self._metrics["train"]["saei/reward_adv"].append(rewards[adversarial].mean().item())
        return rewards_per_func

    # ---- the loss forward ----------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        adversarial = inputs.get("saei_is_adversarial")
        if adversarial is not None:
            mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"]
            self._saei_loss_rows = (adversarial, mask.bool())
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._saei_loss_rows = None

    def _compute_loss(self, model, inputs):
        """TRL's, with the gradient taken by the fused loss when ``saei_fused_loss`` is on and
        a backward follows (TRL's value and metrics, the fused loss's gradient)."""
        if not (self._saei_fused_loss and torch.is_grad_enabled()):
            return super()._compute_loss(model, inputs)
        pending = GRPOTokenLoss(self, inputs, training=self.model.training)
        self._saei_pending_loss = pending
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._saei_pending_loss = None
        return pending.combine(loss)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        """TRL's, with saei-fast's fused head in place of TRL's when ``saei_fused_head`` is
        on (and with the fused loss in the training-loss forward), and the clean /
        adversarial split of the loss forward's entropy logged."""
        pending, self._saei_pending_loss = self._saei_pending_loss, None  # its first call only
        # Unwrapped or DDP-wrapped (the call then goes through DDP's forward, for its
        # gradient hooks); any other wrapper runs TRL's head (FSDP and DeepSpeed with the
        # fused paths are refused at construction).
        target = None
        if self._saei_fused_head or pending is not None:
            target = fused_head_for(model, self.accelerator.unwrap_model(model))
        if target is not None and unsupported_reason(target[0]) is None:
            module, wrapper = target
            model = FusedHead(module, temperature=self.temperature, loss=pending, wrapper=wrapper)
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, *args, **kwargs
        )
        if entropies is not None and self._saei_loss_rows is not None:
            self._saei_log_entropy_split(entropies.detach(), *self._saei_loss_rows)
        return logps, entropies, aux_loss

    def _saei_log_entropy_split(
        self, entropies: torch.Tensor, adversarial: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Token-weighted mean entropy of the clean and of the adversarial rows, over all
        processes (as TRL's ``entropy``: their token-weighted mean is TRL's value)."""
        adversarial = adversarial.to(entropies.device)[:, None]
        clean_tokens, adv_tokens = mask & ~adversarial, mask & adversarial
        stats = torch.stack(
            [
                (entropies * clean_tokens).sum(),
                clean_tokens.sum().to(entropies.dtype),
                (entropies * adv_tokens).sum(),
                adv_tokens.sum().to(entropies.dtype),
            ]
        ).float()
        stats = self.accelerator.reduce(stats, reduction="sum").tolist()
        for name, total, count in (("clean", *stats[:2]), ("adv", *stats[2:])):
            if count > 0:
                self._metrics["train"][f"saei/entropy_{name}_rows"].append(total / count)

    def _saei_log(self, name: str, value: float) -> None:
        """Mean over processes of a per-process value, into this step's logs."""
        # float64: a gain of 1e-4 nats on an objective of ~3 survives the round trip.
        local = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        self._metrics["train"][f"saei/{name}"].append(self.accelerator.gather(local).mean().item())


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


def _check_vllm_images(config: SaEIConfig, processing_class: object) -> None:
    """Refuse what would send vLLM the wrong adversarial images: a processor that tiles
    images (Idefics3 / SmolVLM ``do_image_splitting``) turns one image into several tiles,
    and the perturbed tiles cannot be sent back to vLLM as the whole image it expects."""
    if not config.use_vllm:
        return
    image_processor = getattr(processing_class, "image_processor", processing_class)
    if getattr(image_processor, "do_image_splitting", False):
        raise ValueError(
            "saei_enabled=True with use_vllm=True does not support image processors that "
            f"tile images ({type(image_processor).__name__} with do_image_splitting=True): "
            "vLLM takes whole images and the attack perturbs tiles; set "
            "do_image_splitting=False on the processor or generate with use_vllm=False"
        )


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


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else 0.0


__all__ = ["SaEIConfig", "SaEIGRPOTrainer", "check_whole_groups_per_process"]
