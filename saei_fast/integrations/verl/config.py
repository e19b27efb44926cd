"""The ``saei`` block of a verl trainer config, validated once at start-up.

    saei:
      n_clean: 6            # responses per prompt from the clean image
      n_adv: 6              # responses per prompt from the adversarial image
      alpha: 0.00784313725  # 2/255, signed step in [0, 1] pixel units
      steps: 1
      eps: null
      band: [0.3333333333, 0.6666666667]
      scope: group
      micro_batch_size: null
      perturbation: entropy # or "random": NoisyRollout-style control, same plumbing
      attack_timeout_s: 1800  # a call to the actor that takes longer fails its groups

``n_clean + n_adv`` must equal ``actor_rollout_ref.rollout.n``: one GRPO group (one uid)
holds the clean and the adversarial responses of a prompt. This module does not import verl,
so a bad config fails in the driver before any Ray worker starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from saei_fast.validation import check_band, check_choice, check_positive_float, check_positive_int

AGENT_LOOP_NAME = "saei_agent"
TRAINER_NAME = "saei_sync"
PERTURBATIONS = ("entropy", "random")
SCOPES = ("sequence", "group", "batch")  # saei_fast.attack.SCOPES, without importing torch
_KEYS = (
    "n_clean",
    "n_adv",
    "alpha",
    "steps",
    "eps",
    "band",
    "scope",
    "micro_batch_size",
    "perturbation",
    "attack_timeout_s",
)


@dataclass(frozen=True)
class SaEISettings:
    """The ``saei`` block (see the module docstring); validated on construction.

    Raises:
        TypeError / ValueError: a value of the wrong type or out of range, naming the key.
    """

    n_clean: int = 6
    n_adv: int = 6
    alpha: float = 2 / 255
    steps: int = 1
    eps: float | None = None
    band: tuple[float, float] = (1 / 3, 2 / 3)
    scope: str = "group"
    micro_batch_size: int | None = None
    perturbation: str = "entropy"
    attack_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        def keep(name, value):
            object.__setattr__(self, name, value)

        keep("n_clean", check_positive_int("saei.n_clean", self.n_clean))
        keep("n_adv", check_positive_int("saei.n_adv", self.n_adv))
        keep("alpha", check_positive_float("saei.alpha", self.alpha))
        keep("steps", check_positive_int("saei.steps", self.steps))
        if self.eps is not None:
            keep("eps", check_positive_float("saei.eps", self.eps))
        try:
            keep("band", tuple(check_band(tuple(self.band))))
        except (TypeError, ValueError) as error:
            raise type(error)(f"saei.{error}") from None
        check_choice("saei.scope", self.scope, SCOPES)
        if self.micro_batch_size is not None:
            check_positive_int("saei.micro_batch_size", self.micro_batch_size)
        check_choice("saei.perturbation", self.perturbation, PERTURBATIONS)
        keep(
            "attack_timeout_s", check_positive_float("saei.attack_timeout_s", self.attack_timeout_s)
        )

    @property
    def group_size(self) -> int:
        return self.n_clean + self.n_adv

    def to_dict(self) -> dict:
        return {**asdict(self), "band": list(self.band)}

    @classmethod
    def from_mapping(cls, block: object) -> SaEISettings:
        """Settings from the ``saei`` mapping (an OmegaConf ``DictConfig`` or a dict);
        unknown keys are refused, so a typo cannot silently fall back to a default."""
        if not isinstance(block, Mapping) and not hasattr(block, "items"):
            raise TypeError(f"saei must be a mapping of settings, got {type(block).__name__}")
        values = {str(key): _plain(value) for key, value in block.items()}
        unknown = sorted(set(values) - set(_KEYS) - {"_runtime"})
        if unknown:
            raise ValueError(f"saei has unknown keys {unknown}; known keys: {list(_KEYS)}")
        values.pop("_runtime", None)
        return cls(**values)


def settings_from_trainer_config(config: object) -> SaEISettings:
    """The validated ``saei`` block of a whole verl trainer config, checked against the rest
    of it (group size, agent loop, workers, validation).

    Raises:
        ValueError: no ``saei`` block, or settings verl cannot sample SaEI groups with.
    """
    block = _get(config, "saei")
    if block is None:
        raise ValueError(
            "the verl config has no 'saei' block: add one (e.g. +saei.n_clean=6 +saei.n_adv=6 "
            "on the command line) or use the single_turn_agent for vanilla GRPO"
        )
    settings = SaEISettings.from_mapping(block)
    rollout = _get(config, "actor_rollout_ref", "rollout")
    n = _get(rollout, "n")
    if n != settings.group_size:
        raise ValueError(
            f"actor_rollout_ref.rollout.n must equal saei.n_clean + saei.n_adv "
            f"({settings.n_clean} + {settings.n_adv} = {settings.group_size}): one GRPO group "
            f"holds the clean and the adversarial responses; got n={n}"
        )
    agent = _get(rollout, "agent") or {}
    default_loop = _get(agent, "default_agent_loop")
    if default_loop != AGENT_LOOP_NAME:
        raise ValueError(
            f"actor_rollout_ref.rollout.agent.default_agent_loop must be {AGENT_LOOP_NAME!r} for "
            f"SaEI sampling, got {default_loop!r}"
        )
    workers = _get(agent, "num_workers")
    batch = _get(config, "data", "train_batch_size")
    if isinstance(workers, int) and isinstance(batch, int) and batch % workers:
        # The legacy (v0) manager chunks the repeated batch over agent-loop workers; whole
        # groups per worker need whole prompts per chunk.
        raise ValueError(
            f"data.train_batch_size ({batch}) must be a multiple of "
            f"actor_rollout_ref.rollout.agent.num_workers ({workers}): every agent-loop worker "
            "must hold whole SaEI groups"
        )
    val_n = _get(rollout, "val_kwargs", "n")
    if isinstance(val_n, int) and val_n > settings.n_clean:
        raise ValueError(
            f"actor_rollout_ref.rollout.val_kwargs.n ({val_n}) must be <= saei.n_clean "
            f"({settings.n_clean}): validation samples clean images only"
        )
    _refuse_rollout_log_probs(config)
    sp_size = _get(config, "actor_rollout_ref", "actor", "ulysses_sequence_parallel_size")
    if isinstance(sp_size, int) and sp_size > 1:
        # The actor's attack runs the model on whole rows; Ulysses splits each packed row
        # over ranks inside the model's attention, an exchange the attack does not join.
        raise ValueError(
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size must be 1 with SaEI's "
            f"actor attack, got {sp_size}"
        )
    return settings


# Settings under which verl scores rows with the log-probs the rollout engine reported. For
# SaEI's adversarial rows those are log-probs under the perturbed image, while the update
# must see the clean image: an importance ratio against them measures the perturbation, not
# engine mismatch, and reweights or drops exactly those rows; bypass mode makes them the
# old policy's log-probs outright (verl's trainer: old_log_probs = rollout_log_probs).
_ROLLOUT_LOG_PROB_SETTINGS = (
    (("algorithm", "rollout_correction", "rollout_is"), "null"),
    (("algorithm", "rollout_correction", "rollout_rs"), "null"),
    (("algorithm", "rollout_correction", "bypass_mode"), "false"),
    (("actor_rollout_ref", "actor", "use_rollout_log_probs"), "false"),
)


def _refuse_rollout_log_probs(config: object) -> None:
    for keys, allowed in _ROLLOUT_LOG_PROB_SETTINGS:
        value = _get(config, *keys)
        if value not in (None, False):
            raise ValueError(
                f"{'.'.join(keys)}={value!r} is not supported with SaEI: it scores rows with "
                "the rollout engine's log-probs, which for the adversarial rows are of the "
                f"perturbed image (SaEI updates on the clean image); set it to {allowed}"
            )


def _get(config: object, *keys: str) -> object:
    for key in keys:
        if config is None:
            return None
        getter = getattr(config, "get", None)
        config = getter(key) if callable(getter) else getattr(config, key, None)
    return config


def _plain(value: object) -> object:
    """OmegaConf lists -> tuples (everything else is already a plain scalar)."""
    if hasattr(value, "__iter__") and not isinstance(value, (str, bytes, Mapping)):
        return tuple(value)
    return value
