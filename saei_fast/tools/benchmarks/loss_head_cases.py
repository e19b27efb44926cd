"""One GRPO loss pass of a VLM through each LM head: TRL's fused head vs saei-fast's.

Shape ``B x C x V``: B rows (prompt with one image + C completion tokens each) of a
random-weight Qwen2.5-VL-shaped model with a V-token vocabulary (Qwen's 151936 in the
default shapes; tests use a small one). A call is what
TRL's ``_get_per_token_logps_and_entropies`` does for the loss: the backbone forward, the
log-probs and entropies of the completion tokens at the sampling temperature, then
``backward`` of a GRPO-like loss to every parameter. Only the head differs:

  trl-head   TRL 1.16's ``add_fused_lm_head`` (``ChunkedLogProbFunction``: cuBLAS tiles of
             4096 tokens folded by a Triton kernel on CUDA, torch ops elsewhere), called as
             ``model(..., labels=labels, fused_lm_head=True)``
  ours       ``SaEIConfig(saei_fused_head=True)``'s head
             (:class:`saei_fast.integrations.shared.fused_head.FusedHead`:
             :func:`saei_fast.linear_logprobs_and_entropy`) in the same call
  ours-loss  ``SaEIConfig(saei_fused_loss=True)``'s path: the same head in its fused-loss
             mode, the loss's gradient taken by :func:`saei_fast.linear_token_loss` in the
             forward (3 GEMMs per completion token, no recompute)
  naive      full ``[B, L, V]`` logits from ``model(**inputs)``, log-softmax and entropy

A call hands the parameter gradients back with its outputs and leaves none on the model, as
an optimizer step followed by ``zero_grad(set_to_none=True)`` would: every call starts from
the same memory, whichever provider ran before, and its peak counts the gradients it
allocates. (When the gradients stayed on the model, a provider measured after another one
started with that one's gradients alive, among them the ``[V, D]`` embedding and head
gradients, 297 MiB on the CPU quick case, and reused their memory: only the provider that
went first paid for them.) Every provider allocates the same gradients, so ``param_grad_MiB``
is the floor of every row's true peak and what a head adds is the peak above it. (A CPU's
RSS peak is a lower bound: the allocator's reuse of freed memory can hide part of it, unless
``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc return every large block when it is freed.)

This case decides the ``saei_fused_head`` and ``saei_fused_loss`` defaults on CUDA: off
until a GPU run shows ``ours`` / ``ours-loss`` at least as fast as ``trl-head`` here. Needs
transformers and TRL; the inputs (model with TRL's head installed, batch, labels) are built
once per shape.
"""

from __future__ import annotations

import torch

from saei_fast.tools.benchmarks.cases import CALL, OpBench, Provider

VOCAB = 151936  # Qwen2/2.5/3-VL
TEMPERATURE = 1.0
ENTROPY_WEIGHT = 0.01  # an entropy bonus, so both outputs reach the backward
# A 0.5B-class text model on CUDA, a toy on a CPU (as the attack case).
_CUDA_MODEL = dict(hidden_size=896, num_layers=24, num_heads=14, intermediate_size=4864)
_CPU_MODEL = dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024)


