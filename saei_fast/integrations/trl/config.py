"""The TRL integration's settings: :class:`SaEIConfig`, a ``GRPOConfig`` with the SaEI
sampling fields (``saei_*``), and the checks it runs on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from saei_fast.attack import PERTURBATIONS, SCOPES, AttackConfig
from saei_fast.validation import (
    check_band,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_temperature,
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
