"""Entropy-guided adversarial images for Hugging Face VLMs (SaEI's EgAS step).

:func:`entropy_attack` raises the band-selected entropy of a group of responses by a signed
gradient step on their image, without ever building ``[tokens, vocab]`` logits and without
computing a single parameter gradient:

1. The base model (``model.base_model``, e.g. ``Qwen2_5_VLModel`` or ``LlavaModel``) runs
   the batch to its final hidden states; the language-model head is skipped.
2. The head's weight and bias (``model.get_output_embeddings()``, an ``nn.Linear``) go to
   :func:`saei_fast.linear_entropy` at the positions that predict completion tokens only
   (the hidden state at position t predicts token t + 1).
3. :func:`saei_fast.entropy_band_mask` picks the middle band of those entropies per scope
   (default: the group of responses to one image) and the gradient of
   :func:`saei_fast.band_entropy_objective` flows back to ``pixel_values`` alone: every
   parameter has ``requires_grad`` switched off for the duration (restored afterwards, also
   on error), so autograd records nothing for them.
4. The gradients of the rows of a group are summed, and the pixel space takes the signed
   step and projects it (:mod:`saei_fast.pixels`), so all rows of a group get one image.

Any Hugging Face VLM whose ``forward`` takes ``pixel_values`` and whose base model returns
the final hidden states works; models that transform logits after the head (soft-capping,
a logit scale) are rejected, since the entropy would not be that of the model's output.
Tested: Qwen2.5-VL, Qwen3-VL, LLaVA and Idefics3 (SmolVLM), also wrapped by ``peft``.
Cutting a batch into groups or micro-batches needs to know which images are whose: see
:class:`saei_fast.attack.row_layout.RowLayout`.

The passes run with the model in eval mode (dropout off, so the gradient is that of the
function being sampled from, and every micro-batch sees the same function); the mode is
restored afterwards, also on error.

``AttackConfig(perturbation="random")`` is the control: the same clean-image measurement
and grouping, but each step moves every pixel by ``alpha`` in a random direction (a sign
drawn from ``generator`` per pixel of each group's image) instead of the gradient's sign,
with no backward pass (NoisyRollout-style sampling with the attack's L-inf size).

Files: ``config.py`` (:class:`AttackConfig`, :class:`AttackResult`, the accepted scopes and
perturbations), ``steps.py`` (:func:`entropy_attack`, :func:`pixel_gradient`),
``passes.py`` (the forward / backward passes over micro-batches), ``model.py`` (the model's
parts, the checks on its batch and the state held during the attack), ``row_layout.py``
(which rows own which images).
"""

from saei_fast.attack.config import (
    PERTURBATIONS,
    SCOPES,
    AttackConfig,
    AttackResult,
    PixelGradient,
)
from saei_fast.attack.steps import entropy_attack, pixel_gradient

__all__ = [
    "PERTURBATIONS",
    "SCOPES",
    "AttackConfig",
    "AttackResult",
    "PixelGradient",
    "entropy_attack",
    "pixel_gradient",
]
