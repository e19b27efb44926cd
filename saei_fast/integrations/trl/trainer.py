"""The TRL integration's trainer: :class:`SaEIGRPOTrainer`, TRL's ``GRPOTrainer`` with the
SaEI hooks of :mod:`.sampling`, :mod:`.scoring` and :mod:`.loss` mixed in, its construction
checks, and the per-step ``saei/`` metrics."""

from __future__ import annotations

import inspect
import warnings

import torch
import trl
from accelerate.logging import get_logger
from packaging.version import Version
from transformers import ProcessorMixin
from trl import GRPOTrainer

from saei_fast import pixels
from saei_fast.integrations.shared.fused_head import unsupported_reason
from saei_fast.integrations.shared.fused_loss import unsupported_reason as unsupported_loss_reason
from saei_fast.integrations.trl.config import SaEIConfig
from saei_fast.integrations.trl.loss import SaEILoss
from saei_fast.integrations.trl.parallel import fused_refusal, parallel_setup
from saei_fast.integrations.trl.parallel import refuse as refuse_setup
from saei_fast.integrations.trl.sampling import SaEISampling
from saei_fast.integrations.trl.scoring import SaEIScoring

# The package's name, as when the integration was one module.
logger = get_logger("saei_fast.integrations.trl")

# The TRL versions this module is tested against; the hooks it overrides are private to TRL.
SUPPORTED_TRL = (Version("1.16"), Version("1.17"))  # [lo, hi)

if not SUPPORTED_TRL[0] <= Version(trl.__version__) < SUPPORTED_TRL[1]:
    warnings.warn(
        f"saei_fast.integrations.trl is tested with trl >= {SUPPORTED_TRL[0]}, < "
        f"{SUPPORTED_TRL[1]}; found trl {trl.__version__}. The GRPOTrainer hooks it overrides "
        "may have changed.",
        stacklevel=2,
    )


class SaEIGRPOTrainer(SaEISampling, SaEIScoring, SaEILoss, GRPOTrainer):
    """TRL's ``GRPOTrainer`` sampling with SaEI (see :mod:`saei_fast.integrations.trl`).

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
        # FSDP / DeepSpeed, read from accelerate's state (see .parallel).
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

    def _saei_log(self, name: str, value: float) -> None:
        """Mean over processes of a per-process value, into this step's logs."""
        # float64: a gain of 1e-4 nats on an objective of ~3 survives the round trip.
        local = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        self._metrics["train"][f"saei/{name}"].append(self.accelerator.gather(local).mean().item())


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