def _build(dims, device, dtype) -> dict:
    from trl.trainer.utils import add_fused_lm_head

    from saei_fast.tools.testing import (
        random_images,
        tiny_qwen2_5_vl,
        tiny_qwen_image_processor,
        vlm_batch,
    )

    rows, completion, vocab = dims
    cuda = device.type == "cuda"
    image = 224 if cuda else 56
    model = tiny_qwen2_5_vl(
        **(_CUDA_MODEL if cuda else _CPU_MODEL),
        vocab_size=vocab,
        vision_hidden_size=256,
        vision_depth=4,
        vision_num_heads=4,
        dtype=dtype,
    ).to(device)
    # As GRPOTrainer installs it for a loss that also logs entropies.
    add_fused_lm_head(model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    batch = vlm_batch(
        model,
        tiny_qwen_image_processor(max_side=image),
        random_images(rows, (image, image)),
        prompt_lengths=(24, 40),
        completion_lengths=(completion, completion),
    )
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    completion_mask = batch.completion_mask.to(device)
    # TRL's labels: the completion tokens, -100 elsewhere (scored at the previous position).
    labels = inputs["input_ids"].masked_fill(~completion_mask, -100)
    return {"model": model, "inputs": inputs, "labels": labels}


def _loss(logps: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A GRPO-like loss: alternating-sign advantages on the log-probs, an entropy bonus."""
    advantages = torch.ones(mask.shape[0], 1, device=mask.device)
    advantages[1::2] = -1
    loss = -(logps.float() * advantages + ENTROPY_WEIGHT * entropy.float()) * mask
    return loss.sum() / mask.sum()


def _take_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameter gradients by name, removed from the model (see the module docstring)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grads[name], param.grad = param.grad, None
    return grads


def _fused(head):
    def make():
        def fn(model, inputs, labels):
            model.zero_grad(set_to_none=True)
            outputs = head(model)(**inputs, labels=labels, fused_lm_head=True)
            mask, logps, entropy = outputs.label_mask, outputs.log_probs, outputs.entropy
            _loss(logps, entropy, mask).backward()
            return logps.detach()[mask], entropy.detach()[mask], _take_grads(model)

        return fn

    return make


def _ours_head(model):
    from saei_fast.integrations.shared.fused_head import FusedHead

    return FusedHead(model, temperature=TEMPERATURE)


def _token_loss(labels: torch.Tensor):
    """``_loss`` as a per-token function for the fused head's fused-loss mode; the grid is
    every shifted position of the batch, ``[B, L - 1]``."""
    from saei_fast.integrations.shared.fused_loss import FusedTokenLoss

    class TokenLoss(FusedTokenLoss):
        def __init__(self):
            mask = labels[:, 1:] != -100
            self.rows, self.width = mask.shape
            self.advantages = torch.ones(self.rows, device=labels.device)
            self.advantages[1::2] = -1
            self.tokens = mask.sum()

        def token_loss(self, logprobs, entropy, index):
            advantages = self.advantages[index // self.width]
            return -(logprobs * advantages + ENTROPY_WEIGHT * entropy) / self.tokens

    return TokenLoss()


def _ours_loss():
    from saei_fast.integrations.shared.fused_head import FusedHead

    def fn(model, inputs, labels):
        model.zero_grad(set_to_none=True)
        loss = _token_loss(labels)
        head = FusedHead(model, temperature=TEMPERATURE, loss=loss)
        outputs = head(**inputs, labels=labels, fused_lm_head=True)
        loss.fused.backward()
        mask = outputs.label_mask
        return outputs.log_probs[mask], outputs.entropy[mask], _take_grads(model)

    return fn


def _naive():
    def fn(model, inputs, labels):
        model.zero_grad(set_to_none=True)
        logits = model(**inputs).logits[:, :-1].float() / TEMPERATURE
        targets = labels[:, 1:]
        mask = targets != -100
        logp_all = logits.log_softmax(-1)
        logps = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        _loss(logps, entropy, mask).backward()
        return logps.detach()[mask], entropy.detach()[mask], _take_grads(model)

    return fn


PROVIDERS = {
    p.name: p
    for p in (
        Provider("ours", _fused(_ours_head), kind="ours", module="trl", note="saei_fused_head"),
        Provider("ours-loss", _ours_loss, kind="ours", module="trl", note="saei_fused_loss"),
        Provider(
            "trl-head",
            _fused(lambda model: model),
            kind="peer",
            module="trl",
            note="ChunkedLogProbFunction",
        ),
        Provider("naive", _naive, module="trl", note="full logits"),
    )
}


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    if device.type == "cuda":
        return [(8, 1024, VOCAB)]  # a GRPO group of 8 responses of 1024 tokens
    return [(2, 16, VOCAB)] if quick else [(4, 128, VOCAB)]


def _describe(inputs: dict) -> dict:
    params = [p for p in inputs["model"].parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    return {
        "completion_tokens": int((inputs["labels"] != -100).sum()),
        "param_grad_MiB": round(grad_bytes / 2**20, 1),
    }


LOSS_HEAD = OpBench(
    name="loss_head",
    title="GRPO loss pass of a VLM (backbone + log-probs/entropy head + backward)",
    dims=("B", "C", "V"),
    modes=(CALL,),
    providers=PROVIDERS,
    shapes=_shapes,
    dtype=lambda device: torch.bfloat16 if device.type == "cuda" else torch.float32,
    build=_build,
    # The peak is read on the last warm-up call. On a CPU the first call of a process pays
    # one-time costs (Inductor compiling ours' CPU path, thread pools, the model's first pass)
    # that only the provider that happens to go first would carry: two warm-up calls there.
    repeats=lambda device, quick: (2, 10) if device.type == "cuda" else (2, 1 if quick else 3),
    describe=_describe,
)
